// The implementation behind MoECommunicator: owns one rank's streams, private device scratch,
// handle storage and error record, and turns calls into kernel launches. Its definitions are
// split by concern: comm_impl.cpp (construction, device errors, checks both paths share, the
// choice of path), ht_calls.cpp and ll_calls.cpp (one path each), handle_pool.cpp (handles),
// call_streams.cpp (where a call runs) and rank_masks.cpp (masked ranks). It talks to the paths
// through their host-side headers only; no kernel header is included here.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <vector>

#include "layout/layout.hpp"
#include "ll/group_plan.hpp"
#include "ll/ll.hpp"
#include "moecomm/communicator.hpp"
#include "paths/device_context.hpp"
#include "runtime/group_state.hpp"

namespace moecomm::detail {

class CallStaging;
class SlotPool;
class StreamOrder;
struct HandleState;

class CommImpl {
 public:
  CommImpl(std::shared_ptr<GroupState> group, int rank);
  ~CommImpl();

  int rank() const { return rank_; }
  int num_ranks() const { return group_->num_ranks; }
  int num_nodes() const { return group_->shape.num_nodes; }
  int device() const { return device_; }
  const Config& config() const { return group_->config; }
  cudaStream_t stream() const { return own_stream_; }

  /// One LL call of every rank of a one-GPU group as one kernel (VirtualGroup::dispatch_all /
  /// combine_all). A call given one checks its arguments and, unless the plan only validates,
  /// records its kernel parameters in the LL path's plan instead of launching. Each rank's
  /// temporaries (unaligned tensors) wait here to be finished on its stream after the group's
  /// launch.
  struct GroupCall {
    explicit GroupCall(ll::GroupPlan& p) : plan(p) {}
    ll::GroupPlan& plan;
    std::vector<std::shared_ptr<CallStaging>> staging;
  };

  Layout get_layout(const TensorView& topk_idx, cudaStream_t stream);
  /// With `group`, the call joins a one-launch group call (LL only).
  DispatchOutput dispatch(const DispatchArgs& args, const DispatchOptions& options,
                          GroupCall* group = nullptr);
  CombineOutput combine(const CombineArgs& args, const Handle& handle,
                        const CombineOptions& options, GroupCall* group = nullptr);
  TensorView combine_buffer(const Handle& handle);
  void synchronize();
  /// Masked ranks (core/rank_masks.cpp).
  void mask_rank(int rank, bool masked);
  std::vector<int> masked_ranks() const;
  void clear_rank_masks();
  /// Raises the first recorded device error (TimeoutError for a stall; InvalidArgument for bad
  /// topk_idx or an overflowing receive capacity).
  void check_errors();
  CallTrace last_call_trace() const;
  /// " (node n)" for a peer of a group that spans nodes; empty otherwise.
  std::string node_of(int peer) const;

  /// A group dispatch failed on a later rank after this one recorded its call: take back the
  /// buffer parity it advanced, so that every rank stays in step.
  void undo_group_dispatch() { --ll_calls_; }
  /// Work of this rank was enqueued on `stream` outside its own calls (a group launch it joined):
  /// its next call on another stream follows it.
  void note_stream_work(cudaStream_t stream);

 private:
  struct Streams {
    cudaStream_t caller;  // where the caller ordered the call
    cudaStream_t exec;    // where the kernels run
  };
  Streams begin_call(cudaStream_t requested, bool async);
  Event end_call(const Streams& s, bool async);
  std::shared_ptr<HandleState> new_handle(Mode mode, int64_t num_tokens);
  HandleState& handle_state(const Handle& handle, Mode expected, const char* call);
  /// The layout steps' parameters for this call (run by the layout kernel or as the first steps
  /// of HT dispatch / LL send). host_token != 0: exact sizing (counts to mapped host memory).
  layout::LayoutParams layout_params(const TensorView& topk_idx, bool exchange, bool close,
                                     HandleState* state, uint64_t host_token) const;
  Mode resolve_mode(int64_t num_tokens) const;
  void check_topk(const DispatchArgs& args, int64_t T) const;

  DispatchOutput dispatch_ht(const DispatchArgs& args, const DispatchOptions& options);
  DispatchOutput dispatch_ll(const DispatchArgs& args, const DispatchOptions& options,
                             GroupCall* group);
  CombineOutput combine_ht(const CombineArgs& args, HandleState& h, const CombineOptions& o);
  CombineOutput combine_ll(const CombineArgs& args, HandleState& h, const CombineOptions& o,
                           GroupCall* group);

  /// How peers find a combine input: its offset in this rank's symmetric buffer if it lies
  /// there; else the pointer itself where every rank shares this address space; else (process
  /// groups) a copy into the staging region at `stage_offset`.
  uint64_t publish(const void* ptr, size_t bytes, size_t stage_offset, size_t stage_bytes,
                   const char* name, cudaStream_t stream);
  TensorView local_view(void* data, DType dtype, std::initializer_list<int64_t> shape) const;
  /// The context for high-throughput kernels and the layout: never masks on a time-out (their
  /// count exchange needs every rank to agree on the mask).
  DeviceContext exchange_ctx() const;
  /// Changes the device mask word in stream order (bits in `set` on, bits in `clear` off).
  void update_mask(uint64_t set, uint64_t clear);
  TensorView sym_view(size_t offset, DType dtype, std::initializer_list<int64_t> shape) const;

  std::shared_ptr<GroupState> group_;
  int rank_;
  int device_;
  cudaStream_t own_stream_ = nullptr;
  cudaStream_t async_stream_ = nullptr;
  DeviceContext ctx_{};
  DeviceError* error_host_ = nullptr;       // mapped
  void* local_mem_ = nullptr;               // all private scratch, one allocation
  uint16_t* combine_out_ = nullptr;         // [Tmax, H]
  float* combine_weights_ = nullptr;        // [Tmax, K]
  int32_t* masked_by_timeout_ = nullptr;    // mapped [kMaxRanks]: peers a wait masked
  uint64_t explicit_mask_ = 0;              // mask_rank's bits (the device word may hold more)
  int32_t* host_counts_ = nullptr;          // mapped: [1 + L], written by the layout kernel
  volatile uint64_t* host_flag_ = nullptr;  // mapped: the token of the last exact dispatch
  int32_t* host_counts_dev_ = nullptr;      // device aliases of the two
  uint64_t* host_flag_dev_ = nullptr;
  uint64_t host_token_ = 0;
  /// Polls host_flag_ until `token` (exact sizing); raises a device error or a time-out.
  void wait_host_counts(uint64_t token);
  std::shared_ptr<SlotPool> pool_;
  int64_t ll_calls_ = 0;
  bool failed_ = false;
  std::shared_ptr<StreamOrder> order_;  // shared with receive hooks
};

}  // namespace moecomm::detail
