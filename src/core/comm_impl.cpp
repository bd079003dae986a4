#include "core/comm_impl.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "core/event_state.hpp"
#include "core/staging.hpp"
#include "core/stream_order.hpp"
#include "core/validate.hpp"
#include "ht/intranode.hpp"
#include "layout/layout.hpp"
#include "ll/ll.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/stream_warmup.hpp"
#include "transport/rank_mask.hpp"

namespace moecomm::detail {

// ---------------------------------------------------------------------------------------------
// Handle storage: fixed-size slots of device memory, allocated in chunks up front so that no
// allocation (which may synchronise the device) happens while co-located ranks spin.
class SlotPool {
 public:
  static constexpr int kSlotsPerChunk = 32;

  SlotPool(int device, size_t slot_ints) : device_(device), slot_ints_(slot_ints) { grow(); }
  ~SlotPool() {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    for (int32_t* c : chunks_) cudaFree(c);
    cudaSetDevice(prev);
  }

  int acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) grow();
    const int s = free_.back();
    free_.pop_back();
    return s;
  }
  void release(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(slot);
  }
  int32_t* base(int slot) const {
    return chunks_[slot / kSlotsPerChunk] + (slot % kSlotsPerChunk) * slot_ints_;
  }

 private:
  void grow() {
    DeviceGuard guard(device_);
    int32_t* chunk = nullptr;
    MOECOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&chunk),
                                  sizeof(int32_t) * slot_ints_ * kSlotsPerChunk));
    const int first = static_cast<int>(chunks_.size()) * kSlotsPerChunk;
    chunks_.push_back(chunk);
    for (int i = kSlotsPerChunk - 1; i >= 0; --i) free_.push_back(first + i);
  }

  int device_;
  size_t slot_ints_;
  std::mutex mutex_;
  std::vector<int32_t*> chunks_;
  std::vector<int> free_;
};

HandleState::~HandleState() {
  if (pool && slot >= 0) pool->release(slot);
}

namespace {

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
    case Phase::kNone:
      break;
  }
  return "?";
}

// Carves consecutive, 256-byte aligned pieces out of one allocation.
class Carver {
 public:
  template <typename T>
  T* take(size_t count) {
    const size_t at = offset_;
    offset_ += (sizeof(T) * count + 255) / 256 * 256;
    return reinterpret_cast<T*>(static_cast<uint8_t*>(base_) + at);
  }
  size_t size() const { return offset_; }
  void set_base(void* base) {
    base_ = base;
    offset_ = 0;
  }

