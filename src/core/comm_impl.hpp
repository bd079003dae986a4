// The implementation behind MoECommunicator: owns one rank's streams, private device scratch,
// handle storage and error record, and turns calls into kernel launches.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <vector>

#include "layout/layout.hpp"
#include "ll/ll.hpp"
#include "moecomm/communicator.hpp"
#include "runtime/device_context.hpp"
#include "runtime/group_state.hpp"

namespace moecomm::detail {

class SlotPool;
class CallStaging;
class StreamOrder;

/// Device metadata of one dispatch (a slot of the communicator's pool) and what the host knows.
struct HandleState {
  const void* owner = nullptr;  // the CommImpl that made it
  Mode mode = Mode::kHighThroughput;
  int64_t num_tokens = 0;
  int64_t num_recv = -1;  // HT, host-known N
  int buffer = 0;         // LL buffer
  uint64_t mask = 0;      // explicit rank mask when it was made (a cached dispatch needs it)
  std::vector<int> recv_per_expert_host;
  // Device arrays inside the slot.
  int32_t* send_row = nullptr;          // HT [T, R]
  int32_t* ll_slot = nullptr;           // LL [T, K]
  int32_t* num_recv_dev = nullptr;      // [1]
  int32_t* recv_per_expert = nullptr;   // [L] padded
  int32_t* recv_rank_prefix = nullptr;  // [R + 1]
  std::shared_ptr<SlotPool> pool;
  int slot = -1;
  ~HandleState();
};

class CommImpl {
 public:
  CommImpl(std::shared_ptr<GroupState> group, int rank);
  ~CommImpl();

  int rank() const { return rank_; }
  int num_ranks() const { return group_->num_ranks; }
  int device() const { return device_; }
  const Config& config() const { return group_->config; }
  cudaStream_t stream() const { return own_stream_; }

  Layout get_layout(const TensorView& topk_idx, cudaStream_t stream);
  DispatchOutput dispatch(const DispatchArgs& args, const DispatchOptions& options);
  CombineOutput combine(const CombineArgs& args, const Handle& handle,
                        const CombineOptions& options);
  TensorView combine_buffer(const Handle& handle);
  void synchronize();
  void mask_rank(int rank, bool masked);
  std::vector<int> masked_ranks() const;
  void clear_rank_masks();
  /// Raises the first recorded device error (TimeoutError for a stall; InvalidArgument for bad
  /// topk_idx or an overflowing receive capacity).
  void check_errors();

  /// One LL call of every rank of a one-GPU group as one kernel (VirtualGroup::dispatch_all /
  /// combine_all): while set, an LL call records its rank's kernel parameters here instead of
  /// launching, and the group launches once. With validate_only the call returns after its
  /// argument checks, before it changes any state (the group checks every rank first).
  struct GroupCall {
    bool validate_only = false;
    std::vector<DeviceContext> ctx;
    std::vector<ll::DispatchSendParams> dispatch;
    std::vector<ll::CombineRecvParams> combine;
    /// Each rank's temporaries (unaligned tensors), finished on its stream after the launch.
    std::vector<std::shared_ptr<CallStaging>> staging;
  };
  void set_group_call(GroupCall* call) { group_call_ = call; }
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
  DispatchOutput dispatch_ll(const DispatchArgs& args, const DispatchOptions& options);
  CombineOutput combine_ht(const CombineArgs& args, HandleState& h, const CombineOptions& o);
  CombineOutput combine_ll(const CombineArgs& args, HandleState& h, const CombineOptions& o);

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
  int32_t* ll_recv_count_ = nullptr;        // [2][L]
  int32_t* ll_recv_layout_ = nullptr;       // [2][L*R*2]
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
  GroupCall* group_call_ = nullptr;
  std::shared_ptr<StreamOrder> order_;  // shared with receive hooks
};

}  // namespace moecomm::detail
