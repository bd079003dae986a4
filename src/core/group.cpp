// The groups: VirtualGroup (every rank in this process, each with a host thread of its own, and
// one-launch LL calls for a one-GPU group) and ProcessGroupBuilder (one rank per process, peers
// mapped through CUDA IPC). Both lay out the symmetric buffers from every path's regions
// (paths/regions.hpp) and hand each rank a CommImpl.
#include "moecomm/group.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "core/comm_impl.hpp"
#include "core/staging.hpp"
#include "ll/group_plan.hpp"
#include "moecomm/error.hpp"
#include "paths/regions.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/engine_choice.hpp"
#include "runtime/group_state.hpp"
#include "runtime/node_layout.hpp"
#include "runtime/streams.hpp"
#include "transport/gin_engine.hpp"

namespace moecomm {

namespace {

// CUDA maps streams onto a fixed number of hardware queues (8 by default). When two co-located
// ranks' streams share a queue, work queued behind one rank's spinning kernel (its next kernel,
// a copy) blocks the other rank's kernels, which that spinning kernel waits for: a deadlock.
// Ask for the maximum number of queues before the CUDA context exists, unless the process chose.
constexpr int kHardwareQueues = 32;
[[maybe_unused]] const bool queues_requested = [] {
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", std::to_string(kHardwareQueues).c_str(), /*overwrite=*/0);
  return true;
}();

/// Hardware queues the process asked for (CUDA's default is 8).
int hardware_queues() {
  const char* v = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  return v ? std::atoi(v) : 8;
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

// The SM count bounds num_sms: co-located ranks spin on each other, so all their blocks must be
// resident at once.
int device_sm_count(int device) {
  const int n = cuda_device_count();
  if (n == 0) throw Unsupported("no CUDA device is visible (a GPU and its driver are needed)");
  if (device < 0 || device >= n)
    throw InvalidArgument("device: expected 0.." + std::to_string(n - 1) + ", got " +
                          std::to_string(device));
  int sms = 0;
  MOECOMM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

/// One persistent host thread per rank, so that parallel_for costs a wake-up, not a spawn.
struct VirtualGroup::Pool {
  // Each thread binds its rank's device before the first job: a thread's first CUDA call sets up
  // per-thread state, which should not happen while co-located ranks already spin.
  explicit Pool(const std::vector<int>& device_of) : errors(device_of.size()) {
    for (size_t r = 0; r < device_of.size(); ++r)
      threads.emplace_back([this, r, d = device_of[r]] { loop(static_cast<int>(r), d); });
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [this] { return ready == static_cast<int>(threads.size()); });
  }
  ~Pool() {
    for (cudaEvent_t e : marks) cudaEventDestroy(e);
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
      ++generation;
    }
    wake.notify_all();
    for (auto& t : threads) t.join();
  }
  void run(const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lock(mutex);
    job = &fn;
    pending = static_cast<int>(threads.size());
    for (auto& e : errors) e = nullptr;
    ++generation;
    wake.notify_all();
    done.wait(lock, [this] { return pending == 0; });
    job = nullptr;
    rethrow_errors();
  }

  // A stall on one rank usually follows an error on another: raise the first error that is not
  // a time-out, and name every rank's error in the message.
  void rethrow_errors() {
    std::exception_ptr primary;
    std::string all;
    bool primary_is_timeout = true;
    for (size_t r = 0; r < errors.size(); ++r) {
      if (!errors[r]) continue;
      bool timeout = false;
      std::string what;
      try {
        std::rethrow_exception(errors[r]);
      } catch (const TimeoutError& e) {
        timeout = true;
        what = e.what();
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
        what = "unknown exception";
      }
      all += "\n  rank " + std::to_string(r) + ": " + what;
      if (!primary || (primary_is_timeout && !timeout)) {
        primary = errors[r];
        primary_is_timeout = timeout;
      }
    }
    if (!primary) return;
    int count = 0;
    for (auto& e : errors) count += e != nullptr;
    if (count == 1) std::rethrow_exception(primary);
    try {
      std::rethrow_exception(primary);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(std::string(e.what()) + "\nerrors on every rank:" + all);
    } catch (const TimeoutError& e) {
      throw TimeoutError(std::string(e.what()) + "\nerrors on every rank:" + all);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + "\nerrors on every rank:" + all);
    }
  }
  void loop(int rank, int device) {
    cudaSetDevice(device);
    cudaGetLastError();
    {
      std::lock_guard<std::mutex> lock(mutex);
      ++ready;
    }
    done.notify_all();
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return generation != seen; });
        seen = generation;
        if (stop) return;
        fn = job;
      }
      try {
        (*fn)(rank);
      } catch (...) {
        errors[rank] = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        --pending;
      }
      done.notify_all();
    }
  }

  std::mutex mutex;
  std::condition_variable wake, done;
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors;
  std::vector<cudaEvent_t> marks;     // dispatch_all / combine_all: joining the ranks' streams
  std::vector<cudaStream_t> streams;  // each rank's own stream
  const std::function<void(int)>* job = nullptr;
  uint64_t generation = 0;
  int pending = 0;
  int ready = 0;
  bool stop = false;
};

