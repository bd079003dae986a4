#include "layout/layout.hpp"

#include <string>

#include "layout/layout_steps.cuh"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"
#include "transport/barrier.cuh"

namespace moecomm::layout {

namespace {

using detail::kMaxBlockThreads;

__global__ void __launch_bounds__(kMaxBlockThreads)
    layout_kernel(detail::DeviceContext ctx, LayoutParams p) {
  extern __shared__ uint32_t columns[];
  const uint64_t seq = device::read_call_seq(ctx);
  compute_layout(ctx, p, seq, columns, device::whole_grid());
  device::trace_mark(ctx, seq, detail::TraceMark::kOpened);
  if (p.scan.close_call && transport::is_last_block(ctx) && threadIdx.x == 0) {
    device::trace_mark(ctx, seq, detail::TraceMark::kClosed);
    device::close_call(ctx);
  }
}

}  // namespace

void launch_layout(const detail::DeviceContext& ctx, const LayoutParams& params, int blocks,
                   int threads, cudaStream_t stream) {
  if (sizeof(uint32_t) * static_cast<size_t>(ctx.num_experts) > kColumnSmemLimit)
    throw InvalidArgument("Config.num_experts: expected at most " +
                          std::to_string(kColumnSmemLimit / sizeof(uint32_t)) + ", got " +
                          std::to_string(ctx.num_experts));
  layout_kernel<<<blocks, threads, column_smem_bytes(ctx.num_experts, threads), stream>>>(ctx,
                                                                                          params);
  MOECOMM_LAUNCH_CHECK("layout_kernel");
}

size_t block_bitmap_smem_bytes(int num_experts, int64_t num_tokens) {
  return sizeof(uint32_t) * static_cast<size_t>(num_experts) *
         static_cast<size_t>((num_tokens + 31) / 32);
}

bool block_bitmaps_fit(int num_experts, int64_t num_tokens) {
  return block_bitmap_smem_bytes(num_experts, num_tokens) <= kColumnSmemLimit;
}

void preload_kernels() {
  detail::preload_kernel(layout_kernel, kColumnSmemLimit);
}

}  // namespace moecomm::layout
