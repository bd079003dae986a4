#include "process_mode.hpp"

#include <cstdlib>
#include <string>

#ifdef MOECOMM_BENCH_WITH_MPI
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "bench.hpp"
#include "moecomm/moecomm.hpp"
#include "moecomm/mpi.hpp"
#include "verify.hpp"
#endif

namespace epb {

int launcher_world_size() {
  // Open MPI, MPICH / Intel MPI (Hydra), MVAPICH, and Slurm's srun steps.
  for (const char* var :
       {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n > 1) return n;
    }
  }
  return 1;
}

#ifndef MOECOMM_BENCH_WITH_MPI

int run_processes(int, char**, Options&) {
  throw UsageError("started by an MPI launcher with " + std::to_string(launcher_world_size()) +
                   " processes, but this ep_bench was built without MPI: install an MPI (e.g. "
                   "libopenmpi-dev) and rebuild with -DMOECOMM_WITH_MPI=ON, or run ep_bench "
                   "without mpirun (virtual ranks)");
}

#else

namespace {

using moecomm::CombineArgs;
using moecomm::CombineOutput;
using moecomm::DispatchArgs;
using moecomm::DispatchOptions;
using moecomm::DispatchOutput;
using moecomm::Mode;
using moecomm::MoECommunicator;
using moecomm::Sizing;

void mpi_check(int rc, const char* call) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string(call) + " failed");
}

/// MPI for the life of the run.
struct MpiSession {
  int rank = 0, size = 1;
  MpiSession(int& argc, char**& argv) {
    mpi_check(MPI_Init(&argc, &argv), "MPI_Init");
    mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank");
    mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &size), "MPI_Comm_size");
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

/// Every rank's host (MPI_Get_processor_name) as an index: hosts numbered in rank order.
std::vector<int> host_of_ranks(int size) {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  mpi_check(MPI_Get_processor_name(name, &len), "MPI_Get_processor_name");
  std::vector<char> all(static_cast<size_t>(size) * MPI_MAX_PROCESSOR_NAME);
  mpi_check(MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(),
                          MPI_MAX_PROCESSOR_NAME, MPI_CHAR, MPI_COMM_WORLD),
            "MPI_Allgather of the host names");
  std::map<std::string, int> index;
  std::vector<int> host(size);
  for (int r = 0; r < size; ++r) {
    const std::string h(&all[static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME]);
    host[r] = index.emplace(h, static_cast<int>(index.size())).first->second;
  }
  return host;
}

/// The group's nodes: declared with --nodes (each declared node within one host), or one per
/// host, whose ranks must then be contiguous and equally many. Returns N.
int find_nodes(const Options& o, const std::vector<int>& host) {
  const int size = static_cast<int>(host.size());
  const int hosts = *std::max_element(host.begin(), host.end()) + 1;
  const int nodes = o.given.count("--nodes") || o.given.count("--virtual-nodes") ? o.nodes : hosts;
  if (nodes < 1 || size % nodes != 0)
    throw UsageError("--nodes " + std::to_string(nodes) + ": must divide the " +
                     std::to_string(size) + " processes");
  const int G = size / nodes;
  for (int r = 0; r < size; ++r) {
    if (host[r] != host[r / G * G])
      throw UsageError(std::to_string(nodes) + " node(s) of " + std::to_string(G) +
                       " processes: ranks " + std::to_string(r / G * G) + " and " +
                       std::to_string(r) +
                       " would share a node but run on different hosts; the ranks of a host must "
                       "be contiguous and every host must run as many (mpirun --map-by ppr:" +
                       std::to_string(G) + ":node)");
  }
  return nodes;
}

