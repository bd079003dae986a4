// Resources shared by the ranks of one group: the symmetric buffers (one per rank, each mapped
// into every rank's address space) and the record of which stream belongs to which rank.
#pragma once

#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <vector>

#include "moecomm/config.hpp"
#include "runtime/symmetric_layout.hpp"

namespace moecomm::detail {

/// Makes `device` current for the scope (CUDA's current device is per host thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();

 private:
  int previous_ = -1;
  int device_ = -1;
};

/// The ranks of a virtual group: all in this process, so a symmetric buffer is a plain device
/// allocation whose pointer every rank can use (peer access is enabled between the devices).
class GroupState {
 public:
  GroupState(const Config& config, int num_ranks, std::vector<int> devices);
  ~GroupState();
  GroupState(const GroupState&) = delete;
  GroupState& operator=(const GroupState&) = delete;

  const Config config;
  const int num_ranks;
  std::vector<int> device_of;     // device of each rank
  BufferSizes sizes;
  SymmetricLayout layout;
  std::vector<uint8_t*> sym_base;  // symmetric buffer of each rank

  /// Records that `rank` issues work on `stream`; raises InvalidArgument if a co-located rank
  /// already did (their spinning kernels would serialise on it and never finish).
  void claim_stream(int rank, cudaStream_t stream);

 private:
  std::mutex mutex_;
  std::map<cudaStream_t, int> stream_owner_;
};

}  // namespace moecomm::detail
