// The communicator's lifecycle and what every call shares: building one rank's streams, private
// memory and device context; raising device errors; argument checks common to both paths; and
// the two entry points, which pick the HT or LL path (ht_calls.cpp, ll_calls.cpp).
#include "core/comm_impl.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "core/handle_state.hpp"
#include "core/stream_order.hpp"
#include "core/validate.hpp"
#include "ht/intranode.hpp"
#include "internode/internode.hpp"
#include "layout/layout.hpp"
#include "ll/ll.hpp"
#include "moecomm/error.hpp"
#include "paths/regions.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/stream_warmup.hpp"
#include "runtime/streams.hpp"
#include "transport/gin_engine.hpp"
#include "transport/rank_mask.hpp"

namespace moecomm::detail {

namespace {

/// How a TimeoutError names the phase a stalled wait was in (transport records only the number).
const char* phase_name(int phase) {
  switch (static_cast<Phase>(phase)) {
    case Phase::kLayoutCounts:
      return "count exchange";
    case Phase::kArrive:
      return "arrival (peer entering the same call)";
    case Phase::kDispatchDone:
      return "HT dispatch: rows written";
    case Phase::kCombineReady:
      return "combine: outputs published";
    case Phase::kCombineDone:
      return "combine: outputs read";
    case Phase::kLlCounts:
      return "LL dispatch: per-expert counts";
    case Phase::kGridBarrier:
      return "grid barrier (blocks of one kernel)";
    case Phase::kRdmaCounts:
      return "internode: counts over RDMA";
    case Phase::kRdmaData:
      return "internode: rows or partial sums over RDMA";
    case Phase::kRdmaArrive:
      return "internode: arrival over RDMA (peer entering the same call)";
    case Phase::kCombineLoad:
      return "combine: bulk load of a peer's row";
    case Phase::kNone:
      break;
  }
  return "?";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
CommImpl::CommImpl(std::shared_ptr<GroupState> group, int rank)
    : group_(std::move(group)), rank_(rank), device_(group_->device_of[rank]) {
  DeviceGuard guard(device_);
  const Config& c = group_->config;
  const RegionShape& shape = group_->shape;
  const int R = shape.num_ranks, L = shape.local_experts, K = shape.topk, H = shape.hidden;
  const int Tmax = shape.max_tokens;

  // Everything that may wait for the device to go idle happens here, before any rank's kernel
  // spins: loading the kernels (CUDA loads them lazily at first launch), creating and warming
  // the streams, mapped host allocations and the device synchronisation at the end.
  layout::preload_kernels();
  ht::preload_kernels();
  if (shape.num_nodes > 1) internode::preload_kernels();
  ll::preload_kernels();
  transport::preload_rank_mask_kernel();
  MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&async_stream_, cudaStreamNonBlocking));
  warm_up_stream(own_stream_);
  warm_up_stream(async_stream_);
  order_ = std::make_shared<StreamOrder>(device_);
  group_->claim_stream(rank_, own_stream_);
  group_->claim_stream(rank_, async_stream_);
  // The error record, the exact-sizing counts and their flag live in mapped host memory: the
  // host reads them without a CUDA call, so it can watch a kernel that is still running.
  MOECOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(DeviceError),
                                   cudaHostAllocMapped));
  std::memset(error_host_, 0, sizeof(DeviceError));
  MOECOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&masked_by_timeout_),
                                   sizeof(int32_t) * kMaxRanks, cudaHostAllocMapped));
  std::memset(masked_by_timeout_, 0, sizeof(int32_t) * kMaxRanks);
  MOECOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_counts_),
                                   sizeof(int32_t) * (1 + L), cudaHostAllocMapped));
  MOECOMM_CUDA_CHECK(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_counts_dev_), host_counts_, 0));
  uint64_t* flag = nullptr;
  MOECOMM_CUDA_CHECK(
      cudaHostAlloc(reinterpret_cast<void**>(&flag), sizeof(uint64_t), cudaHostAllocMapped));
  *flag = 0;
  host_flag_ = flag;
  MOECOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_flag_dev_), flag, 0));

  // Private memory, one allocation: every path's regions and this communicator's outputs.
  // Measured first, then carved; the symmetric offsets come out as the group's plan made them.
  auto claim = [&](RankArenas& arenas) {
    claim_regions(c, shape, arenas, ctx_);
    combine_out_ = arenas.local.take<uint16_t>(static_cast<size_t>(Tmax) * H);
    combine_weights_ = arenas.local.take<float>(static_cast<size_t>(Tmax) * K);
  };
  RankArenas measure(c);
  claim(measure);
  MOECOMM_CUDA_CHECK(cudaMalloc(&local_mem_, measure.local.size()));
  MOECOMM_CUDA_CHECK(cudaMemset(local_mem_, 0, measure.local.size()));
  RankArenas arenas(c, local_mem_);
  claim(arenas);
  // The group allocated the symmetric buffers from the same list: a mismatch is a bug.
  if (arenas.symmetric.size() != group_->plan.bytes)
    throw Error("internal: the regions of rank " + std::to_string(rank_) +
                " do not match the group's symmetric buffer");

  ctx_.rank = rank_;
  ctx_.num_ranks = R;
  ctx_.num_experts = shape.num_experts;
  ctx_.local_experts = L;
  ctx_.topk = K;
  ctx_.hidden = H;
  ctx_.max_tokens = Tmax;
  ctx_.words = shape.words;
  ctx_.timeout_ns = static_cast<uint64_t>(c.timeout_seconds * 1e9);
  ctx_.mask_on_timeout = c.mask_unresponsive_ranks ? 1 : 0;
  MOECOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.masked_by_timeout),
                                              masked_by_timeout_, 0));
  ctx_.one_gpu = 1;  // GPU-scope ordering when every rank shares this device in this process
  for (int r = 0; r < R; ++r)
    if (!group_->single_address_space || group_->device_of[r] != device_) ctx_.one_gpu = 0;
  for (int r = 0; r < R; ++r) ctx_.peers[r] = group_->sym_base[r];
  ctx_.num_nodes = shape.num_nodes;
  ctx_.node_size = shape.node_size;
  ctx_.node = rank_ / shape.node_size;
  ctx_.rdma.nic_model = c.nic_model_gbps > 0.0 ? 1 : 0;
  ctx_.rdma.nic_bytes_per_ns = static_cast<float>(c.nic_model_gbps);
  ctx_.rdma.nic_latency_ns = static_cast<uint64_t>(c.nic_model_latency_us * 1e3);
  ctx_.rdma.engine = group_->gin ? kRdmaEngineGin : kRdmaEngineLoopback;
  ctx_.rdma.gin_comm = group_->gin ? group_->gin->device_comm() : nullptr;
  ctx_.rdma.gin_window = group_->gin ? group_->gin->window() : nullptr;
  MOECOMM_CUDA_CHECK(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.error), error_host_, 0));

  // A handle slot holds HT send rows [Tmax, R], LL slots [M, K], then the summary copied out in
  // one piece: N, per-expert counts [L], rank prefix [R + 1]; then, when the group spans nodes
  // and serves HT, the internode path's arrays (internode::HandleArrays).
  const size_t slot_ints = static_cast<size_t>(c.max_tokens_per_rank) * R +
                           static_cast<size_t>(std::max(ctx_.ll.capacity, 1)) * K + 2 + L + R +
                           internode::handle_ints(Tmax, R, ctx_.internode.num_nodes);
  pool_ = std::make_shared<SlotPool>(device_, slot_ints);
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