/// Times `issue` on this rank's stream: a barrier, then the op between two events; each sample
/// is the slowest rank's time of that iteration.
Stats time_op(MoECommunicator& comm, const TimingPlan& plan, const std::function<void()>& issue,
              const std::function<void()>& after = {}) {
  cudaEvent_t start, stop;
  MOECOMM_CUDA_CHECK(cudaEventCreate(&start));
  MOECOMM_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> mine;
  for (int i = 0; i < plan.warmup + plan.iters; ++i) {
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    MOECOMM_CUDA_CHECK(cudaEventRecord(start, comm.stream()));
    issue();
    MOECOMM_CUDA_CHECK(cudaEventRecord(stop, comm.stream()));
    MOECOMM_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= plan.warmup) mine.push_back(1e3 * ms);
    if (after) after();
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::vector<double> slowest(mine.size());
  mpi_check(MPI_Allreduce(mine.data(), slowest.data(), static_cast<int>(mine.size()), MPI_DOUBLE,
                          MPI_MAX, MPI_COMM_WORLD),
            "MPI_Allreduce of the timings");
  return summarize(slowest);
}

OpResult result(Op op, const Stats& time, const Traffic& traffic) {
  return {op, time, traffic, Stats{}, 0.0, std::nullopt};  // no naive counterpart in this mode
}

