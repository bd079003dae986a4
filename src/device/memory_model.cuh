// The memory-model primitives every kernel uses: acquire/release loads and stores, fences, the
// 16-byte vector moves, the bulk (TMA) stores and loads and their shared-memory barriers. Nothing
// else in moecomm writes inline PTX for ordering.
#pragma once

#include <cstdint>

namespace moecomm::device {

/// Release store at system scope: every write of this thread (and, through a preceding CTA
/// barrier and fence, of its block) is visible to a peer that acquires this value.
__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

/// Acquire load at system scope: pairs with st_release_sys.
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

/// Relaxed (volatile-strength) load at system scope, for polling before an acquire fence.
__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

/// Orders all prior memory operations of this thread before all later ones, for every observer
/// in the system (peers on other GPUs included).
__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

/// The same at GPU scope (co-located ranks only).
__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

/// Release store at GPU scope: enough when every observer runs on this GPU.
__device__ __forceinline__ void st_release_gpu(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

/// Acquire load at GPU scope: pairs with st_release_gpu.
__device__ __forceinline__ uint64_t ld_acquire_gpu(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

/// The scope a group needs: GPU scope when every rank runs on this GPU (virtual ranks of one
/// device), system scope when peers sit on other GPUs. System-scope fences cost more.
struct Scope {
  bool gpu_only;

  __device__ __forceinline__ void fence() const {
    if (gpu_only)
      fence_acq_rel_gpu();
    else
      fence_acq_rel_sys();
  }
  __device__ __forceinline__ void store_release(uint64_t* ptr, uint64_t v) const {
    if (gpu_only)
      st_release_gpu(ptr, v);
    else
      st_release_sys(ptr, v);
  }
  __device__ __forceinline__ uint64_t load_acquire(const uint64_t* ptr) const {
    return gpu_only ? ld_acquire_gpu(ptr) : ld_acquire_sys(ptr);
  }
};

/// Nanoseconds from the GPU's global timer (coarse, but monotonic and shared by all SMs).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// global_timer_ns() as lane 0 of the warp reads it: the same value in every lane, so that a
/// decision taken on it is warp-uniform.
__device__ __forceinline__ uint64_t global_timer_ns_warp() {
  return __shfl_sync(0xffffffffu, global_timer_ns(), 0);
}

/// 16-byte global load that bypasses L1 allocation (data read once).
__device__ __forceinline__ int4 ld_stream_16(const void* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

/// 16-byte load of data another rank wrote during this kernel's lifetime (no non-coherent path).
__device__ __forceinline__ int4 ld_peer_16(const void* ptr) {
  int4 v;
  asm volatile("ld.global.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr)
               : "memory");
  return v;
}

/// 16 bytes at an address that is 2-byte aligned at least, in four 4-byte or eight 2-byte loads:
/// the unaligned case of ld_peer_16_any and ld_stream_16_any.
__device__ __forceinline__ int4 ld_16_unaligned(const void* ptr) {
  uint32_t w[4];
  if ((reinterpret_cast<uintptr_t>(ptr) & 3u) == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      asm volatile("ld.global.u32 %0, [%1];"
                   : "=r"(w[i])
                   : "l"(static_cast<const uint32_t*>(ptr) + i)
                   : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned short lo, hi;
      const uint16_t* p = static_cast<const uint16_t*>(ptr) + 2 * i;
      asm volatile("ld.global.u16 %0, [%1];" : "=h"(lo) : "l"(p) : "memory");
      asm volatile("ld.global.u16 %0, [%1];" : "=h"(hi) : "l"(p + 1) : "memory");
      w[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                   static_cast<int>(w[3]));
}

/// ld_peer_16 for an address that may be only 2-byte aligned: a peer's bf16 tensor published as
/// it is, a view that starts inside a larger buffer. The test is uniform over a row, so aligned
/// rows pay one predictable branch.
__device__ __forceinline__ int4 ld_peer_16_any(const void* ptr) {
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) == 0) return ld_peer_16(ptr);
  return ld_16_unaligned(ptr);
}

/// ld_stream_16 (data no one writes while this kernel runs) for an address that may be only
/// 2-byte aligned.
__device__ __forceinline__ int4 ld_stream_16_any(const void* ptr) {
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) == 0) return ld_stream_16(ptr);
  return ld_16_unaligned(ptr);
}

/// 16-byte store that does not linger in L1.
__device__ __forceinline__ void st_stream_16(void* ptr, int4 v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

/// Bulk (TMA) store of `bytes` (a multiple of 16) from shared to global memory, both 16-byte
/// aligned: one instruction moves a whole piece of a row, asynchronously, without registers. It
/// joins the thread's open bulk group (bulk_commit closes it).
__device__ __forceinline__ void bulk_store(void* global_dst, const void* shared_src, int bytes) {
  const auto src = static_cast<uint32_t>(__cvta_generic_to_shared(shared_src));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global_dst),
               "r"(src), "r"(bytes)
               : "memory");
}

/// Closes the thread's open bulk group.
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

/// Waits until at most `Pending` of the thread's bulk groups still read their shared sources:
/// the slots of the older ones may be written again.
template <int Pending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(Pending) : "memory");
}

/// Waits until every bulk store of the thread has been written, and orders those writes (made by
/// the asynchronous proxy) before the thread's later generic accesses: a release that follows
/// publishes them.
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

/// Orders this thread's generic writes to shared memory before bulk copies (asynchronous proxy)
/// that a thread of the block issues after a barrier.
__device__ __forceinline__ void fence_shared_to_bulk() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

/// Initialises a shared-memory barrier (mbarrier) whose phases complete after `arrivals`
/// arrivals and the bytes they announced. Before a bulk load signals it, fence_barrier_init().
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, int arrivals) {
  const auto bar = static_cast<uint32_t>(__cvta_generic_to_shared(barrier));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}

/// Makes this thread's barrier initialisations visible to the asynchronous proxy (bulk loads).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

/// Orders the generic accesses this thread has seen (peers' rows it acquired) before the bulk
/// loads it issues afterwards: the loads read what the acquire made visible.
__device__ __forceinline__ void fence_generic_to_bulk() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

/// Bulk (TMA) load of `bytes` (a multiple of 16) from global to shared memory, both 16-byte
/// aligned; `barrier`'s current phase completes when the bytes have landed. Arrives on the
/// barrier announcing the bytes, so one call per phase of a barrier initialised for 1 arrival.
__device__ __forceinline__ void bulk_load(void* shared_dst, const void* global_src, int bytes,
                                          uint64_t* barrier) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  const auto bar = static_cast<uint32_t>(__cvta_generic_to_shared(barrier));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(global_src), "r"(bytes), "r"(bar)
      : "memory");
}

/// Whether the phase of `barrier` with the given parity has completed (waits a short while in
/// hardware before answering no). Acquire: the bytes of a bulk load it completed are visible.
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* barrier, uint32_t parity) {
  const auto bar = static_cast<uint32_t>(__cvta_generic_to_shared(barrier));
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

/// Mask of the lanes below this one.
__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

}  // namespace moecomm::device