// Errors are ignored here: a destructor must not throw, and a failed group may leave the device
// in an error state that every call reports.
CommImpl::~CommImpl() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  cudaStreamSynchronize(own_stream_);
  cudaStreamDestroy(own_stream_);
  if (async_stream_) {
    cudaStreamSynchronize(async_stream_);
    cudaStreamDestroy(async_stream_);
  }
  cudaFree(local_mem_);
  cudaFreeHost(error_host_);
  cudaFreeHost(masked_by_timeout_);
  cudaFreeHost(host_counts_);
  cudaFreeHost(const_cast<uint64_t*>(host_flag_));
  cudaSetDevice(prev);
}

// ---------------------------------------------------------------------------------------------
CallTrace CommImpl::last_call_trace() const {
  DeviceGuard guard(device_);
  uint64_t epoch = 0;
  uint64_t marks[2 * kTraceMarks] = {};
  MOECOMM_CUDA_CHECK(cudaMemcpy(&epoch, ctx_.local.epoch, sizeof(epoch), cudaMemcpyDeviceToHost));
  MOECOMM_CUDA_CHECK(cudaMemcpy(marks, ctx_.local.trace, sizeof(marks), cudaMemcpyDeviceToHost));
  const uint64_t* m = marks + (epoch & 1) * kTraceMarks;  // the slot of call seq == epoch
  auto at = [&](TraceMark k) { return m[static_cast<int>(k)]; };
  CallTrace t;
  t.first_block_start = at(TraceMark::kFirstStart) ? ~at(TraceMark::kFirstStart) : 0;
  t.last_block_start = at(TraceMark::kLastStart);
  t.opened = at(TraceMark::kOpened);
  t.streamed = at(TraceMark::kStreamed);
  t.closed = at(TraceMark::kClosed);
  t.received = at(TraceMark::kReceived);
  return t;
}