/// One mode's point as this process's rank: the correctness gate, then the timings.
PointResult run_point(const Options& o, Mode mode, int rank, const std::string& host_id) {
  const Shape shape = default_shape(o, mode);
  const moecomm::Config config = default_config(o, mode);
  try {
    config.validate(o.ranks);
  } catch (const moecomm::InvalidArgument& e) {
    throw UsageError(e.what());
  }
  if (rank == 0)
    std::fprintf(stderr,
                 "ep_bench: %s inputs, %d ranks x %d tokens, hidden %d: host reference...\n",
                 shape.ht() ? "ht" : "ll", shape.ranks, shape.tokens, shape.hidden);
  const Workload wl = build_workload(shape, o, /*with_naive=*/false);
  const std::unique_ptr<MoECommunicator> comm =
      moecomm::mpi_connect(config, MPI_COMM_WORLD, o.device, host_id);
  if (comm->num_nodes() != shape.nodes)
    throw std::runtime_error("the group formed " + std::to_string(comm->num_nodes()) +
                             " node(s), expected " + std::to_string(shape.nodes));

  DispatchArgs args;
  args.x = wl.x_view(rank);
  args.topk_idx = wl.idx_view(rank);
  args.topk_weights = wl.weights_view(rank);
  DispatchOptions worst;
  worst.quantize_fp8 = shape.fp8;
  worst.sizing = Sizing::kWorstCase;
  CombineArgs cargs;
  cargs.y = wl.y_view(rank);
  if (!shape.ht()) cargs.topk_weights = wl.weights_view(rank);
  const auto check_dispatch = [&](const DispatchOutput& d, const char* form) {
    if (shape.ht())
      check_ht_dispatch(wl, rank, d, form);
    else
      check_ll_dispatch(wl, rank, d, form);
  };

  // Correctness gate: calls that reveal every output buffer (LL alternates two), poisoned, then
  // the checked calls.
  DispatchOutput d;
  CombineOutput c;
  for (int round = 0; round < (shape.ht() ? 1 : 2); ++round) {
    d = comm->dispatch(args, worst);
    c = comm->combine(cargs, d.handle);
    comm->synchronize();
    poison(d);
    poison(c.out);
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
  }
  d = comm->dispatch(args, worst);
  comm->synchronize();
  check_dispatch(d, shape.ht() ? "HT dispatch" : "LL dispatch");
  c = comm->combine(cargs, d.handle);
  comm->synchronize();
  check_combine(wl, rank, c.out, shape.ht() ? "HT combine" : "LL combine");
  // LL: the expert outputs written into the communicator's combine buffer (zero-copy combine, as
  // an expert MLP would): another process reads them in place, where a caller's tensor would
  // first be copied into registered memory. The figures below use this form.
  CombineArgs zero_copy = cargs;
  const auto fill_combine_buffer = [&](const moecomm::Handle& handle) {
    zero_copy.y = comm->combine_buffer(handle);
    const moecomm::TensorView y = wl.y_view(rank);
    if (zero_copy.y.nbytes() != y.nbytes())
      throw std::runtime_error("combine_buffer: " + zero_copy.y.describe() + ", y " + y.describe());
    MOECOMM_CUDA_CHECK(cudaMemcpy(zero_copy.y.data, y.data, y.nbytes(), cudaMemcpyDeviceToDevice));
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());  // a device-to-device copy returns early
  };
  if (!shape.ht()) {
    fill_combine_buffer(d.handle);
    poison(c.out);
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    c = comm->combine(zero_copy, d.handle);
    comm->synchronize();
    check_combine(wl, rank, c.out, "LL zero-copy combine");
  }
  if (shape.ht()) {
    DispatchOptions cached = worst;
    cached.previous_handle = &d.handle;
    poison(d);
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    DispatchOutput again = comm->dispatch(args, cached);
    comm->synchronize();
    check_dispatch(again, "HT cached dispatch");
    DispatchOptions exact = worst;
    exact.sizing = Sizing::kExact;
    poison(again);
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    again = comm->dispatch(args, exact);
    comm->synchronize();
    check_dispatch(again, "HT exact dispatch");
  }
  mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");

  // Timings. Combine is timed with the handle of the last timed dispatch; LL fills that
  // handle's combine buffer once (its contents do not change the time; the output was checked
  // above).
  const TimingPlan plan{o.warmup, o.iters, /*gated=*/false, {}};
  const Traffic dt = wl.dispatch_traffic(), ct = wl.combine_traffic();
  PointResult point;
  point.shape = shape;
  point.config = config;
  point.ops.push_back(
      result(Op::kDispatch, time_op(*comm, plan, [&] { d = comm->dispatch(args, worst); }), dt));
  if (!shape.ht()) fill_combine_buffer(d.handle);
  point.ops.push_back(
      result(Op::kCombine, time_op(*comm, plan, [&] { comm->combine(zero_copy, d.handle); }), ct));
  if (shape.ht()) {
    if (o.cached) {
      DispatchOptions cached = worst;
      cached.previous_handle = &d.handle;
      point.ops.push_back(result(Op::kCachedDispatch,
                                 time_op(*comm, plan, [&] { comm->dispatch(args, cached); }), dt));
    }
    DispatchOptions exact = worst;
    exact.sizing = Sizing::kExact;
    point.ops.push_back(
        result(Op::kExactDispatch, time_op(*comm, plan, [&] { comm->dispatch(args, exact); }), dt));
  } else {
    DispatchOptions hooked = worst;
    hooked.return_recv_hook = true;
    DispatchOutput h;
    point.ops.push_back(result(Op::kDispatchSend,
                               time_op(
                                   *comm, plan, [&] { h = comm->dispatch(args, hooked); },
                                   [&] {
                                     h.hook();
                                     comm->synchronize();
                                   }),
                               dt));
  }
  point.ops.push_back(result(Op::kRoundTrip,
                             time_op(*comm, plan,
                                     [&] {
                                       d = comm->dispatch(args, worst);
                                       CombineArgs a = zero_copy;
                                       if (!shape.ht()) a.y = comm->combine_buffer(d.handle);
                                       comm->combine(a, d.handle);
                                     }),
                             sum(dt, ct)));
  comm->synchronize();
  return point;
}

}  // namespace

