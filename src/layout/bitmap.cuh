// Reading the layout's bitmaps on the device (rows of W words, 32 tokens per word), and the
// shared memory the kernels that build them need per block. Kernel-side only: the host API of
// the layout is layout/layout.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moecomm::layout {

/// Largest dynamic shared memory the bitmap columns of one block may take.
inline constexpr size_t kColumnSmemLimit = 48 * 1024;

/// Warps of a block of `warps` that build bitmap columns: each needs E words of shared memory.
__host__ __device__ inline int column_warps(int num_experts, int warps) {
  const size_t column = sizeof(uint32_t) * static_cast<size_t>(num_experts);
  const size_t fit = column > 0 ? kColumnSmemLimit / column : 1;
  const int n = fit < static_cast<size_t>(warps) ? static_cast<int>(fit) : warps;
  return n > 0 ? n : 1;
}

/// Dynamic shared memory a kernel that runs the layout steps needs per block.
inline size_t column_smem_bytes(int num_experts, int threads) {
  return sizeof(uint32_t) * static_cast<size_t>(num_experts) *
         static_cast<size_t>(column_warps(num_experts, threads / 32));
}

/// Position of token t among the tokens whose bit is set in `bitmap`, from the words alone (no
/// prefix counts): cheap while rows are short (LL: T <= M tokens).
__device__ __forceinline__ int32_t bitmap_rank(const uint32_t* bitmap, int64_t t) {
  const int64_t w = t >> 5;
  int32_t n = __popc(bitmap[w] & ((1u << (t & 31)) - 1u));
  for (int64_t i = 0; i < w; ++i) n += __popc(bitmap[i]);
  return n;
}

/// Tokens whose bit is set in the first `used_words` words of `bitmap`.
__device__ __forceinline__ int32_t bitmap_count(const uint32_t* bitmap, int64_t used_words) {
  int32_t n = 0;
  for (int64_t i = 0; i < used_words; ++i) n += __popc(bitmap[i]);
  return n;
}

/// Rows of per-expert bitmaps, wherever they were built (global memory, or a block's shared
/// memory): row e is `words` words from bits + e * words.
struct ExpertBitmaps {
  const uint32_t* bits = nullptr;
  int64_t words = 0;

  __device__ __forceinline__ const uint32_t* row(int64_t e) const { return bits + e * words; }
};

/// Device helper for consumers: position of token t among this rank's tokens whose bit is set in
/// `bitmap` (a row of W words), given that row's exclusive word prefix.
__device__ __forceinline__ int32_t bitmap_position(const uint32_t* bitmap, const int32_t* prefix,
                                                   int64_t t) {
  const int64_t w = t >> 5;
  const uint32_t below = (1u << (t & 31)) - 1u;
  return prefix[w] + __popc(bitmap[w] & below);
}

}  // namespace moecomm::layout
