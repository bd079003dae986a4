// The transport's "signal every peer, wait for every peer" step, with the ranks played by the
// blocks of one kernel (each block has its own DeviceContext): a group of more ranks than a block
// has threads can only be formed this way on one GPU (virtual groups hold at most 16 ranks there).
#include <random>

#include "gpu/gpu_common.hpp"
#include "runtime/device_context.hpp"
#include "transport/signal.cuh"

using namespace moecomm;
using namespace moecomm::test;

namespace {

using DeviceContext = detail::RankContext;  // the transport needs only the runtime part
using detail::DeviceError;
using detail::FlagKind;
using detail::Phase;

constexpr size_t kFlagBytes = sizeof(uint64_t) * static_cast<size_t>(FlagKind::kCount) * 64;

/// Block b is rank b; ranks listed as absent return at once (a peer that never calls).
__global__ void signal_all_kernel(const DeviceContext* ctxs, uint64_t seq, uint64_t absent_mask,
                                  int* ok) {
  const DeviceContext& ctx = ctxs[blockIdx.x];
  if ((absent_mask >> blockIdx.x) & 1ull) return;
  const bool done =
      transport::signal_and_wait_all(ctx, FlagKind::kDispatchDone, seq, Phase::kDispatchDone, 7);
  if (threadIdx.x == 0) ok[blockIdx.x] = done ? 1 : 0;
}

/// R ranks, their flag buffers, error records and abort words.
struct BlockGroup {
  int R;
  DeviceBuffer<uint8_t> sym;
  DeviceBuffer<DeviceError> errors;
  DeviceBuffer<int32_t> aborted;
  DeviceBuffer<uint64_t> masks;  // no rank masked
  DeviceBuffer<DeviceContext> ctxs;
  DeviceBuffer<int> ok;

  BlockGroup(int ranks, double timeout_s)
      : R(ranks),
        sym(kFlagBytes * ranks),
        errors(ranks),
        aborted(ranks),
        masks(ranks),
        ctxs(ranks),
        ok(ranks) {
    MOECOMM_CUDA_CHECK(cudaMemset(sym.get(), 0, sym.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(errors.get(), 0, errors.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(aborted.get(), 0, aborted.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(masks.get(), 0, masks.bytes()));
    std::vector<DeviceContext> host(ranks);
    for (int r = 0; r < ranks; ++r) {
      DeviceContext c{};
      c.rank = r;
      c.num_ranks = ranks;
      c.one_gpu = 1;
      c.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
      for (int p = 0; p < ranks; ++p) c.peers[p] = sym.get() + kFlagBytes * p;
      c.sym.flags = 0;
      c.local.aborted = aborted.get() + r;
      c.local.rank_mask = masks.get() + r;
      c.error = errors.get() + r;
      host[r] = c;
    }
    ctxs.upload(host);
  }

  std::vector<int> run(uint64_t seq, int threads, uint64_t absent = 0) {
    ok.poison();
    signal_all_kernel<<<R, threads>>>(ctxs.get(), seq, absent, ok.get());
    MOECOMM_CUDA_CHECK(cudaGetLastError());
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
    return ok.download();
  }
};

}  // namespace

TEST_CASE("signal_and_wait_all: 40 ranks of 32-thread blocks, 3 ranks of 1024, calls in a row") {
  REQUIRE_GPU();
  struct Shape {
    int ranks, threads;
  };
  for (Shape s : {Shape{40, 32}, Shape{64, 32}, Shape{33, 64}, Shape{3, 1024}}) {
    BlockGroup g(s.ranks, 5.0);
    for (uint64_t seq = 1; seq <= 3; ++seq) {
      const auto ok = g.run(seq, s.threads);
      for (int r = 0; r < s.ranks; ++r)
        CHECK_EQ(ok[r], 1) << "R=" << s.ranks << " threads=" << s.threads << " seq " << seq
                           << " rank " << r;
    }
    for (const DeviceError& e : g.errors.download())
      CHECK_EQ(e.kind, 0) << "R=" << s.ranks << ": rank " << e.rank << " recorded peer " << e.peer;
  }
}

TEST_CASE("signal_and_wait_all: a rank above the block's threads never calls: a bounded stall") {
  REQUIRE_GPU();
  const int R = 40, absent = 37;
  BlockGroup g(R, 0.2);
  const auto ok = g.run(1, 32, 1ull << absent);
  const auto errors = g.errors.download();
  for (int r = 0; r < R; ++r) {
    if (r == absent) continue;
    CHECK_EQ(ok[r], 0) << "rank " << r << " completed although rank " << absent << " never called";
    CHECK_EQ(errors[r].kind, static_cast<int>(detail::DeviceErrorKind::kStall)) << "rank " << r;
    CHECK_EQ(errors[r].peer, absent) << "rank " << r;
    CHECK_EQ(errors[r].phase, static_cast<int>(Phase::kDispatchDone)) << "rank " << r;
    CHECK_EQ(errors[r].channel, 7) << "rank " << r;
  }
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