 private:
  void* base_ = nullptr;
  size_t offset_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
CommImpl::CommImpl(std::shared_ptr<GroupState> group, int rank)
    : group_(std::move(group)), rank_(rank), device_(group_->device_of[rank]) {
  DeviceGuard guard(device_);
  const Config& c = group_->config;
  const int R = group_->num_ranks, E = c.num_experts, L = c.local_experts(R), K = c.topk,
            H = c.hidden;
  const BufferSizes& sz = group_->sizes;
  const int Tmax = sz.max_tokens;
  const int W = (Tmax + 31) / 32;

  layout::preload_kernels();
  ht::preload_kernels();
  ll::preload_kernels();
  transport::preload_rank_mask_kernel();
  MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&async_stream_, cudaStreamNonBlocking));
  warm_up_stream(own_stream_);
  warm_up_stream(async_stream_);
  order_ = std::make_shared<StreamOrder>(device_);
  group_->claim_stream(rank_, own_stream_);
  group_->claim_stream(rank_, async_stream_);
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

  // Private scratch: measure, allocate once, carve.
  Carver carve;
  auto layout_all = [&](Carver& cv) {
    LocalState s{};
    s.epoch = cv.take<uint64_t>(1);
    s.ticket = cv.take<uint32_t>(1);
    s.grid_barrier = cv.take<uint64_t>(2);
    s.ll_seq = cv.take<uint64_t>(2);
    s.combine_seq = cv.take<uint64_t>(2);
    s.aborted = cv.take<int32_t>(1);
    s.rank_mask = cv.take<uint64_t>(1);
    s.expert_bitmap = cv.take<uint32_t>(static_cast<size_t>(E) * W);
    s.expert_word_prefix = cv.take<int32_t>(static_cast<size_t>(E) * W);
    s.rank_bitmap = cv.take<uint32_t>(static_cast<size_t>(R) * W);
    s.rank_word_prefix = cv.take<int32_t>(static_cast<size_t>(R) * W);
    s.token_rank_mask = cv.take<uint64_t>(Tmax);
    s.num_tokens_per_rank = cv.take<int32_t>(R);
    s.num_tokens_per_expert = cv.take<int32_t>(E);
    s.is_token_in_rank = cv.take<uint8_t>(static_cast<size_t>(Tmax) * R);
    s.num_recv_per_rank = cv.take<int32_t>(R);
    s.num_recv_per_expert = cv.take<int32_t>(L);
    s.send_base = cv.take<int32_t>(R);
    combine_out_ = cv.take<uint16_t>(static_cast<size_t>(Tmax) * H);
    combine_weights_ = cv.take<float>(static_cast<size_t>(Tmax) * K);
    ll_recv_count_ = cv.take<int32_t>(2 * L);
    ll_recv_layout_ = cv.take<int32_t>(2 * static_cast<size_t>(L) * R * 2);
    return s;
  };
  layout_all(carve);
  MOECOMM_CUDA_CHECK(cudaMalloc(&local_mem_, carve.size()));
  MOECOMM_CUDA_CHECK(cudaMemset(local_mem_, 0, carve.size()));
  carve.set_base(local_mem_);
  ctx_.local = layout_all(carve);

  ctx_.rank = rank_;
  ctx_.num_ranks = R;
  ctx_.num_experts = E;
  ctx_.local_experts = L;
  ctx_.topk = K;
  ctx_.hidden = H;
  ctx_.max_tokens = Tmax;
  ctx_.words = W;
  ctx_.ht_capacity = sz.ht_capacity;
  ctx_.ll_capacity = sz.ll_capacity;
  ctx_.timeout_ns = static_cast<uint64_t>(c.timeout_seconds * 1e9);
  ctx_.mask_on_timeout = c.mask_unresponsive_ranks ? 1 : 0;
  MOECOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.masked_by_timeout),
                                              masked_by_timeout_, 0));
  ctx_.one_gpu = 1;  // GPU-scope ordering when every rank shares this device in this process
  for (int r = 0; r < R; ++r)
    if (!group_->single_address_space || group_->device_of[r] != device_) ctx_.one_gpu = 0;
  for (int r = 0; r < R; ++r) ctx_.peers[r] = group_->sym_base[r];
  ctx_.sym = group_->layout;
  MOECOMM_CUDA_CHECK(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&ctx_.error), error_host_, 0));

  const size_t slot_ints = static_cast<size_t>(c.max_tokens_per_rank) * R +
                           static_cast<size_t>(std::max(sz.ll_capacity, 1)) * K + 2 + L + R;
  pool_ = std::make_shared<SlotPool>(device_, slot_ints);
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

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
void CommImpl::check_errors() {
  if (failed_)
    throw TimeoutError("rank " + std::to_string(rank_) +
                       ": the group stalled earlier and is unusable; create a new group");
  volatile DeviceError* e = error_host_;
  const int kind = e->kind;
  if (kind <= 0) return;
  const DeviceError copy{e->kind, e->rank, e->peer,     e->phase, e->channel,
                         e->pad,  e->seq,  e->observed, e->a,     e->b};
  switch (static_cast<DeviceErrorKind>(kind)) {
    case DeviceErrorKind::kStall:
      failed_ = true;
      throw TimeoutError("rank " + std::to_string(copy.rank) + " waited more than " +
                         std::to_string(config().timeout_seconds) + " s for peer " +
                         std::to_string(copy.peer) + " in phase '" + phase_name(copy.phase) +
                         "' (channel " + std::to_string(copy.channel) + ", call " +
                         std::to_string(copy.seq) + ", flag at " + std::to_string(copy.observed) +
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
    case DeviceErrorKind::kNone:
      break;
  }
}

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
  std::atomic_thread_fence(std::memory_order_acquire);
  check_errors();
}

