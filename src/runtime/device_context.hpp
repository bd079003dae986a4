// The plain-old-data view of one rank that every kernel takes by value: peers' symmetric
// buffers, where each region lies inside them, this rank's private scratch and its error record.
// Host classes never reach a kernel; this struct is built once per communicator.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moecomm::detail {

inline constexpr int kMaxRanks = 64;  // token->rank masks are 64-bit
inline constexpr int kMaxTopk = 32;
inline constexpr int kMaxExperts = 12288;  // the layout kernel keeps a column of E words per warp
inline constexpr int kFp8Group = 128;      // channels per fp8 scale

/// What a stalled wait was waiting for; reported in TimeoutError.
enum class Phase : int32_t {
  kNone = 0,
  kLayoutCounts,  // HT/layout count exchange
  kArrive,        // a peer entering the same call (buffer free for reuse)
  kDispatchDone,  // HT dispatch: a source finished writing rows here
  kCombineReady,  // combine: a peer published its expert outputs
  kCombineDone,   // combine: a peer finished reading this rank's outputs
  kLlCounts,      // LL dispatch receive: per-(expert, source) count
  kGridBarrier,   // the blocks of one of this rank's kernels meeting between steps
};

/// One slot per kind and source rank in each rank's symmetric buffer; values are call sequence
/// numbers (monotonic, never reset).
enum class FlagKind : int32_t {
  kLayoutCounts = 0,
  kArrive,
  kDispatchDone,
  kCombineReady,
  kCombineDone,
  kCount
};

enum class DeviceErrorKind : int32_t {
  kNone = 0,
  kStall,             // phase, peer, channel, seq, observed
  kExpertOutOfRange,  // a = token, b = k, observed = value
  kDuplicateExpert,   // a = token, b = k, observed = value
  kRecvOverflow,      // a = rows needed, b = capacity
};

/// First device error of a rank, in host-mapped memory (readable without synchronising).
struct DeviceError {
  int32_t kind;
  int32_t rank;
  int32_t peer;
  int32_t phase;
  int32_t channel;
  int32_t pad;
  int64_t seq;
  int64_t observed;
  int64_t a;
  int64_t b;
};

/// Byte offsets of the regions inside every rank's symmetric buffer (identical on all ranks).
struct SymmetricLayout {
  size_t flags;          // u64 [FlagKind::kCount][kMaxRanks]
  size_t count_matrix;   // i32 [2][R][R]: row s = tokens s sends to each rank (parity = seq & 1)
  size_t expert_counts;  // i32 [2][R][L]: tokens s sends to each of this rank's experts
  size_t peer_ptrs;      // u64 [4][R][kPeerPtrs]: pointers published for a combine: slots 0-1
                         //   HT (parity = seq & 1), slots 2-3 LL (2 + buffer)
  size_t ll_count_sig;   // u64 [2][L][R]: (seq << 32) | count, per LL buffer
  // HT receive region (capacity rows)
  size_t ht_x, ht_scales, ht_topk_idx, ht_topk_weights, ht_src_token;
  // HT combine inputs copied here when they are not registered memory (process groups only)
  size_t ht_stage_y, ht_stage_weights;
  // LL regions, two buffers each: [L][R*M] slots
  size_t ll_x[2], ll_scales[2], ll_src_token[2], ll_combine[2];
  size_t total;
};
inline constexpr int kPeerPtrs = 2;  // combine: y, recv_topk_weights
/// Published addresses with this bit set are offsets into the publisher's symmetric buffer (each
/// peer resolves them through its own mapping); without it they are plain pointers, valid only
/// where every rank shares one address space.
inline constexpr uint64_t kSymmetricOffsetTag = 1ull << 63;

/// This rank's private device memory (not visible to peers).
struct LocalState {
  uint64_t* epoch;        // calls completed; the running call's seq is *epoch + 1
  uint32_t* ticket;       // last-block election within one kernel
  uint64_t* grid_barrier;  // [2]: arrivals, generation (device/block.cuh: grid_barrier)
  uint64_t* ll_seq;       // [2] seq of the LL dispatch send that filled each buffer (for the hook)
  uint64_t* combine_seq;  // [2] seq of the LL combine send phase (for its hook)
  // Routing layout scratch, sized for max_tokens_per_rank (W = words of 32 tokens).
  uint32_t* expert_bitmap;         // [E][W]
  int32_t* expert_word_prefix;     // [E][W]
  uint32_t* rank_bitmap;           // [R][W]
  int32_t* rank_word_prefix;       // [R][W]
  uint64_t* token_rank_mask;       // [Tmax]
  int32_t* num_tokens_per_rank;    // [R]
  int32_t* num_tokens_per_expert;  // [E]
  uint8_t* is_token_in_rank;       // [Tmax * R]
  int32_t* num_recv_per_rank;      // [R]
  int32_t* num_recv_per_expert;    // [L] unpadded
  int32_t* send_base;              // [R]: first row of this rank's tokens at each destination
  int32_t* aborted;                // set by the first failed wait: later waits give up
  uint64_t* rank_mask;             // bit d: rank d is masked (absent) for this rank's calls
};

struct DeviceContext {
  int32_t rank;
  int32_t num_ranks;
  int32_t num_experts;
  int32_t local_experts;
  int32_t topk;
  int32_t hidden;
  int32_t max_tokens;   // Tmax (HT)
  int32_t words;        // W = ceil(Tmax / 32)
  int64_t ht_capacity;  // HT receive rows
  int32_t ll_capacity;  // M
  int32_t one_gpu;      // every rank on this GPU: GPU-scope ordering suffices
  uint64_t timeout_ns;
  int32_t mask_on_timeout;  // a peer whose wait times out is masked instead of a stall (LL)
  int32_t* masked_by_timeout;  // [kMaxRanks] host-mapped: 1 where a wait masked that peer
  uint8_t* peers[kMaxRanks];  // symmetric base of every rank (this one included)
  SymmetricLayout sym;
  LocalState local;
  DeviceError* error;
};

}  // namespace moecomm::detail
