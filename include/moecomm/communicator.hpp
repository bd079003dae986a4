// MoECommunicator: dispatch tokens to the ranks that hold their experts, combine the experts'
// outputs back. One communicator per rank; create them through a group (group.hpp).
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <vector>

#include "moecomm/config.hpp"
#include "moecomm/handle.hpp"
#include "moecomm/tensor.hpp"

namespace moecomm {

namespace detail {
class CommImpl;
}

/// The routing layout of one batch (get_layout). Device tensors owned by the communicator,
/// valid until its next collective call.
struct Layout {
  TensorView num_tokens_per_rank;         ///< [R] i32: distinct tokens this rank sends to r
  TensorView num_tokens_per_expert;       ///< [E] i32: tokens of this rank that selected e
  TensorView is_token_in_rank;            ///< [T, R] u8: 1 if token t goes to rank r
  TensorView num_recv_tokens_per_rank;    ///< [R] i32: rows this rank receives from each peer
  TensorView num_recv_tokens_per_expert;  ///< [L] i32: received (token, local expert) pairs
  /// [N] i32: distinct tokens this rank sends to each node (DeepEP's num_tokens_per_rdma_rank);
  /// a group on one node leaves it absent.
  TensorView num_tokens_per_node;
};

/// HT output sizing.
enum class Sizing {
  kExact,      ///< the host learns N_recv (one count exchange + a host wait); outputs have N rows
  kWorstCase,  ///< outputs have the receive capacity rows; N stays on the device; no host sync
};

/// Inputs of dispatch. x is bf16 [T, H], or fp8 e4m3 [T, H] with x_scales f32 [T, H/128].
/// topk_idx is i64 or i32 [T, K] with -1 for "no expert"; topk_weights f32 [T, K] is optional.
struct DispatchArgs {
  TensorView x;
  TensorView x_scales;
  TensorView topk_idx;
  TensorView topk_weights;
};

struct DispatchOptions {
  /// bf16 x is quantised to fp8 e4m3 (+ f32 scales per 128 channels) on the way.
  bool quantize_fp8 = false;
  /// HT only.
  Sizing sizing = Sizing::kExact;
  /// HT only: reuse this handle's routing (same topk_idx promised): no layout, no count exchange.
  const Handle* previous_handle = nullptr;
  /// Stream the work is ordered on; nullptr: this rank's own stream (stream()). Co-located
  /// virtual ranks must use different streams.
  cudaStream_t stream = nullptr;
  /// Run on the communicator's internal stream after `stream`'s prior work; the result's event
  /// marks completion (overlap with compute on `stream`).
  bool async = false;
  /// LL only: return after the send phase; DispatchOutput::hook runs the receive phase.
  bool return_recv_hook = false;
};

/// Outputs of dispatch: views of the communicator's registered buffers (zero-copy), valid until
/// the next dispatch (HT) or the next-but-one dispatch (LL: two buffers alternate).
struct DispatchOutput {
  Mode mode = Mode::kHighThroughput;  ///< the path taken (Auto resolves here)

  /// HT: [N, H] (exact) or [capacity, H] (worst case), rows ordered by source rank, then source
  /// token. LL: [L, R*M, H]; slots of source s for local expert e: [e][s*M, s*M + count).
  TensorView recv_x;
  TensorView recv_x_scales;  ///< fp8 only: f32 [.., H/128] beside recv_x

  // --- HT ---
  TensorView recv_topk_idx;      ///< [N, K] i64 local expert ids, -1 where the expert is remote
  TensorView recv_topk_weights;  ///< [N, K] f32, 0 where recv_topk_idx is -1 (if weights given)
  TensorView recv_src_token;     ///< [N] i32: source token index of each row
  TensorView recv_rank_prefix;   ///< [R + 1] i32: rows from source s are [p[s], p[s+1])
  TensorView num_recv_tokens_per_expert;  ///< [L] i32 device, padded to expert_alignment
  TensorView num_recv_tokens_device;      ///< [1] i32 device: N
  int64_t num_recv_tokens = -1;           ///< N on the host (exact/cached); -1 in worst case
  std::vector<int> num_recv_tokens_per_expert_host;  ///< padded counts on the host (exact/cached)

  // --- LL ---
  TensorView recv_count;     ///< [L] i32: received tokens per local expert
  TensorView recv_src_info;  ///< [L, R*M] i32: source token index of each valid slot
  TensorView recv_layout;    ///< [L, R, 2] i32: (offset, count) per (local expert, source rank)