void CommImpl::synchronize() {
  DeviceGuard guard(device_);
  MOECOMM_CUDA_CHECK(cudaStreamSynchronize(own_stream_));
  if (async_stream_) MOECOMM_CUDA_CHECK(cudaStreamSynchronize(async_stream_));
  order_->synchronize();  // a receive hook run on another stream
  check_errors();
}

CommImpl::Streams CommImpl::begin_call(cudaStream_t requested, bool async) {
  check_errors();
  Streams s;
  s.caller = requested ? requested : own_stream_;
  group_->claim_stream(rank_, s.caller);
  s.exec = s.caller;
  if (async) {
    cudaEvent_t ev;
    MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    MOECOMM_CUDA_CHECK(cudaEventRecord(ev, s.caller));
    MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(async_stream_, ev, 0));
    MOECOMM_CUDA_CHECK(cudaEventDestroy(ev));
    s.exec = async_stream_;
  }
  order_->before(s.exec);
  return s;
}

DeviceContext CommImpl::exchange_ctx() const {
  DeviceContext c = ctx_;
  c.mask_on_timeout = 0;
  return c;
}

void CommImpl::update_mask(uint64_t set, uint64_t clear) {
  DeviceGuard guard(device_);
  check_errors();
  order_->before(own_stream_);
  transport::launch_update_rank_mask(ctx_.local.rank_mask, set, clear, own_stream_);
  order_->after(own_stream_);
}

void CommImpl::mask_rank(int rank, bool masked) {
  if (rank < 0 || rank >= num_ranks())
    throw InvalidArgument("mask_rank: rank: expected 0.." + std::to_string(num_ranks() - 1) +
                          ", got " + std::to_string(rank));
  const uint64_t bit = 1ull << rank;
  update_mask(masked ? bit : 0, masked ? 0 : bit);
  explicit_mask_ = masked ? explicit_mask_ | bit : explicit_mask_ & ~bit;
  if (!masked) reinterpret_cast<volatile int32_t*>(masked_by_timeout_)[rank] = 0;
}

void CommImpl::clear_rank_masks() {
  update_mask(0, ~0ull);
  explicit_mask_ = 0;
  for (int r = 0; r < kMaxRanks; ++r) reinterpret_cast<volatile int32_t*>(masked_by_timeout_)[r] = 0;
}

std::vector<int> CommImpl::masked_ranks() const {
  std::vector<int> out;
  const volatile int32_t* by_timeout = masked_by_timeout_;
  for (int r = 0; r < num_ranks(); ++r)
    if (((explicit_mask_ >> r) & 1ull) || by_timeout[r]) out.push_back(r);
  return out;
}

void CommImpl::note_stream_work(cudaStream_t stream) {
  order_->after(stream);
}

Event CommImpl::end_call(const Streams& s, bool async) {
  order_->after(s.exec);
  if (!async) return {};
  auto state = std::make_shared<EventState>();
  state->device = device_;
  MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&state->event, cudaEventDisableTiming));
  MOECOMM_CUDA_CHECK(cudaEventRecord(state->event, s.exec));
  return Event(state);
}

std::shared_ptr<HandleState> CommImpl::new_handle(Mode mode, int64_t num_tokens) {
  auto h = std::make_shared<HandleState>();
  const int R = num_ranks(), K = config().topk, L = config().local_experts(R);
  h->owner = this;
  h->mode = mode;
  h->mask = explicit_mask_;
  h->num_tokens = num_tokens;
  h->pool = pool_;
  h->slot = pool_->acquire();
  int32_t* base = pool_->base(h->slot);
  h->send_row = base;
  base += static_cast<size_t>(config().max_tokens_per_rank) * R;
  h->ll_slot = base;
  base += static_cast<size_t>(std::max(group_->sizes.ll_capacity, 1)) * K;
  h->num_recv_dev = base;  // summary: [N][per expert L][rank prefix R+1], copied in one piece
  h->recv_per_expert = base + 1;
  h->recv_rank_prefix = base + 1 + L;
  return h;
}

