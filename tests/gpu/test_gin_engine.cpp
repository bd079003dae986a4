// The NCCL GIN engine (docs/multinode.md) with two processes on one GPU declared as two hosts:
// each child sets NCCL_HOSTID (NCCL then accepts two ranks on one GPU and sees two nodes) and the
// matching moecomm host id, and the parent carries the handles over pipes. What runs everywhere
// NCCL is built in: the NCCL communicator from the unique id in rank 0's handle, the buffer
// allocated by NCCL and registered as a window, the device-communicator request, and the engine
// choice with its errors. GIN traffic itself needs RDMA NICs: where NCCL reports none, that part
// is skipped and the reason printed. The parent never initialises CUDA (fork after CUDA
// initialisation is unsafe).
#include <cstdlib>

#include "gpu/ep_fixture.hpp"
#include "gpu/process_children.hpp"
#include "transport/gin_engine.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

constexpr int kRanks = 2;
constexpr int E = 16, K = 4, H = 256, kMaxTokens = 64;
// Child exit codes.
constexpr int kGinUp = 0;          // the GIN engine is up (a GIN-capable network)
constexpr int kNoGinChecked = 10;  // NCCL comm and window set up; no GIN: the error named both
constexpr int kNoNccl = 11;        // built without NCCL: the error said so
constexpr int kBadMessage = 12;    // an error that does not say what it should
constexpr int kWrongEngine = 13;   // loopback / auto did not behave
constexpr int kExitNoGpu = 77;

bool has(const std::string& s, const char* part) {
  return s.find(part) != std::string::npos;
}

/// A rank of two processes declared as two hosts, with Config::engine = engine.
int run_rank(int rank, int to_parent, int from_parent, RdmaEngine engine) {
  // Before NCCL starts: NCCL then takes the two processes for two hosts.
  setenv("NCCL_HOSTID", ("moecomm-gin-test-host-" + std::to_string(rank)).c_str(), 1);
  if (cuda_device_count() == 0) return kExitNoGpu;
  Config cfg = test_config(Mode::kHighThroughput, E, K, H, kMaxTokens);
  cfg.rdma_bytes = required_rdma_bytes(cfg, kRanks, kRanks);
  cfg.engine = engine;
  ProcessGroupBuilder builder(cfg, rank, kRanks, 0);
  builder.set_host_id("host-" + std::to_string(rank));
  const std::vector<uint8_t> all =
      swap_handles(to_parent, from_parent, builder.local_handle(), kRanks);
  if (engine != RdmaEngine::kGin) {  // one machine: auto and loopback both take loopback
    auto comm = builder.connect(all);
    return comm->num_nodes() == kRanks ? 0 : kWrongEngine;
  }
  try {
    auto comm = builder.connect(all);
    std::printf("rank %d: the GIN engine is up (%d nodes)\n", rank, comm->num_nodes());
    return kGinUp;
  } catch (const Unsupported& e) {
    const std::string what = e.what();
    if (rank == 0) std::printf("rank 0: connect(engine=gin): %s\n", e.what());
    if (detail::nccl_build_version() == 0)
      return has(what, "built without NCCL") ? kNoNccl : kBadMessage;
    // The NCCL setup ran (communicator, window) and the message says what GIN lacks.
    const bool named = has(what, "the GIN engine is unavailable") && has(what, "NCCL 2.") &&
                       has(what, "set up so far") && has(what, "2 ranks") &&
                       has(what, "window of ") &&
                       (has(what, "GIN-capable network") || has(what, "GIN device code"));
    return named ? kNoGinChecked : kBadMessage;
  }
}

/// The children's exit codes; *carried: the handles went round.
std::vector<int> run_group(RdmaEngine engine, bool* carried) {
  return run_children(
      kRanks,
      [&](int rank, int to_parent, int from_parent) {
        return run_rank(rank, to_parent, from_parent, engine);
      },
      carried);
}

}  // namespace

TEST_CASE("two processes as two hosts, engine=gin: NCCL communicator, window, GIN or its reason") {
  std::printf("   built with NCCL %s; GIN device code: %s\n",
              detail::nccl_version_text(detail::nccl_build_version()).c_str(),
              detail::gin_built() ? "yes" : detail::gin_build_note().c_str());
  bool carried = false;
  const std::vector<int> rcs = run_group(RdmaEngine::kGin, &carried);
  if (rcs[0] == kExitNoGpu && rcs[1] == kExitNoGpu) {
    skip("no CUDA device");
    return;
  }
  CHECK(carried) << "handles could not be carried";
  if (rcs[0] == kNoNccl && rcs[1] == kNoNccl) {
    skip("built without NCCL (MOECOMM_WITH_NCCL): the engine=gin error says so (checked)");
    return;
  }
  for (int r = 0; r < kRanks; ++r)
    CHECK(rcs[r] == kGinUp || rcs[r] == kNoGinChecked)
        << "rank " << r << " exit " << rcs[r]
        << " (10: no GIN, named; 12: an error that does not say what is missing; 2: error)";
  CHECK_EQ(rcs[0], rcs[1]) << "the ranks disagree on GIN";
  if (rcs[0] == kNoGinChecked)
    std::printf(
        "   NCCL bootstrap and window registration: ok; GIN traffic: skipped: no GIN-capable "
        "network here (the reason is printed above)\n");
}

TEST_CASE("two processes of one machine as two hosts, engine=auto and loopback: loopback") {
  for (RdmaEngine engine : {RdmaEngine::kAuto, RdmaEngine::kLoopback}) {
    bool carried = false;
    const std::vector<int> rcs = run_group(engine, &carried);
    if (rcs[0] == kExitNoGpu && rcs[1] == kExitNoGpu) {
      skip("no CUDA device");
      return;
    }
    CHECK(carried) << "handles could not be carried";
    for (int r = 0; r < kRanks; ++r)
      CHECK_EQ(rcs[r], 0) << "rank " << r << " engine=" << rdma_engine_name(engine)
                          << " (13: wrong node count; 2: error)";
  }
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
