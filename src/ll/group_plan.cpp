#include "ll/group_plan.hpp"

#include <string>

#include "ll/group_params.hpp"
#include "moecomm/error.hpp"

namespace moecomm::ll {

GroupPlan::GroupPlan(int ranks, int blocks_per_rank)
    : ranks_(ranks), blocks_per_rank_(blocks_per_rank) {
  if (ranks < 1 || ranks > kMaxGroupRanks)
    throw Unsupported("one launch for the group: at most " + std::to_string(kMaxGroupRanks) +
                      " ranks, the group has " + std::to_string(ranks));
}

GroupPlan::~GroupPlan() = default;

namespace {

/// Stores the next rank's context and parameters in a group's kernel parameters.
template <typename Group, typename Params>
void record(std::unique_ptr<Group>& group, int ranks, int blocks_per_rank, int& recorded,
            const detail::DeviceContext& ctx, const Params& params) {
  if (recorded >= ranks)
    throw Error("internal: one launch for the group recorded more calls than ranks");
  if (!group) {
    group = std::make_unique<Group>();
    group->launch = {ranks, blocks_per_rank};
  }
  group->ctx[recorded] = ctx;
  group->params[recorded] = params;
  ++recorded;
}

}  // namespace

void GroupPlan::add_dispatch(const detail::DeviceContext& ctx, const DispatchSendParams& params) {
  record(dispatch_, ranks_, blocks_per_rank_, recorded_, ctx, params);
}

void GroupPlan::add_combine(const detail::DeviceContext& ctx, const CombineRecvParams& params) {
  record(combine_, ranks_, blocks_per_rank_, recorded_, ctx, params);
}

void GroupPlan::launch(int threads, cudaStream_t stream) const {
  if (recorded_ != ranks_ || (dispatch_ && combine_))
    throw Error("internal: one launch for the group needs one call of the same kind per rank");
  if (dispatch_) launch_group_dispatch(*dispatch_, threads, stream);
  if (combine_) launch_group_combine(*combine_, threads, stream);
}

}  // namespace moecomm::ll