// A stall leaves the group unusable: peers may be blocked inside a call that will never match,
// so every later call raises at once. Bad input and overflow are per call: the record is cleared
// and the communicator stays usable.
void CommImpl::check_errors() {
  if (failed_)
    throw TimeoutError("rank " + std::to_string(rank_) +
                       ": the group stalled earlier and is unusable; create a new group");
  volatile DeviceError* e = error_host_;
  const int kind = e->kind;
  if (kind <= 0) return;  // -1: a kernel is still writing the record (it publishes kind last)
  const DeviceError copy{e->kind, e->rank, e->peer,     e->phase, e->channel,
                         e->pad,  e->seq,  e->observed, e->a,     e->b};
  switch (static_cast<DeviceErrorKind>(kind)) {
    case DeviceErrorKind::kStall:
      failed_ = true;
      throw TimeoutError("rank " + std::to_string(copy.rank) + " waited more than " +
                         std::to_string(config().timeout_seconds) + " s for peer " +
                         std::to_string(copy.peer) + node_of(copy.peer) + " in phase '" +
                         phase_name(copy.phase) + "' (channel " + std::to_string(copy.channel) +
                         ", call " + std::to_string(copy.seq) + ", flag at " +
                         std::to_string(copy.observed) +
                         "); did every rank make the same calls? The group is now unusable");
    case DeviceErrorKind::kExpertOutOfRange:
      e->kind = 0;
      throw InvalidArgument("topk_idx: rank " + std::to_string(rank_) + ", token " +
                            std::to_string(copy.a) + ", k " + std::to_string(copy.b) +
                            " names expert " + std::to_string(copy.observed) +
                            "; expected -1 <= id < " + std::to_string(config().num_experts));
    case DeviceErrorKind::kDuplicateExpert:
      e->kind = 0;
      throw InvalidArgument("topk_idx: rank " + std::to_string(rank_) + ", token " +
                            std::to_string(copy.a) + " names expert " +
                            std::to_string(copy.observed) + " twice (again at k " +
                            std::to_string(copy.b) + "); expected distinct experts per row");
    case DeviceErrorKind::kRecvOverflow:
      e->kind = 0;  // seen by every rank of the call (each checks the whole count matrix)
      throw InvalidArgument("Config.max_recv_tokens: rank " + std::to_string(copy.peer) +
                            " must receive " + std::to_string(copy.a) + " rows but holds " +
                            std::to_string(copy.b) +
                            "; rows past it were dropped on every rank; raise it (0 = the worst "
                            "case)");
    case DeviceErrorKind::kRdmaOutOfWindow:
      failed_ = true;
      throw Error("internal: rank " + std::to_string(copy.rank) +
                  " addressed an RDMA put or signal outside the window (offset " +
                  std::to_string(copy.a) + ", " + std::to_string(copy.b) + " bytes, window " +
                  std::to_string(config().rdma_bytes) + " bytes); the group is now unusable");
    case DeviceErrorKind::kNone:
      break;
  }
}