int run_processes(int argc, char** argv, Options& o) {
  MpiSession mpi(argc, argv);
  try {
    if (o.given.count("--ranks") && o.ranks != mpi.size)
      throw UsageError("--ranks " + std::to_string(o.ranks) + ": started with " +
                       std::to_string(mpi.size) +
                       " processes (one rank each); drop --ranks or give the same number");
    for (const char* opt : {"--sweep", "--tune", "--staged", "--graph", "--phases"})
      if (o.given.count(opt))
        throw UsageError(std::string(opt) +
                         ": virtual-rank mode only (run ep_bench without mpirun); one process per "
                         "GPU times dispatch, combine, cached and exact dispatch, the LL send "
                         "phase and the round trip");
    o.ranks = mpi.size;
    const std::vector<int> host = host_of_ranks(mpi.size);
    o.nodes = find_nodes(o, host);
    const bool declared = o.given.count("--nodes") || o.given.count("--virtual-nodes");
    const std::string host_id =
        declared ? "node-" + std::to_string(mpi.rank / (mpi.size / o.nodes)) : std::string();

    const int devices = moecomm::cuda_device_count();
    if (devices == 0)
      throw std::runtime_error("no CUDA device is visible (ep_bench needs a GPU per process)");
    if (!o.given.count("--device")) o.device = moecomm::mpi_local_rank(MPI_COMM_WORLD) % devices;
    if (o.device >= devices)
      throw UsageError("--device " + std::to_string(o.device) + ": only " +
                       std::to_string(devices) + " device(s) visible");
    MOECOMM_CUDA_CHECK(cudaSetDevice(o.device));

    RunRecord run;
    run.date = utc_now();
    run.machine = query_machine(o.device);
    if (o.num_sms > run.machine.sm_count)
      throw UsageError("--num-sms " + std::to_string(o.num_sms) + ": the GPU has " +
                       std::to_string(run.machine.sm_count) + " SMs");
    // Rank 0's GPU alone, while the others wait: a copy on a shared GPU would measure less.
    double copy_rate = 0;
    if (mpi.rank == 0) {
      std::fprintf(stderr, "ep_bench: %d processes, measuring rank 0's copy rate...\n", mpi.size);
      copy_rate = measure_copy_rate(o.device);
    }
    mpi_check(MPI_Bcast(&copy_rate, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD), "MPI_Bcast");
    run.copy_rate = copy_rate;
    run.ranks_as = "processes";
    run.notes.push_back(
        std::to_string(mpi.size) + " processes, one rank each (" + std::to_string(o.nodes) +
        (declared ? " declared" : "") +
        " node(s)); each figure is the slowest rank's time per iteration, "
        "host launch included; LL combine reads its input from the communicator's combine buffer "
        "(zero-copy); the naive pipeline, the graph and one-launch forms "
        "exist in virtual-rank mode only");
    for (const Mode mode : {Mode::kHighThroughput, Mode::kLowLatency}) {
      if ((mode == Mode::kHighThroughput && !o.run_ht) || (mode == Mode::kLowLatency && !o.run_ll))
        continue;
      run.points.push_back(run_point(o, mode, mpi.rank, host_id));
      if (mpi.rank == 0) {
        std::fprintf(stderr, "ep_bench: %s", mode == Mode::kHighThroughput ? "ht" : "ll");
        for (const OpResult& op : run.points.back().ops)
          std::fprintf(stderr, ", %s %.1f us", op_name(op.op), op.time.median);
        std::fprintf(stderr, "\n");
      }
    }
    if (mpi.rank == 0) {
      if (!o.json_path.empty()) {
        write_json(run, o, o.json_path);
        std::fprintf(stderr, "ep_bench: wrote %s\n", o.json_path.c_str());
      }
      print_table(run, o, stdout);
      std::fflush(stdout);
    }
    mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    return 0;
  } catch (const UsageError& e) {
    if (mpi.rank == 0)
      std::fprintf(stderr, "ep_bench: %s\n(ep_bench --help lists the options)\n", e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  } catch (const VerificationError& e) {
    std::fprintf(stderr,
                 "ep_bench: rank %d: correctness check failed, no figures printed.\n  %s\n"
                 "Rerun with the same --seed to reproduce.\n",
                 mpi.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ep_bench: rank %d: error: %s\n", mpi.rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  return 1;
}

#endif  // MOECOMM_BENCH_WITH_MPI

}  // namespace epb
