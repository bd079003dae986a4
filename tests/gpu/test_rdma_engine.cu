// The RDMA engine seam with the loopback engine, ranks played by the blocks of one kernel (each
// with its own context and window): every rank puts a seeded payload into every other rank's
// window and signals; the receivers wait, check every byte and consume the signal. Also: a put
// outside the window is refused and recorded; the NIC model never completes a put sooner than
// its bytes at the modelled bandwidth plus the latency allow.
#include <random>

#include "gpu/gpu_common.hpp"
#include "runtime/device_context.hpp"
#include "transport/rdma.cuh"

using namespace moecomm;
using namespace moecomm::test;

namespace {

using Ctx = detail::RankContext;
using detail::DeviceError;
using detail::Phase;
namespace rdma = transport::rdma;

// Window of one rank: [R][bytes] receive slots, [R][bytes] staging (one per destination), then R
// u64 signals.
struct WindowShape {
  int R;
  uint64_t bytes;  // payload per (source, destination), a multiple of 16
  __host__ __device__ uint64_t recv(int src) const { return static_cast<uint64_t>(src) * bytes; }
  __host__ __device__ uint64_t stage(int dst) const {
    return static_cast<uint64_t>(R + dst) * bytes;
  }
  __host__ __device__ uint64_t sig(int src) const { return stage(R) + 8ull * src; }
  __host__ __device__ uint64_t size() const { return (sig(R) + 255) / 256 * 256; }  // aligned bases
};

/// Block b is rank b: stages its payload for each peer, puts it with a signal, then waits for
/// every peer's signal and copies what arrived to `received` [R][R][bytes].
__global__ void exchange_kernel(const Ctx* ctxs, WindowShape w, const uint8_t* payload,
                                uint8_t* received, int* ok) {
  const Ctx& ctx = ctxs[blockIdx.x];
  const int me = ctx.rank, lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  rdma::WarpPort port(ctx);
  uint8_t* mine = ctx.peers[me];
  for (int d = warp; d < w.R; d += blockDim.x / 32) {
    if (d == me) continue;
    // Stage (the source of a put must be in this rank's window), then put with a signal.
    const uint8_t* src = payload + (static_cast<uint64_t>(me) * w.R + d) * w.bytes;
    for (uint64_t i = lane; i < w.bytes; i += 32) mine[w.stage(d) + i] = src[i];
    port.put_signal(d, w.recv(me), w.stage(d), w.bytes, w.sig(me), 1);
  }
  port.flush();
  bool good = true;
  for (int s = threadIdx.x; s < w.R; s += blockDim.x) {
    if (s == me) continue;
    good = rdma::wait_signal(ctx, w.sig(s), 1, s, Phase::kRdmaData, 0) && good;
    if (good) rdma::consume_signal(ctx, w.sig(s), 1);
  }
  good = __syncthreads_and(good) != 0;
  for (uint64_t i = threadIdx.x; i < static_cast<uint64_t>(w.R) * w.bytes; i += blockDim.x)
    received[static_cast<uint64_t>(me) * w.R * w.bytes + i] = mine[i];
  if (threadIdx.x == 0) ok[me] = good ? 1 : 0;
}

/// Rank 0 puts `bytes` to rank 1 at `dst` (possibly outside the window) and signals.
__global__ void stray_put_kernel(const Ctx* ctxs, uint64_t dst, uint64_t bytes, uint64_t sig,
                                 unsigned long long* elapsed_ns) {
  const Ctx& ctx = ctxs[0];
  rdma::WarpPort port(ctx);
  const uint64_t start = device::global_timer_ns();
  port.put_signal(1, dst, 0, bytes, sig, 1);
  if (threadIdx.x == 0) *elapsed_ns = device::global_timer_ns() - start;
}

struct EngineGroup {
  WindowShape w;
  DeviceBuffer<uint8_t> sym;
  DeviceBuffer<DeviceError> errors;
  DeviceBuffer<int32_t> aborted;
  DeviceBuffer<uint64_t> masks, nic;
  DeviceBuffer<Ctx> ctxs;