HandleState& CommImpl::handle_state(const Handle& handle, Mode expected, const char* call) {
  if (!handle.valid())
    throw InvalidArgument(std::string(call) +
                          ": handle: expected the handle of a dispatch, got an empty one");
  HandleState* s = handle.state();
  if (s->owner != this)
    throw InvalidArgument(std::string(call) +
                          ": handle: it was made by another communicator (rank " +
                          "mismatch or another group); pass this rank's own dispatch handle");
  if (s->mode != expected)
    throw InvalidArgument(std::string(call) + ": handle: expected a " + mode_name(expected) +
                          " handle, got a " + mode_name(s->mode) + " one");
  return *s;
}

uint64_t CommImpl::publish(const void* ptr, size_t bytes, size_t stage_offset, size_t stage_bytes,
                           const char* name, cudaStream_t stream) {
  const uint8_t* base = group_->sym_base[rank_];
  const uint8_t* p = static_cast<const uint8_t*>(ptr);
  if (p >= base && p + bytes <= base + group_->layout.total)
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
  if (state) {
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
  const Streams s = begin_call(stream, false);
  layout::launch_layout(exchange_ctx(),
                        layout_params(topk_idx, /*exchange=*/true, /*close=*/true, nullptr, 0),
                        config().num_sms, config().threads_per_block, s.exec);
  end_call(s, false);
  const int R = num_ranks(), E = config().num_experts, L = config().local_experts(R);
  Layout out;
  out.num_tokens_per_rank = local_view(ctx_.local.num_tokens_per_rank, DType::kI32, {R});
  out.num_tokens_per_expert = local_view(ctx_.local.num_tokens_per_expert, DType::kI32, {E});
  out.is_token_in_rank = local_view(ctx_.local.is_token_in_rank, DType::kU8, {T, R});
  out.num_recv_tokens_per_rank = local_view(ctx_.local.num_recv_per_rank, DType::kI32, {R});
  out.num_recv_tokens_per_expert = local_view(ctx_.local.num_recv_per_expert, DType::kI32, {L});
  return out;
}

DispatchOutput CommImpl::dispatch(const DispatchArgs& args, const DispatchOptions& options) {
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
  if (group_call_ && !low_latency)
    throw Unsupported(
        "dispatch: one launch for the whole group serves the low-latency path; " +
        std::string(options.previous_handle ? "a cached dispatch" : std::to_string(T) + " tokens") +
        " takes the high-throughput path");
  return low_latency ? dispatch_ll(args, options) : dispatch_ht(args, options);
}

DispatchOutput CommImpl::dispatch_ht(const DispatchArgs& args, const DispatchOptions& o) {
  const Config& c = config();
  if (c.mode == Mode::kLowLatency)
    throw InvalidArgument(
        "Config.mode: the communicator was built for low_latency; HT dispatch needs "
        "high_throughput or auto");
  const int R = num_ranks(), L = c.local_experts(R), K = c.topk, H = c.hidden, G = H / kFp8Group;
  const int64_t T = args.x.shape[0];
  const std::string t_h = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  const bool fp8_in = args.x.dtype == DType::kFP8E4M3;
  check_tensor(args.x, {"x", {DType::kBF16, DType::kFP8E4M3}, {T, H}, t_h}, device_);
  if (fp8_in || o.quantize_fp8) {
    if (!c.enable_fp8) throw InvalidArgument("x: fp8 needs Config.enable_fp8 = true");
  }
  if (fp8_in) {
    if (o.quantize_fp8)
      throw InvalidArgument("quantize_fp8: expected false for fp8 x (already quantised)");
    check_tensor(args.x_scales,
                 {"x_scales",
                  {DType::kF32},
                  {T, G},
                  "[T=" + std::to_string(T) + ", H/128=" + std::to_string(G) + "]"},
                 device_);
  } else {
    check_absent(args.x_scales, "x_scales", "for bf16 x");
  }
  check_topk(args, T);

  const bool cached = o.previous_handle != nullptr;
  if (cached) {
    HandleState& prev = handle_state(*o.previous_handle, Mode::kHighThroughput, "dispatch");
    if (prev.num_tokens != T)
      throw InvalidArgument("previous_handle: it routed " + std::to_string(prev.num_tokens) +
                            " tokens, x has " + std::to_string(T) + "; expected the same routing");
    if (prev.mask != explicit_mask_)
      throw InvalidArgument(
          "previous_handle: made while other ranks were masked (mask_rank since); its routing "
          "is stale: dispatch without it");
  }

  const Streams s = begin_call(o.stream, o.async);
  CallStaging staging(s.exec);
  Handle handle;
  if (cached) {
    handle = *o.previous_handle;
  } else {
    handle = Handle(new_handle(Mode::kHighThroughput, T));
  }
  HandleState& h = *handle.state();
  const bool exact = o.sizing == Sizing::kExact;
  const uint64_t token = ++host_token_;

  ht::DispatchParams p;
  p.x = staging.input(args.x);
  p.num_tokens = T;
  p.in_row_bytes = static_cast<int>(fp8_in ? H : 2 * H);
  p.out_row_bytes = static_cast<int>(fp8_in || o.quantize_fp8 ? H : 2 * H);
  p.x_scales = fp8_in ? static_cast<const float*>(args.x_scales.data) : nullptr;
  p.quantize = o.quantize_fp8;
  p.pow2_scales = c.scale_format == ScaleFormat::kPowerOfTwo;
  p.topk_idx = args.topk_idx.data;
  p.idx_i64 = args.topk_idx.dtype == DType::kI64;
  p.topk_weights =
      args.topk_weights.present() ? static_cast<const float*>(args.topk_weights.data) : nullptr;
  p.send_row = h.send_row;
  p.cached = cached;
  if (!cached)
    p.layout =
        layout_params(args.topk_idx, /*exchange=*/true, /*close=*/false, &h, exact ? token : 0);
  ht::launch_dispatch(exchange_ctx(), p, c.num_sms, c.threads_per_block, s.exec);
  staging.finish();

  if (!cached && exact) {
    wait_host_counts(token);
    h.num_recv = host_counts_[0];
    h.recv_per_expert_host.assign(host_counts_ + 1, host_counts_ + 1 + L);
  }

  DispatchOutput out;
  out.mode = Mode::kHighThroughput;
  const int64_t rows = h.num_recv >= 0 ? h.num_recv : group_->sizes.ht_capacity;
  const bool fp8_out = fp8_in || o.quantize_fp8;
  const auto& lay = group_->layout;
  out.recv_x = sym_view(lay.ht_x, fp8_out ? DType::kFP8E4M3 : DType::kBF16, {rows, H});
  if (fp8_out) out.recv_x_scales = sym_view(lay.ht_scales, DType::kF32, {rows, G});
  out.recv_topk_idx = sym_view(lay.ht_topk_idx, DType::kI64, {rows, K});
  if (args.topk_weights.present())  // (a null pointer is fine when T = 0)
    out.recv_topk_weights = sym_view(lay.ht_topk_weights, DType::kF32, {rows, K});
  out.recv_src_token = sym_view(lay.ht_src_token, DType::kI32, {rows});
  out.recv_rank_prefix = local_view(h.recv_rank_prefix, DType::kI32, {R + 1});
  out.num_recv_tokens_per_expert = local_view(h.recv_per_expert, DType::kI32, {L});
  out.num_recv_tokens_device = local_view(h.num_recv_dev, DType::kI32, {1});
  out.num_recv_tokens = h.num_recv;
  out.num_recv_tokens_per_expert_host = h.recv_per_expert_host;
  out.handle = handle;
  out.event = end_call(s, o.async);
  return out;
}

DispatchOutput CommImpl::dispatch_ll(const DispatchArgs& args, const DispatchOptions& o) {
  const Config& c = config();
  const int R = num_ranks(), L = c.local_experts(R), H = c.hidden, G = H / kFp8Group;
  const int M = group_->sizes.ll_capacity;
  const int64_t T = args.x.shape[0];
  if (T > M)
    throw InvalidArgument(
        "x: " + std::to_string(T) +
        " tokens, expected at most the low-latency capacity M = " + std::to_string(M));
  check_tensor(args.x,
               {"x",
                {DType::kBF16},
                {T, H},
                "[T=" + std::to_string(T) + ", " + std::to_string(H) +
                    "] (LL takes bf16 and quantises on the fly)"},
               device_);
  check_absent(args.x_scales, "x_scales", "in low-latency dispatch (x is bf16)");
  if (o.quantize_fp8 && !c.enable_fp8)
    throw InvalidArgument("quantize_fp8: needs Config.enable_fp8 = true");
  check_topk(args, T);
  if (group_call_ && group_call_->validate_only) {
    check_errors();  // a pending device error raises here, before any rank's state changes
    return {};
  }

  const Streams s = begin_call(o.stream, o.async);
  auto staging = std::make_unique<CallStaging>(s.exec);
  auto state = new_handle(Mode::kLowLatency, T);
  const int b = static_cast<int>(ll_calls_ % 2);
  state->buffer = b;

  ll::DispatchSendParams p;
  p.x = static_cast<const uint16_t*>(staging->input(args.x));
  p.num_tokens = T;
  p.topk_idx = args.topk_idx.data;
  p.idx_i64 = args.topk_idx.dtype == DType::kI64;
  p.fp8 = o.quantize_fp8;
  p.pow2_scales = c.scale_format == ScaleFormat::kPowerOfTwo;
  p.buffer = b;
  p.slot_of = state->ll_slot;
  p.layout = layout_params(args.topk_idx, /*exchange=*/false, /*close=*/false, nullptr, 0);
  p.layout.prefix = false;  // positions straight from the bitmap words (rows of T <= M tokens)
  ll::DispatchRecvParams& rp = p.recv;
  rp.buffer = b;
  rp.recv_count = ll_recv_count_ + b * L;
  rp.recv_layout = ll_recv_layout_ + static_cast<size_t>(b) * L * R * 2;
  p.receive = !o.return_recv_hook;  // without a hook, one kernel does both phases
  if (group_call_) {
    group_call_->ctx.push_back(ctx_);
    group_call_->dispatch.push_back(p);
    group_call_->staging.push_back(std::move(staging));  // finished after the group's launch
  } else {
    ll::launch_dispatch_send(ctx_, p, c.num_sms, c.threads_per_block, s.exec);
    staging->finish();
  }
  ++ll_calls_;  // nothing below throws: the buffer parity advances with the call

  DispatchOutput out;
  if (o.return_recv_hook) {
    const DeviceContext ctx = ctx_;
    const cudaStream_t default_stream = s.exec;
    std::shared_ptr<StreamOrder> order = order_;
    out.hook = RecvHook([ctx, rp, default_stream, order](cudaStream_t st) {
      const cudaStream_t run = st ? st : default_stream;
      order->before(run);
      ll::launch_dispatch_recv(ctx, rp, run);
      order->after(run);
    });
  }

  const auto& lay = group_->layout;
  const int64_t slots = static_cast<int64_t>(R) * M;
  out.mode = Mode::kLowLatency;
  out.recv_x =
      sym_view(lay.ll_x[b], o.quantize_fp8 ? DType::kFP8E4M3 : DType::kBF16, {L, slots, H});
  if (o.quantize_fp8) out.recv_x_scales = sym_view(lay.ll_scales[b], DType::kF32, {L, slots, G});
  out.recv_src_info = sym_view(lay.ll_src_token[b], DType::kI32, {L, slots});
  out.recv_count = local_view(rp.recv_count, DType::kI32, {L});
  out.recv_layout = local_view(rp.recv_layout, DType::kI32, {L, R, 2});
  out.handle = Handle(state);
  out.event = end_call(s, o.async);
  return out;
}

// ---------------------------------------------------------------------------------------------
CombineOutput CommImpl::combine(const CombineArgs& args, const Handle& handle,
                                const CombineOptions& options) {
  DeviceGuard guard(device_);
  if (!handle.valid())
    throw InvalidArgument("combine: handle: expected the handle of a dispatch, got an empty one");
  const Mode m = handle.state()->mode;
  HandleState& h = handle_state(handle, m, "combine");
  if (m == Mode::kLowLatency) return combine_ll(args, h, options);
  if (group_call_)
    throw Unsupported(
        "combine: one launch for the whole group serves the low-latency path; the "
        "handle is a high-throughput one");
  return combine_ht(args, h, options);
}

CombineOutput CommImpl::combine_ht(const CombineArgs& args, HandleState& h,
                                   const CombineOptions& o) {
  const Config& c = config();
  const int H = c.hidden, K = c.topk;
  const int64_t T = h.num_tokens;
  const std::string tag = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  if (h.num_recv >= 0) {
    check_tensor(args.y,
                 {"y",
                  {DType::kBF16},
                  {h.num_recv, H},
                  "[N=" + std::to_string(h.num_recv) + ", " + std::to_string(H) + "]"},
                 device_);
  } else {
    check_tensor(args.y, {"y", {DType::kBF16}, {kAnyDim, H}, "[N, " + std::to_string(H) + "]"},
                 device_);
    if (args.y.shape[0] > group_->sizes.ht_capacity)
      throw InvalidArgument("y: " + std::to_string(args.y.shape[0]) +
                            " rows, expected at most the receive capacity " +
                            std::to_string(group_->sizes.ht_capacity));
  }
  const int64_t N = args.y.shape[0];
  if (args.recv_topk_weights.present())
    check_tensor(args.recv_topk_weights,
                 {"recv_topk_weights",
                  {DType::kF32},
                  {N, K},
                  "[N=" + std::to_string(N) + ", " + std::to_string(K) + "]"},
                 device_);
  if (args.bias.present()) check_tensor(args.bias, {"bias", {DType::kBF16}, {T, H}, tag}, device_);
  check_absent(args.topk_weights, "topk_weights", "in HT combine (pass recv_topk_weights)");
  if (o.out.present()) check_tensor(o.out, {"out", {DType::kBF16}, {T, H}, tag}, device_);
  if (o.return_recv_hook)
    throw InvalidArgument(
        "return_recv_hook: expected false for HT combine (hooks are a low-latency feature)");

  const Streams s = begin_call(o.stream, o.async);
  CallStaging staging(s.exec);
  ht::CombineParams p;
  const auto& lay = group_->layout;
  const size_t cap = static_cast<size_t>(group_->sizes.ht_capacity);
  const bool staged = group_->sizes.stage_combine;
  // y is read by the peers' kernels, in place (their loads take any 2-byte alignment): a temporary
  // copy would be used outside the stream that made it, which CUDA's stream-ordered allocations
  // do not allow.
  p.y = publish(args.y.data, args.y.nbytes(), lay.ht_stage_y, staged ? cap * H * 2 : 0, "y",
                s.exec);
  if (args.recv_topk_weights.present())
    p.recv_weights =
        publish(args.recv_topk_weights.data, args.recv_topk_weights.nbytes(), lay.ht_stage_weights,
                staged ? cap * K * sizeof(float) : 0, "recv_topk_weights", s.exec);
  p.bias = args.bias.present() ? static_cast<const uint16_t*>(staging.input(args.bias)) : nullptr;
  p.out = o.out.present() ? static_cast<uint16_t*>(staging.output(o.out)) : combine_out_;
  const bool want_weights = args.recv_topk_weights.present();
  p.combined_weights = want_weights ? combine_weights_ : nullptr;
  p.send_row = h.send_row;
  p.num_tokens = T;
  ht::launch_combine(exchange_ctx(), p, c.num_sms, c.threads_per_block, s.exec);
  staging.finish();

  CombineOutput out;
  out.out = o.out.present() ? o.out : local_view(combine_out_, DType::kBF16, {T, H});
  if (want_weights) out.combined_topk_weights = local_view(combine_weights_, DType::kF32, {T, K});
  out.event = end_call(s, o.async);
  return out;
}

CombineOutput CommImpl::combine_ll(const CombineArgs& args, HandleState& h,
                                   const CombineOptions& o) {
  const Config& c = config();
  const int R = num_ranks(), L = c.local_experts(R), H = c.hidden, K = c.topk;
  const int M = group_->sizes.ll_capacity;
  const int64_t T = h.num_tokens;
  const int64_t slots = static_cast<int64_t>(R) * M;
  check_tensor(args.y,
               {"y",
                {DType::kBF16},
                {L, slots, H},
                "[L=" + std::to_string(L) + ", R*M=" + std::to_string(slots) + ", " +
                    std::to_string(H) + "]"},
               device_);
  check_tensor(args.topk_weights,
               {"topk_weights",
                {DType::kF32},
                {T, K},
                "[T=" + std::to_string(T) + ", " + std::to_string(K) + "]"},
               device_);
  check_absent(args.recv_topk_weights, "recv_topk_weights",
               "in LL combine (weights are applied on the token's rank)");
  check_absent(args.bias, "bias", "in LL combine");
  const std::string tag = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  if (o.out.present()) check_tensor(o.out, {"out", {DType::kBF16}, {T, H}, tag}, device_);
  if (group_call_ && group_call_->validate_only) {
    check_errors();  // a pending device error raises here, before any rank's state changes
    return {};
  }

  const Streams s = begin_call(o.stream, o.async);
  // A staged out lives until the receive phase has run (with a hook: inside the hook). y is read
  // in place by the peers (see combine_ht).
  std::shared_ptr<CallStaging> staging = std::make_shared<CallStaging>(s.exec);
  ll::CombineSendParams sp;
  const size_t combine_bytes = static_cast<size_t>(L) * slots * H * 2;
  sp.y = publish(args.y.data, args.y.nbytes(), group_->layout.ll_combine[h.buffer], combine_bytes,
                 "y", s.exec);
  sp.buffer = h.buffer;
  if (o.return_recv_hook) ll::launch_combine_send(ctx_, sp, s.exec);

  ll::CombineRecvParams rp;
  rp.publish_y = !o.return_recv_hook;  // without a hook, one kernel does both phases
  rp.y = sp.y;
  rp.buffer = h.buffer;
  rp.slot_of = h.ll_slot;
  rp.topk_weights = static_cast<const float*>(args.topk_weights.data);
  rp.num_tokens = T;
  rp.out = o.out.present() ? static_cast<uint16_t*>(staging->output(o.out)) : combine_out_;
  CombineOutput out;
  const int blocks = c.num_sms, threads = c.threads_per_block;
  if (o.return_recv_hook) {
    const DeviceContext ctx = ctx_;
    const cudaStream_t default_stream = s.exec;
    std::shared_ptr<StreamOrder> order = order_;
    out.hook = RecvHook([ctx, rp, blocks, threads, default_stream, order,
                         staging](cudaStream_t st) {
      const cudaStream_t run = st ? st : default_stream;
      order->before(run);
      ll::launch_combine_recv(ctx, rp, blocks, threads, run);
      staging->finish(run);
      order->after(run);
    });
  } else if (group_call_) {
    group_call_->ctx.push_back(ctx_);
    group_call_->combine.push_back(rp);
    group_call_->staging.push_back(staging);  // finished after the group's launch
  } else {
    ll::launch_combine_recv(ctx_, rp, blocks, threads, s.exec);
    staging->finish();
  }
  out.out = o.out.present() ? o.out : local_view(combine_out_, DType::kBF16, {T, H});
  out.event = end_call(s, o.async);
  return out;
}

TensorView CommImpl::combine_buffer(const Handle& handle) {
  HandleState& h = handle_state(handle, Mode::kLowLatency, "combine_buffer");
  const int R = num_ranks(), L = config().local_experts(R), H = config().hidden;
  const int64_t slots = static_cast<int64_t>(R) * group_->sizes.ll_capacity;
  return sym_view(group_->layout.ll_combine[h.buffer], DType::kBF16, {L, slots, H});
}

}  // namespace moecomm::detail
