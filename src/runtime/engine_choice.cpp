#include "runtime/engine_choice.hpp"

#include "moecomm/error.hpp"

namespace moecomm::detail {

RdmaEngine choose_engine(RdmaEngine requested, const EngineFacts& f) {
  if (f.num_nodes <= 1) return RdmaEngine::kLoopback;  // no traffic between nodes
  const std::string nodes = std::to_string(f.num_nodes) + " nodes";
  if (requested == RdmaEngine::kLoopback) {
    if (!f.one_machine)
      throw Unsupported("Config.engine=loopback: the group's " + nodes +
                        " run on several machines; the loopback engine reaches only buffers of "
                        "one machine (use engine=auto or gin, which needs NCCL GIN)");
    return RdmaEngine::kLoopback;
  }
  if (requested == RdmaEngine::kAuto && f.one_machine) return RdmaEngine::kLoopback;
  // GIN: asked for, or needed because the ranks run on several machines.
  const std::string why = requested == RdmaEngine::kGin
                              ? std::string("Config.engine=gin")
                              : "Config.engine=auto: the group's " + nodes +
                                    " run on several machines and need the NCCL GIN engine";
  if (f.virtual_group)
    throw Unsupported(why +
                      ", but a VirtualGroup's ranks share one process; the GIN engine "
                      "needs one process per rank (ProcessGroupBuilder)");
  if (!f.nccl_built)
    throw Unsupported(why + ", which this build of moecomm lacks: " + f.nccl_build_note +
                      " (docs/multinode.md: build with -DMOECOMM_WITH_NCCL=ON and NCCL >= 2.32)");
  return RdmaEngine::kGin;
}

}  // namespace moecomm::detail
