// One LL call of every rank of a one-GPU group as a single kernel (VirtualGroup::dispatch_all /
// combine_all). The communicator of each rank checks its arguments and records its kernel
// parameters here instead of launching; the plan then launches one kernel in which block b
// serves rank b / blocks_per_rank. Plain launches on R streams serialise in the GPU's front end
// (8 ranks: ~29 us before the last rank's first kernel has run); one launch pays that once.
// Host-side: this header names no kernel and no device type.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

namespace moecomm::detail {
struct DeviceContext;
}

namespace moecomm::ll {

struct DispatchSendParams;
struct CombineRecvParams;
struct GroupDispatchSend;
struct GroupCombineRecv;

inline constexpr int kMaxGroupRanks = 8;  // what fits the 32 KB of kernel parameters

class GroupPlan {
 public:
  /// A plan for `ranks` ranks (at most kMaxGroupRanks), each served by `blocks_per_rank` blocks.
  GroupPlan(int ranks, int blocks_per_rank);
  ~GroupPlan();
  GroupPlan(const GroupPlan&) = delete;
  GroupPlan& operator=(const GroupPlan&) = delete;

  /// While set, the ranks' calls check their arguments and return before changing any state, so
  /// that a bad argument on any rank leaves every rank as it was. The group clears it, then
  /// makes the calls again to record them.
  bool validate_only = true;

  /// Records the next rank's dispatch (both phases: `params.receive` must be set).
  void add_dispatch(const detail::DeviceContext& ctx, const DispatchSendParams& params);
  /// Records the next rank's combine (both phases: `params.publish_y` must be set).
  void add_combine(const detail::DeviceContext& ctx, const CombineRecvParams& params);

  /// Launches what was recorded (one call per rank, all dispatches or all combines) as one
  /// kernel on `stream`.
  void launch(int threads, cudaStream_t stream) const;

 private:
  int ranks_;
  int blocks_per_rank_;
  int recorded_ = 0;
  // Every rank's context and parameters (about 10 KB, hence on the heap), made on first use.
  std::unique_ptr<GroupDispatchSend> dispatch_;
  std::unique_ptr<GroupCombineRecv> combine_;
};

}  // namespace moecomm::ll