  Handle handle;
  Event event;    ///< set when DispatchOptions::async
  RecvHook hook;  ///< set when DispatchOptions::return_recv_hook
};

/// Inputs of combine.
/// HT: y bf16 [N, H] (one row per received row); optional recv_topk_weights f32 [N, K] (then
///     CombineOutput::combined_topk_weights is returned) and bias bf16 [T, H].
/// LL: y bf16 [L, R*M, H] (or the buffer from combine_buffer()); topk_weights f32 [T, K].
struct CombineArgs {
  TensorView y;
  TensorView topk_weights;
  TensorView recv_topk_weights;
  TensorView bias;
};

struct CombineOptions {
  cudaStream_t stream = nullptr;
  bool async = false;
  bool return_recv_hook = false;  ///< LL only
  /// Optional caller-owned output bf16 [T, H]; absent: a view of the communicator's buffer,
  /// valid until the next combine.
  TensorView out;
};

struct CombineOutput {
  TensorView out;                    ///< [T, H] bf16
  TensorView combined_topk_weights;  ///< HT, [T, K] f32: sum over ranks of recv_topk_weights
  Event event;
  RecvHook hook;
};

/// When the phases of one call ran on the device, for profiling (docs/bench.md, "Where the time
/// goes"): nanoseconds of the GPU's global timer, one clock for every SM of a GPU (ranks on one
/// GPU can be compared), 0 where the call has no such phase. Every call records them: one atomic
/// per block and phase. A phase's time is when the last block passed it.
struct CallTrace {
  uint64_t first_block_start = 0;  ///< the call's first block began
  uint64_t last_block_start = 0;   ///< the call's last block began
  /// Every block passed the opening round: the layout with its count exchange (dispatch), the
  /// peers' arrival (cached HT dispatch), their published outputs (combine).
  uint64_t opened = 0;
  uint64_t streamed = 0;  ///< every block moved its rows
  /// The closing round is done: every peer signalled completion (HT, LL combine), the counts
  /// are published (LL dispatch).
  uint64_t closed = 0;
  /// LL dispatch: the receive phase has every count (with a receive hook, recorded if the hook
  /// ran before the rank's next call closed).
  uint64_t received = 0;
};

/// One rank's endpoint. All calls except the accessors are collective: every rank of the group
/// makes the same sequence of calls. Not thread-safe for one rank; distinct ranks may be driven
/// from distinct threads (VirtualGroup::parallel_for).
class MoECommunicator {
 public:
  ~MoECommunicator();
  MoECommunicator(const MoECommunicator&) = delete;
  MoECommunicator& operator=(const MoECommunicator&) = delete;

  int rank() const;
  int num_ranks() const;
  /// Nodes the group spans (1 within one node); rank r is on node r / (num_ranks / num_nodes).
  int num_nodes() const;
  int device() const;
  const Config& config() const;
  /// This rank's own stream (the default for every call).
  cudaStream_t stream() const;

  /// Routing layout of topk_idx and the count exchange with every peer (collective).
  Layout get_layout(const TensorView& topk_idx, cudaStream_t stream = nullptr);

  /// Dispatch: see DESIGN.md and docs/api.md for the exact semantics of each mode.
  DispatchOutput dispatch(const DispatchArgs& args, const DispatchOptions& options = {});
  /// Combine: the transpose of dispatch. `handle` comes from this rank's dispatch.
  CombineOutput combine(const CombineArgs& args, const Handle& handle,
                        const CombineOptions& options = {});

  /// LL: the registered buffer bf16 [L, R*M, H] that combine reads for `handle`: an expert MLP
  /// that writes its output here saves a copy (zero-copy combine).
  TensorView combine_buffer(const Handle& handle);

  /// Waits for all of this rank's work (its streams, and receive hooks run on other streams) and
  /// raises any recorded device error (stall, overflow, bad topk_idx).
  void synchronize();
  /// Raises any device error recorded so far without waiting.
  void check_errors();
  /// The phase times of this rank's last completed call (a device-to-host copy: call it once the
  /// call has completed, e.g. after synchronize()).
  CallTrace last_call_trace() const;

  // --- Masked ranks (fault tolerance) -------------------------------------------------------
  // A masked rank takes no part in this rank's calls: nothing is sent to it or awaited from it,
  // tokens routed to its experts are dropped (its experts contribute zero to combine), and it
  // sends nothing. For high-throughput calls every live rank must mask the same ranks (their
  // count exchange derives every rank's rows from the same counts). A rank that masks itself is
  // out of the group: its calls complete alone, in step with the group's, so that clearing the
  // masks on every rank lets it rejoin. A rank that died cannot rejoin: form a new group.

  /// Masks (or unmasks) `rank` from this rank's next call on; ordered on this rank's stream.
  void mask_rank(int rank, bool masked = true);
  /// Ranks masked now: by mask_rank, or by a low-latency wait that timed out under
  /// Config::mask_unresponsive_ranks (complete once synchronize() has returned). Ascending.
  std::vector<int> masked_ranks() const;
  /// Unmasks every rank (from the next call on).
  void clear_rank_masks();

 private:
  // Communicators are made by the groups (VirtualGroup, ProcessGroupBuilder::connect).
  friend class VirtualGroup;
  friend class ProcessGroupBuilder;
  explicit MoECommunicator(std::unique_ptr<detail::CommImpl> impl);

  std::unique_ptr<detail::CommImpl> impl_;
};

}  // namespace moecomm
