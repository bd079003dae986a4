// The runtime's part of the plain-old-data view of one rank that every kernel takes by value:
// the group's shape, peers' symmetric buffers, the runtime's own regions and the error record.
// It names no path's regions: each path declares those in its own folder (*/regions.hpp) and
// paths/device_context.hpp puts them together. Host classes never reach a kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/limits.hpp"

namespace moecomm::detail {

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
  kRdmaCounts,    // internode: a remote node's counts (through the RDMA engine)
  kRdmaData,      // internode: a remote node's rows (dispatch) or partial sums (combine)
  kRdmaArrive,    // internode: a remote rank entering the call (its window is free)
  kCombineLoad,   // combine: a bulk load of a peer's row landing in shared memory
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
  kRdmaOutOfWindow,   // an RDMA put or signal outside the peer's window: a = offset, b = bytes
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

/// The runtime's own region of every rank's symmetric buffer (byte offset, identical on all
/// ranks). Each path's regions are in its own part of the DeviceContext (paths/device_context.hpp).
struct CommonSymmetric {
  size_t flags;  // u64 [FlagKind::kCount][kMaxRanks]
};
/// Addresses a path publishes for its peers (a combine's inputs) are entries of kPeerPtrs words.
inline constexpr int kPeerPtrs = 2;  // combine: y, recv_topk_weights
/// Published addresses with this bit set are offsets into the publisher's symmetric buffer (each
/// peer resolves them through its own mapping); without it they are plain pointers, valid only
/// where every rank shares one address space.
inline constexpr uint64_t kSymmetricOffsetTag = 1ull << 63;

/// The phases of a call whose global-timer time every call records, by atomic max of each
/// block's time (device/trace.cuh); read through MoECommunicator::last_call_trace.
enum class TraceMark : int32_t {
  kFirstStart = 0,  // the first block of the call's first kernel began (stored inverted: ~t)
  kLastStart,       // the last block of that kernel began
  kOpened,          // every block has passed the opening round
  kStreamed,        // every block has moved its rows
  kClosed,          // the closing round is done (the call's last kernel)
  kReceived,        // LL dispatch: the receive phase has every count
  kCount
};
inline constexpr int kTraceMarks = static_cast<int>(TraceMark::kCount);

/// The runtime's own private device memory of a rank (not visible to peers).
struct CommonLocal {
  uint64_t* epoch;         // calls completed; the running call's seq is *epoch + 1
  uint32_t* ticket;        // last-block election within one kernel
  uint32_t* work_queue;    // next work unit a warp takes (device/block.cuh: WorkQueue)
  uint64_t* grid_barrier;  // [2]: arrivals, generation (transport/barrier.cuh: grid_barrier)
  int32_t* aborted;        // set by the first failed wait: later waits give up
  uint64_t* rank_mask;     // bit d: rank d is masked (absent) for this rank's calls
  uint64_t* trace;         // [2][kTraceMarks]: marks of the calls of even and odd seq
};

/// RdmaContext::engine: which engine carries this group's traffic between nodes.
inline constexpr uint32_t kRdmaEngineLoopback = 0;
inline constexpr uint32_t kRdmaEngineGin = 1;  // NCCL GIN (transport/impl/gin.cuh)

/// The RDMA engine's view of this rank (transport/rdma.cuh): where the window lies in every
/// rank's symmetric buffer, the loopback engine's NIC model, and the GIN engine's handles.
struct RdmaContext {
  uint64_t window_bytes;     // the window is [0, window_bytes) of each symmetric buffer
  uint32_t nic_model;        // 1: puts complete at the modelled bandwidth and latency
  float nic_bytes_per_ns;    // modelled bandwidth (GB/s == bytes/ns)
  uint64_t nic_latency_ns;   // modelled latency of a signal after its data
  uint64_t* nic_busy_until;  // private: global-timer ns at which this rank's NIC is free
  uint32_t engine;           // kRdmaEngineLoopback or kRdmaEngineGin
  const void* gin_comm;      // GIN: the ncclDevComm, in device memory
  void* gin_window;          // GIN: the ncclWindow_t of the symmetric buffer
};

/// What every kernel knows of its rank whatever the path: the group's shape, the peers'
/// symmetric buffers, the runtime's own regions and the error record. Kernels take the
/// DeviceContext (paths/device_context.hpp), which adds each path's regions to this.
struct RankContext {
  int32_t rank;
  int32_t num_ranks;
  int32_t num_experts;
  int32_t local_experts;
  int32_t topk;
  int32_t hidden;
  int32_t max_tokens;  // Tmax: largest T of any call
  int32_t words;       // W = ceil(Tmax / 32)
  int32_t one_gpu;     // every rank on this GPU: GPU-scope ordering suffices
  int32_t num_nodes;   // N: ranks on different nodes talk only through the RDMA engine
  int32_t node_size;   // G = R / N ranks per node; rank r is on node r / G
  int32_t node;        // this rank's node
  uint64_t timeout_ns;
  int32_t mask_on_timeout;     // a peer whose wait times out is masked instead of a stall (LL)
  int32_t* masked_by_timeout;  // [kMaxRanks] host-mapped: 1 where a wait masked that peer
  uint8_t* peers[kMaxRanks];   // symmetric base of every rank (this one included)
  CommonSymmetric sym;
  CommonLocal local;
  RdmaContext rdma;
  DeviceError* error;
};

}  // namespace moecomm::detail