// Everything that could make co-located ranks deadlock is refused here, before any buffer
// exists: too many SMs for the ranks of one device, too few hardware queues for their streams.
VirtualGroup::VirtualGroup(const Config& config, int num_ranks, std::vector<int> devices,
                           int num_nodes) {
  config.validate(num_ranks);
  detail::check_node_count(num_ranks, num_nodes);
  // Host-side checks of the node layout and the RDMA window come before any device is touched.
  const auto shape =
      detail::region_shape(config, num_ranks, /*separate_processes=*/false, num_nodes);
  const detail::SymmetricPlan plan = detail::symmetric_plan(config, shape);
  detail::EngineFacts facts;
  facts.num_nodes = num_nodes;
  facts.virtual_group = true;
  detail::choose_engine(config.engine, facts);  // GIN needs one process per rank: raises
  if (devices.empty()) throw InvalidArgument("devices: expected at least one CUDA device ordinal");
  const int visible = cuda_device_count();
  if (visible == 0)
    throw Unsupported("VirtualGroup: no CUDA device is visible (a GPU and its driver are needed)");
  std::map<int, int> ranks_on;
  for (int r = 0; r < num_ranks; ++r) ++ranks_on[devices[r % devices.size()]];
  for (const auto& [device, ranks] : ranks_on) {
    const int sms = device_sm_count(device);
    if (static_cast<long long>(ranks) * config.num_sms > sms)
      throw InvalidArgument("Config.num_sms: " + std::to_string(ranks) +
                            " ranks on cuda:" + std::to_string(device) + " need " +
                            std::to_string(ranks) + " x " + std::to_string(config.num_sms) + " = " +
                            std::to_string(static_cast<long long>(ranks) * config.num_sms) +
                            " SMs resident together, the device has " + std::to_string(sms) +
                            "; expected num_sms <= " + std::to_string(sms / ranks));
  }
  int most_on_one_device = 0;
  for (const auto& [device, ranks] : ranks_on)
    most_on_one_device = std::max(most_on_one_device, ranks);
  if (most_on_one_device > 1 && hardware_queues() < 2 * most_on_one_device)
    throw InvalidArgument("CUDA_DEVICE_MAX_CONNECTIONS=" + std::to_string(hardware_queues()) +
                          ": " + std::to_string(most_on_one_device) +
                          " co-located virtual ranks need their streams on "
                          "distinct hardware queues (at least " +
                          std::to_string(2 * most_on_one_device) +
                          "); unset it or set it to 32 before CUDA starts");
  state_ = std::make_shared<detail::GroupState>(config, shape, devices, plan);
  for (int r = 0; r < num_ranks; ++r)
    comms_.push_back(std::unique_ptr<MoECommunicator>(
        new MoECommunicator(std::make_unique<detail::CommImpl>(state_, r))));
  pool_ = std::make_unique<Pool>(state_->device_of);
}

// The threads go first: none may still be inside a call when the communicators are destroyed.
VirtualGroup::~VirtualGroup() {
  pool_.reset();
  comms_.clear();
}

int VirtualGroup::num_nodes() const {
  return state_->shape.num_nodes;
}

int VirtualGroup::size() const {
  return static_cast<int>(comms_.size());
}

MoECommunicator& VirtualGroup::operator[](int rank) {
  if (rank < 0 || rank >= size())
    throw InvalidArgument("rank: expected 0.." + std::to_string(size() - 1) + ", got " +
                          std::to_string(rank));
  return *comms_[rank];
}

void VirtualGroup::parallel_for(const std::function<void(int)>& fn) {
  pool_->run(fn);
}

void VirtualGroup::synchronize() {
  for (auto& c : comms_) c->synchronize();
}

