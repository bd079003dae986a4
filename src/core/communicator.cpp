// MoECommunicator: the public face of one rank. Every call forwards to CommImpl (comm_impl.hpp),
// which owns the rank's resources, so that the public header names no library internals.
#include "moecomm/communicator.hpp"

#include "core/comm_impl.hpp"

namespace moecomm {

MoECommunicator::MoECommunicator(std::unique_ptr<detail::CommImpl> impl) : impl_(std::move(impl)) {}
MoECommunicator::~MoECommunicator() = default;

int MoECommunicator::rank() const {
  return impl_->rank();
}
int MoECommunicator::num_ranks() const {
  return impl_->num_ranks();
}
int MoECommunicator::num_nodes() const {
  return impl_->num_nodes();
}
int MoECommunicator::device() const {
  return impl_->device();
}
const Config& MoECommunicator::config() const {
  return impl_->config();
}
cudaStream_t MoECommunicator::stream() const {
  return impl_->stream();
}

Layout MoECommunicator::get_layout(const TensorView& topk_idx, cudaStream_t stream) {
  return impl_->get_layout(topk_idx, stream);
}

DispatchOutput MoECommunicator::dispatch(const DispatchArgs& args, const DispatchOptions& options) {
  return impl_->dispatch(args, options);
}

CombineOutput MoECommunicator::combine(const CombineArgs& args, const Handle& handle,
                                       const CombineOptions& options) {
  return impl_->combine(args, handle, options);
}

TensorView MoECommunicator::combine_buffer(const Handle& handle) {
  return impl_->combine_buffer(handle);
}

void MoECommunicator::synchronize() {
  impl_->synchronize();
}
CallTrace MoECommunicator::last_call_trace() const {
  return impl_->last_call_trace();
}
void MoECommunicator::check_errors() {
  impl_->check_errors();
}

void MoECommunicator::mask_rank(int rank, bool masked) {
  impl_->mask_rank(rank, masked);
}
std::vector<int> MoECommunicator::masked_ranks() const {
  return impl_->masked_ranks();
}
void MoECommunicator::clear_rank_masks() {
  impl_->clear_rank_masks();
}

}  // namespace moecomm