std::string CommImpl::node_of(int peer) const {
  const int G = ctx_.node_size;
  if (ctx_.num_nodes <= 1 || peer < 0 || G <= 0) return "";
  return " (node " + std::to_string(peer / G) + (peer / G == ctx_.node ? ", this node)" : ")");
}

// Exact sizing needs N on the host before dispatch returns. The kernel writes the counts to
// mapped memory and then the token; polling memory (no CUDA call) keeps this thread from holding
// a driver lock that a co-located rank's launch may need.
void CommImpl::wait_host_counts(uint64_t token) {
  // Twice the device time-out: a stalled wait on the device gives up first and still writes.
  const auto limit = std::chrono::steady_clock::now() +
                     std::chrono::duration<double>(2 * config().timeout_seconds + 1);
  for (uint32_t spin = 0; *host_flag_ != token; ++spin) {
    if ((spin & 1023u) == 0) {
      check_errors();
      if (std::chrono::steady_clock::now() > limit) {
        failed_ = true;
        throw TimeoutError(
            "rank " + std::to_string(rank_) +
            ": the count exchange of an exact "
            "dispatch did not finish within " +
            std::to_string(2 * config().timeout_seconds + 1) +
            " s and no device wait reported a stall; is every rank's dispatch launched?");
      }
      std::this_thread::yield();
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);  // the counts were written before the token
  check_errors();
}

void CommImpl::synchronize() {
  DeviceGuard guard(device_);
  MOECOMM_CUDA_CHECK(cudaStreamSynchronize(own_stream_));
  if (async_stream_) MOECOMM_CUDA_CHECK(cudaStreamSynchronize(async_stream_));
  order_->synchronize();  // a receive hook run on another stream
  check_errors();
}

// Peers read a combine's input straight from its owner. Registered memory is published as an
// offset (each peer maps the buffer at its own address); in one address space any pointer will
// do; across processes an unregistered tensor is copied into the staging region first.
uint64_t CommImpl::publish(const void* ptr, size_t bytes, size_t stage_offset, size_t stage_bytes,
                           const char* name, cudaStream_t stream) {
  const uint8_t* base = group_->sym_base[rank_];
  const uint8_t* p = static_cast<const uint8_t*>(ptr);
  if (p >= base && p + bytes <= base + group_->plan.bytes)
    return static_cast<uint64_t>(p - base) | kSymmetricOffsetTag;
  if (group_->single_address_space || bytes == 0) return reinterpret_cast<uint64_t>(ptr);
  if (bytes > stage_bytes)
    throw InvalidArgument(std::string(name) + ": " + std::to_string(bytes) +
                          " bytes do not fit the registered staging area (" +
                          std::to_string(stage_bytes) + " bytes)");
  MOECOMM_CUDA_CHECK(cudaMemcpyAsync(group_->sym_base[rank_] + stage_offset, ptr, bytes,
                                     cudaMemcpyDeviceToDevice, stream));
  return static_cast<uint64_t>(stage_offset) | kSymmetricOffsetTag;
}

TensorView CommImpl::local_view(void* data, DType dtype,
                                std::initializer_list<int64_t> shape) const {
  return TensorView::contiguous(data, dtype, shape, device_);
}

TensorView CommImpl::sym_view(size_t offset, DType dtype,
                              std::initializer_list<int64_t> shape) const {
  return TensorView::contiguous(group_->sym_base[rank_] + offset, dtype, shape, device_);
}

// Every rank must resolve a call to the same path (Config::auto_low_latency_max_tokens says so).
Mode CommImpl::resolve_mode(int64_t num_tokens) const {
  const Config& c = config();
  if (c.mode != Mode::kAuto) return c.mode;
  return num_tokens <= c.auto_low_latency_max_tokens ? Mode::kLowLatency : Mode::kHighThroughput;
}

void CommImpl::check_topk(const DispatchArgs& args, int64_t T) const {
  const int K = config().topk;
  const std::string k = std::to_string(K);
  check_tensor(
      args.topk_idx,
      {"topk_idx", {DType::kI64, DType::kI32}, {T, K}, "[T=" + std::to_string(T) + ", " + k + "]"},
      device_);
  if (args.topk_weights.present())
    check_tensor(
        args.topk_weights,
        {"topk_weights", {DType::kF32}, {T, K}, "[T=" + std::to_string(T) + ", " + k + "]"},
        device_);
}

layout::LayoutParams CommImpl::layout_params(const TensorView& topk_idx, bool exchange, bool close,
                                             HandleState* state, uint64_t host_token) const {
  layout::LayoutParams p;
  p.topk.data = topk_idx.data;
  p.topk.is_i64 = topk_idx.dtype == DType::kI64;
  p.topk.num_tokens = topk_idx.shape[0];
  p.validate = config().validate_inputs;
  layout::ScanOptions& opt = p.scan;
  opt.exchange_counts = exchange;
  opt.close_call = close;
  opt.check_capacity = state != nullptr;  // HT dispatch writes rows; get_layout does not
  opt.expert_alignment = config().expert_alignment;
  if (state) {  // HT dispatch: the receive summary goes into the handle
    opt.recv_rank_prefix = state->recv_rank_prefix;
    opt.recv_per_expert_padded = state->recv_per_expert;
    opt.num_recv = state->num_recv_dev;
  }
  if (host_token) {
    opt.host_counts = host_counts_dev_;
    opt.host_flag = host_flag_dev_;
    opt.token = host_token;
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// The layout alone is a call of its own (it advances the epoch), so every rank must make it.
// Its outputs are views of this rank's layout regions, valid until the next call that runs the
// layout steps.
Layout CommImpl::get_layout(const TensorView& topk_idx, cudaStream_t stream) {
  DeviceGuard guard(device_);
  if (!topk_idx.present() || topk_idx.ndim != 2)
    throw InvalidArgument("topk_idx: expected [T, " + std::to_string(config().topk) +
                          "] i64 or i32, got " + topk_idx.describe());
  const int64_t T = topk_idx.shape[0];
  if (T > config().max_tokens_per_rank)
    throw InvalidArgument("topk_idx: " + std::to_string(T) +
                          " tokens, expected at most Config.max_tokens_per_rank = " +
                          std::to_string(config().max_tokens_per_rank));
  DispatchArgs a;
  a.topk_idx = topk_idx;
  check_topk(a, T);
  refuse_masks_across_nodes(ctx_.num_nodes, explicit_mask_, "get_layout");
  const Streams s = begin_call(stream, false);
  if (ctx_.num_nodes > 1) {
    // Across nodes the counts travel through the RDMA engine: the internode dispatch kernel's
    // layout and count exchange, then the call ends.
    internode::DispatchParams q;
    q.num_tokens = T;
    q.topk_idx = topk_idx.data;
    q.idx_i64 = topk_idx.dtype == DType::kI64;
    q.layout_only = true;
    q.layout = layout_params(topk_idx, /*exchange=*/false, /*close=*/false, nullptr, 0);
    internode::launch_dispatch(exchange_ctx(), q, config().num_sms, config().threads_per_block,
                               s.exec);
  } else {
    layout::launch_layout(exchange_ctx(),
                          layout_params(topk_idx, /*exchange=*/true, /*close=*/true, nullptr, 0),
                          config().num_sms, config().threads_per_block, s.exec);
  }
  end_call(s, false);
  const int R = num_ranks(), E = config().num_experts, L = config().local_experts(R);
  Layout out;
  out.num_tokens_per_rank = local_view(ctx_.layout.num_tokens_per_rank, DType::kI32, {R});
  out.num_tokens_per_expert = local_view(ctx_.layout.num_tokens_per_expert, DType::kI32, {E});
  out.is_token_in_rank = local_view(ctx_.layout.is_token_in_rank, DType::kU8, {T, R});
  out.num_recv_tokens_per_rank = local_view(ctx_.layout.num_recv_per_rank, DType::kI32, {R});
  out.num_recv_tokens_per_expert = local_view(ctx_.layout.num_recv_per_expert, DType::kI32, {L});
  if (ctx_.num_nodes > 1)
    out.num_tokens_per_node =
        local_view(ctx_.internode.num_tokens_per_node, DType::kI32, {ctx_.num_nodes});
  return out;
}

// The one entry of dispatch: checks what both paths share, then picks the path. A cached
// dispatch is always HT (the handle holds HT routing); otherwise the Config's mode, or in Auto
// mode the token count, decides.
DispatchOutput CommImpl::dispatch(const DispatchArgs& args, const DispatchOptions& options,
                                  GroupCall* group) {
  DeviceGuard guard(device_);
  if (!args.x.present() || args.x.ndim != 2)
    throw InvalidArgument("x: expected [T, " + std::to_string(config().hidden) +
                          "] bf16 or fp8_e4m3, got " + args.x.describe());
  const int64_t T = args.x.shape[0];
  if (T > config().max_tokens_per_rank)
    throw InvalidArgument("x: " + std::to_string(T) +
                          " tokens, expected at most Config.max_tokens_per_rank = " +
                          std::to_string(config().max_tokens_per_rank));
  if (options.previous_handle) {
    const Mode m =
        options.previous_handle->valid() ? options.previous_handle->mode() : Mode::kHighThroughput;
    if (m != Mode::kHighThroughput)
      throw InvalidArgument(
          "previous_handle: expected a high_throughput handle (cached dispatch is an HT feature), "
          "got a " +
          std::string(mode_name(m)) + " one");
  }
  const bool low_latency = !options.previous_handle && resolve_mode(T) == Mode::kLowLatency;
  if (group && !low_latency)
    throw Unsupported(
        "dispatch: one launch for the whole group serves the low-latency path; " +
        std::string(options.previous_handle ? "a cached dispatch" : std::to_string(T) + " tokens") +
        " takes the high-throughput path");
  return low_latency ? dispatch_ll(args, options, group) : dispatch_ht(args, options);
}

// ---------------------------------------------------------------------------------------------
// Combine follows the path of the dispatch that made the handle.
CombineOutput CommImpl::combine(const CombineArgs& args, const Handle& handle,
                                const CombineOptions& options, GroupCall* group) {
  DeviceGuard guard(device_);
  if (!handle.valid())
    throw InvalidArgument("combine: handle: expected the handle of a dispatch, got an empty one");
  const Mode m = handle.state()->mode;
  HandleState& h = handle_state(handle, m, "combine");
  if (m == Mode::kLowLatency) return combine_ll(args, h, options, group);
  if (group)
    throw Unsupported(
        "combine: one launch for the whole group serves the low-latency path; the "
        "handle is a high-throughput one");
  return combine_ht(args, h, options);
}

}  // namespace moecomm::detail