namespace {

/// Checks what one launch for the whole group needs; `call` names the API in errors.
void check_group_launch(const char* call, size_t given, int ranks, bool one_device,
                        cudaStream_t stream, bool async, bool hook) {
  if (given != static_cast<size_t>(ranks))
    throw InvalidArgument(std::string(call) + ": expected one entry per rank (" +
                          std::to_string(ranks) + "), got " + std::to_string(given));
  if (!one_device) throw Unsupported(std::string(call) + ": every rank must be on one GPU");
  if (ranks > ll::kMaxGroupRanks)
    throw Unsupported(std::string(call) + ": at most " + std::to_string(ll::kMaxGroupRanks) +
                      " ranks, the group has " + std::to_string(ranks));
  if (stream || async || hook)
    throw InvalidArgument(std::string(call) +
                          ": options.stream, async and return_recv_hook: expected unset (the "
                          "call runs on rank 0's stream, ordered with every rank's stream)");
}

/// Runs `call(r, group)` for every rank r: first with the plan only validating (nothing changes
/// if any rank's argument is bad), then for real, each rank recording its call in the LL path's
/// plan. If a rank still fails in the second pass (a device error that arrived in between, an
/// allocation), `undo` takes back what the ranks before it recorded, so the ranks stay in step.
template <typename Call, typename Undo>
void plan_calls(const std::vector<detail::CommImpl*>& impls, detail::CommImpl::GroupCall& group,
                const Call& call, const Undo& undo) {
  for (int pass = 0; pass < 2; ++pass) {
    group.plan.validate_only = pass == 0;
    for (size_t r = 0; r < impls.size(); ++r) {
      try {
        call(static_cast<int>(r));
      } catch (...) {
        if (!group.plan.validate_only)
          for (size_t q = 0; q < r; ++q) undo(*impls[q]);
        throw;
      }
    }
  }
}

/// After the group's launch: each rank's temporaries are copied out and freed on its stream
/// (which follows the launch).
void finish_staging(const std::vector<std::unique_ptr<MoECommunicator>>& comms,
                    detail::CommImpl::GroupCall& group) {
  for (size_t r = 0; r < group.staging.size(); ++r)
    if (group.staging[r]) group.staging[r]->finish(comms[r]->stream());
}

}  // namespace

