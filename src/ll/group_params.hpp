// The kernel parameters of one LL call for a whole one-GPU group (ll/group_plan.hpp), shared by
// the plan that fills them and the kernels that read them (ll/dispatch.cu, ll/combine.cu).
// Internal to the LL path.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "ll/group_plan.hpp"
#include "ll/ll.hpp"
#include "paths/device_context.hpp"

namespace moecomm::ll {

// The ranks of a VirtualGroup on one GPU can run one LL call as a single kernel: block b serves
// rank b / blocks_per_rank. Plain launches on R streams serialise in the GPU's front end (8 ranks:
// ~29 us before the last rank's first kernel has run); one launch pays that once. The per-rank
// contexts and parameters travel by value in the kernel's parameter space.

struct GroupLaunch {
  int ranks = 0;
  int blocks_per_rank = 0;
};

struct GroupDispatchSend {
  GroupLaunch launch;
  detail::DeviceContext ctx[kMaxGroupRanks];
  DispatchSendParams params[kMaxGroupRanks];  // receive must be set: no hooks in a group launch
};

struct GroupCombineRecv {
  GroupLaunch launch;
  detail::DeviceContext ctx[kMaxGroupRanks];
  CombineRecvParams params[kMaxGroupRanks];  // publish_y must be set
};

inline constexpr size_t kMaxKernelParamBytes = 32764;
static_assert(sizeof(GroupDispatchSend) <= kMaxKernelParamBytes, "group parameters too large");
static_assert(sizeof(GroupCombineRecv) <= kMaxKernelParamBytes, "group parameters too large");

/// Both phases of dispatch for every rank of the group, one kernel on `stream`.
void launch_group_dispatch(const GroupDispatchSend& group, int threads, cudaStream_t stream);
/// Both phases of combine for every rank of the group, one kernel on `stream`.
void launch_group_combine(const GroupCombineRecv& group, int threads, cudaStream_t stream);

}  // namespace moecomm::ll
