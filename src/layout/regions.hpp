// The memory the routing layout needs: its count-exchange matrices in every rank's symmetric
// buffer, and per rank the bitmaps, prefix counts and totals that get_layout returns and that
// HT dispatch and LL send read.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/arena.hpp"

namespace moecomm::layout {

struct Regions {
  // Symmetric (byte offsets).
  size_t count_matrix;   // i32 [2][R][R]: row s = tokens s sends to each rank (parity = seq & 1)
  size_t expert_counts;  // i32 [2][R][L]: tokens s sends to each of this rank's experts
  // Private, sized for Tmax tokens (W = words of 32 tokens).
  uint32_t* expert_bitmap;         // [E][W]
  int32_t* expert_word_prefix;     // [E][W]
  uint32_t* rank_bitmap;           // [R][W]
  int32_t* rank_word_prefix;       // [R][W]
  uint64_t* token_rank_mask;       // [Tmax]
  int32_t* num_tokens_per_rank;    // [R]
  int32_t* num_tokens_per_expert;  // [E]
  uint8_t* is_token_in_rank;       // [Tmax * R]
  int32_t* num_recv_per_rank;      // [R]
  int32_t* num_recv_per_expert;    // [L] unpadded
  int32_t* send_base;              // [R]: first row of this rank's tokens at each destination
};

/// Appends the layout's regions to the symmetric and private arenas.
Regions claim_regions(const detail::RegionShape& shape, detail::Arena& symmetric,
                      detail::Arena& local);

}  // namespace moecomm::layout