  EngineGroup(int R, uint64_t bytes, float nic_gbps = 0, uint64_t latency_ns = 0)
      : w{R, bytes},
        sym(w.size() * R),
        errors(R),
        aborted(R),
        masks(R),
        nic(R),
        ctxs(R) {
    MOECOMM_CUDA_CHECK(cudaMemset(sym.get(), 0, sym.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(errors.get(), 0, errors.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(aborted.get(), 0, aborted.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(masks.get(), 0, masks.bytes()));
    MOECOMM_CUDA_CHECK(cudaMemset(nic.get(), 0, nic.bytes()));
    std::vector<Ctx> host(R);
    for (int r = 0; r < R; ++r) {
      Ctx c{};
      c.rank = r;
      c.num_ranks = R;
      c.num_nodes = R;  // every rank its own node: all traffic through the engine
      c.node_size = 1;
      c.node = r;
      c.one_gpu = 1;
      c.timeout_ns = 5'000'000'000ull;
      for (int p = 0; p < R; ++p) c.peers[p] = sym.get() + w.size() * p;
      c.local.aborted = aborted.get() + r;
      c.local.rank_mask = masks.get() + r;
      c.rdma.window_bytes = w.size();
      c.rdma.nic_model = nic_gbps > 0 ? 1 : 0;
      c.rdma.nic_bytes_per_ns = nic_gbps;
      c.rdma.nic_latency_ns = latency_ns;
      c.rdma.nic_busy_until = nic.get() + r;
      c.error = errors.get() + r;
      host[r] = c;
    }
    ctxs.upload(host);
  }
};

}  // namespace

TEST_CASE("loopback engine: every rank puts to every other, signals, receivers check every byte") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());  // printed by the harness
  for (int R : {2, 3, 8}) {
    for (uint64_t bytes : {16ull, 7168ull * 2, 4112ull}) {
      EngineGroup g(R, bytes);
      std::vector<uint8_t> payload(static_cast<size_t>(R) * R * bytes);
      DeviceBuffer<uint8_t> d_received(payload.size());
      DeviceBuffer<int> ok(R);
      for (int round = 0; round < 3; ++round) {  // signals consumed: calls in a row work
        for (auto& b : payload) b = static_cast<uint8_t>(rng());
        DeviceBuffer<uint8_t> d_payload(payload);
        d_received.poison();
        ok.poison();
        exchange_kernel<<<R, 128>>>(g.ctxs.get(), g.w, d_payload.get(), d_received.get(),
                                    ok.get());
        MOECOMM_CUDA_CHECK(cudaGetLastError());
        MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
        const auto got = d_received.download();
        const auto flags = ok.download();
        for (int d = 0; d < R; ++d) {
          CHECK_EQ(flags[d], 1) << "R=" << R << " rank " << d;
          for (int s = 0; s < R; ++s) {
            if (s == d) continue;
            for (uint64_t i = 0; i < bytes; ++i) {
              const uint8_t want = payload[(static_cast<uint64_t>(s) * R + d) * bytes + i];
              const uint8_t have = got[(static_cast<uint64_t>(d) * R + s) * bytes + i];
              if (want != have) {
                CHECK_EQ(int(have), int(want)) << "R=" << R << " bytes " << bytes << " round "
                                               << round << ": rank " << d << " from " << s
                                               << " byte " << i;
                break;
              }
            }
          }
        }
      }
      for (const DeviceError& e : g.errors.download()) CHECK_EQ(e.kind, 0) << "rank " << e.rank;
    }
  }
}

TEST_CASE("loopback engine: a put outside the window is refused and recorded") {
  REQUIRE_GPU();
  EngineGroup g(2, 256);
  DeviceBuffer<unsigned long long> elapsed(1);
  const auto before = g.sym.download();
  stray_put_kernel<<<1, 32>>>(g.ctxs.get(), g.w.size() - 128, 256, g.w.sig(0), elapsed.get());
  MOECOMM_CUDA_CHECK(cudaGetLastError());
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  const auto errors = g.errors.download();
  CHECK_EQ(errors[0].kind, static_cast<int>(detail::DeviceErrorKind::kRdmaOutOfWindow));
  CHECK_EQ(errors[0].a, static_cast<int64_t>(g.w.size() - 128));
  CHECK_EQ(errors[0].b, 256);
  // Nothing was written but the signal word (a signal inside the window is legitimate).
  auto after = g.sym.download();
  const uint64_t sig = g.w.size() + g.w.sig(0);  // rank 1's signal from rank 0
  CHECK_EQ(after[sig], 1) << "the signal was not added";
  after[sig] = before[sig];
  CHECK(before == after) << "a refused put changed memory";
}

TEST_CASE("loopback engine: the NIC model completes no sooner than bytes / bandwidth + latency") {
  REQUIRE_GPU();
  const uint64_t bytes = 1 << 20, latency_ns = 20'000;
  const float gbps = 2.0f;  // 1 MiB at 2 GB/s: 524 us
  EngineGroup g(2, bytes, gbps, latency_ns);
  DeviceBuffer<unsigned long long> elapsed(1);
  stray_put_kernel<<<1, 32>>>(g.ctxs.get(), g.w.recv(0), bytes, g.w.sig(0), elapsed.get());
  MOECOMM_CUDA_CHECK(cudaGetLastError());
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  const uint64_t floor_ns = static_cast<uint64_t>(bytes / gbps) + latency_ns;
  CHECK(elapsed.download()[0] >= floor_ns)
      << "completed after " << elapsed.download()[0] << " ns, the model allows " << floor_ns;
  for (const DeviceError& e : g.errors.download()) CHECK_EQ(e.kind, 0) << "rank " << e.rank;
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
