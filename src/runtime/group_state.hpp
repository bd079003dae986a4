// Resources shared by the ranks of one group: the symmetric buffers (one per rank, each mapped
// into every rank's address space) and the record of which stream belongs to which rank.
#pragma once

#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"
#include "runtime/node_layout.hpp"

namespace moecomm::detail {

class GinEngine;

/// The ranks of a group. Virtual group: all ranks in this process, each symmetric buffer a plain
/// device allocation whose pointer every rank can use (peer access enabled between devices).
/// Process group: this process holds one rank; its buffer is exported with CUDA IPC and the
/// peers' buffers are mapped into this address space (map_peers).
class GroupState {
 public:
  /// `plan` says how large each rank's symmetric buffer is and what in it starts at zero; the
  /// paths decide what lies where (paths/regions.hpp).
  GroupState(const Config& config, const RegionShape& shape, std::vector<int> devices,
             const SymmetricPlan& plan);
  /// One rank of a process group: allocates this rank's buffer only.
  GroupState(const Config& config, const RegionShape& shape, int rank, int device,
             const SymmetricPlan& plan);
  ~GroupState();
  GroupState(const GroupState&) = delete;
  GroupState& operator=(const GroupState&) = delete;

  const Config config;
  const int num_ranks;
  std::vector<int> device_of;  // device of each rank
  RegionShape shape;
  SymmetricPlan plan;
  std::vector<uint8_t*> sym_base;  // symmetric buffer of each rank
  /// True when every rank lives in this process (pointers may be published as they are).
  bool single_address_space = true;
  /// Ranks of this group driven from this process.
  int local_ranks = 0;

  /// The NCCL GIN engine of this process's rank, when connect() chose it (else null).
  std::shared_ptr<GinEngine> gin;

  /// Handle of `rank` (process groups): its config digest (runtime/config_digest.hpp), then the
  /// host id of its node (runtime/node_layout.hpp), then its machine id (machine_id()), then an
  /// NCCL unique id (rank 0, where the GIN engine may be needed; else zeros), then the CUDA IPC
  /// handle of its buffer.
  std::vector<uint8_t> export_handle(int rank, const std::string& host_id,
                                     const std::vector<uint8_t>& nccl_id) const;
  /// True when every handle names the same machine (machine_id()): CUDA IPC reaches every buffer.
  bool one_machine(const std::vector<uint8_t>& handles) const;
  /// The GIN engine instead of CUDA IPC (collective: every rank calls it): NCCL's communicator
  /// from rank 0's unique id, this rank's buffer replaced by NCCL memory registered as a window
  /// (zeroed as allocate() does), the buffers of this node's ranks through NCCL's mapping.
  /// Raises Unsupported naming what is missing when NCCL offers no GIN here.
  void start_gin(int rank, const std::vector<uint8_t>& handles, const NodeLayout& nodes);
  /// Checks every rank's handle (handle_size() bytes each, rank order): the same library version,
  /// group size and Config on every rank, then host ids that form nodes of equal size, each a
  /// contiguous block of ranks. Raises InvalidArgument naming the field or hosts and the ranks
  /// otherwise, identically on every rank (each sees the same bytes). Returns the node layout.
  NodeLayout check_handles(const std::vector<uint8_t>& handles) const;
  /// Maps every other rank's buffer from its IPC handle (handles checked by check_handles).
  void map_peers(int rank, const std::vector<uint8_t>& handles);
  static size_t handle_size();

  /// Records that `rank` issues work on `stream`; raises InvalidArgument if a co-located rank
  /// already did (their spinning kernels would serialise on it and never finish).
  void claim_stream(int rank, cudaStream_t stream);

 private:
  void allocate(int rank);

  std::vector<bool> owned_;       // allocated here with cudaMalloc
  std::vector<bool> ipc_mapped_;  // mapped from a peer through CUDA IPC (else NCCL's, or none)
  std::mutex mutex_;
  std::map<cudaStream_t, int> stream_owner_;
};

}  // namespace moecomm::detail