// One launch for the whole group runs on rank 0's stream, which first joins every rank's stream;
// every rank's later work then follows the launch. The events are kept: this is the hot path of
// dispatch_all / combine_all.
void VirtualGroup::launch_once(const std::function<void(cudaStream_t)>& launch) {
  const int R = size();
  detail::DeviceGuard guard(state_->device_of[0]);
  if (pool_->marks.empty()) {
    pool_->marks.resize(R);
    for (auto& e : pool_->marks)
      MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  if (pool_->streams.empty())
    for (auto& c : comms_) pool_->streams.push_back(c->stream());
  const cudaStream_t first = pool_->streams[0];
  for (int r = 1; r < R; ++r)  // rank 0's stream joins every rank's work so far
    detail::stream_wait(first, pool_->streams[r], pool_->marks[r]);
  launch(first);
  // and every rank's later work follows the launch
  detail::streams_wait(pool_->streams.data() + 1, R - 1, first, pool_->marks[0]);
  for (detail::CommImpl* impl : impls()) impl->note_stream_work(impl->stream());
}

std::vector<detail::CommImpl*> VirtualGroup::impls() const {
  std::vector<detail::CommImpl*> out;
  for (const auto& c : comms_) out.push_back(c->impl_.get());
  return out;
}

bool VirtualGroup::on_one_device() const {
  const auto& d = state_->device_of;
  return std::all_of(d.begin(), d.end(), [&](int x) { return x == d[0]; });
}

std::vector<DispatchOutput> VirtualGroup::dispatch_all(const std::vector<DispatchArgs>& args,
                                                       const DispatchOptions& options) {
  check_group_launch("dispatch_all", args.size(), size(), on_one_device(), options.stream,
                     options.async, options.return_recv_hook);
  const Config& c = state_->config;
  ll::GroupPlan plan(size(), c.num_sms);
  detail::CommImpl::GroupCall group(plan);
  std::vector<DispatchOutput> out(size());
  const std::vector<detail::CommImpl*> rank_impls = impls();
  plan_calls(
      rank_impls, group, [&](int r) { out[r] = rank_impls[r]->dispatch(args[r], options, &group); },
      [](detail::CommImpl& impl) { impl.undo_group_dispatch(); });
  launch_once([&](cudaStream_t s) { plan.launch(c.threads_per_block, s); });
  finish_staging(comms_, group);
  return out;
}

std::vector<CombineOutput> VirtualGroup::combine_all(const std::vector<CombineArgs>& args,
                                                     const std::vector<Handle>& handles,
                                                     const CombineOptions& options) {
  check_group_launch("combine_all", args.size(), size(), on_one_device(), options.stream,
                     options.async, options.return_recv_hook);
  if (handles.size() != args.size())
    throw InvalidArgument("combine_all: handles: expected one per rank (" + std::to_string(size()) +
                          "), got " + std::to_string(handles.size()));
  if (options.out.present())
    throw InvalidArgument(
        "combine_all: options.out: expected unset (each rank's output is its "
        "own; the call returns them)");
  const Config& c = state_->config;
  ll::GroupPlan plan(size(), c.num_sms);
  detail::CommImpl::GroupCall group(plan);
  std::vector<CombineOutput> out(size());
  const std::vector<detail::CommImpl*> rank_impls = impls();
  plan_calls(
      rank_impls, group,
      [&](int r) { out[r] = rank_impls[r]->combine(args[r], handles[r], options, &group); },
      [](detail::CommImpl&) {});  // combine changes no rank state before its launch
  launch_once([&](cudaStream_t s) { plan.launch(c.threads_per_block, s); });
  finish_staging(comms_, group);
  return out;
}

// Ranks in separate processes cannot read each other's unregistered tensors: the regions then
// include staging areas for combine inputs (separate_processes).
ProcessGroupBuilder::ProcessGroupBuilder(const Config& config, int rank, int size, int device)
    : rank_(rank) {
  config.validate(size);
  if (rank < 0 || rank >= size)
    throw InvalidArgument("rank: expected 0.." + std::to_string(size - 1) + ", got " +
                          std::to_string(rank));
  const int sms = device_sm_count(device);  // raises without a device
  if (config.num_sms > sms)
    throw InvalidArgument("Config.num_sms: expected <= " + std::to_string(sms) +
                          " (the SMs of cuda:" + std::to_string(device) + "), got " +
                          std::to_string(config.num_sms));
  const auto shape = detail::region_shape(config, size, /*separate_processes=*/size > 1);
  state_ = std::make_shared<detail::GroupState>(config, shape, rank, device,
                                                detail::symmetric_plan(config, shape));
  host_id_ = detail::default_host_id();
}

ProcessGroupBuilder::~ProcessGroupBuilder() = default;

void ProcessGroupBuilder::set_host_id(const std::string& host_id) {
  if (exported_)
    throw InvalidArgument("set_host_id: called after local_handle(); set the host id first");
  detail::check_host_id(host_id);
  host_id_ = host_id;
}

const std::string& ProcessGroupBuilder::host_id() const {
  return host_id_;
}

// Rank 0 makes the NCCL unique id whenever the group may take the GIN engine (the nodes are
// known only in connect(), after the one exchange); a failure leaves it out, and connect() says
// so only if GIN is then chosen.
std::vector<uint8_t> ProcessGroupBuilder::local_handle() const {
  std::vector<uint8_t> nccl_id;
  if (rank_ == 0 && state_->num_ranks > 1 && detail::nccl_build_version() > 0 &&
      state_->config.engine != RdmaEngine::kLoopback) {
    try {
      nccl_id = detail::make_nccl_id();
    } catch (const Error&) {
    }
  }
  exported_ = true;
  return state_->export_handle(rank_, host_id_, nccl_id);
}

size_t ProcessGroupBuilder::handle_size() {
  return detail::GroupState::handle_size();
}

int ProcessGroupBuilder::num_nodes() const {
  return state_->shape.num_nodes;
}

// Every rank's handle must be mapped before the first call: kernels write to peers directly.
// The nodes are known only here; the checks that depend on them use nothing but the handles,
// which every rank holds alike, so they raise the same error on every rank before any mapping.
std::unique_ptr<MoECommunicator> ProcessGroupBuilder::connect(
    const std::vector<uint8_t>& all_handles) {
  if (connected_) throw InvalidArgument("connect: called twice; a builder makes one communicator");
  const detail::NodeLayout nodes = state_->check_handles(all_handles);
  const Config& config = state_->config;
  const int size = state_->num_ranks;
  const auto shape =
      detail::region_shape(config, size, /*separate_processes=*/size > 1, nodes.num_nodes);
  // Raises when a group spanning nodes has no or too small an RDMA window (naming the size).
  const detail::SymmetricPlan plan = detail::symmetric_plan(config, shape);
  if (plan.bytes != state_->plan.bytes)
    throw Error("connect: the symmetric buffer for " + std::to_string(nodes.num_nodes) +
                " node(s) takes " + std::to_string(plan.bytes) + " bytes, the one allocated " +
                std::to_string(state_->plan.bytes) +
                " (internal error: it must not depend on "
                "the node count)");
  detail::EngineFacts facts;
  facts.num_nodes = nodes.num_nodes;
  facts.one_machine = state_->one_machine(all_handles);
  facts.nccl_built = detail::nccl_build_version() > 0;
  facts.nccl_build_note = detail::gin_build_note();
  const RdmaEngine engine = detail::choose_engine(config.engine, facts);
  state_->shape = shape;
  try {
    if (engine == RdmaEngine::kGin)
      state_->start_gin(rank_, all_handles, nodes);
    else
      state_->map_peers(rank_, all_handles);
  } catch (...) {
    state_->shape = detail::region_shape(config, size, /*separate_processes=*/size > 1);
    throw;
  }
  connected_ = true;
  return std::unique_ptr<MoECommunicator>(
      new MoECommunicator(std::make_unique<detail::CommImpl>(state_, rank_)));
}

}  // namespace moecomm
