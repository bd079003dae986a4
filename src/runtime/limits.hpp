// The limits every layer shares: kernels size fixed arrays by them, Config::validate enforces
// them, and the host reference quantises with the same group size.
#pragma once

namespace moecomm::detail {

inline constexpr int kMaxRanks = 64;       // token->rank masks are 64-bit
inline constexpr int kMaxTopk = 32;        // a token's experts fit one warp
inline constexpr int kMaxExperts = 12288;  // the layout kernel keeps a column of E words per warp
inline constexpr int kFp8Group = 128;      // channels per fp8 scale
inline constexpr int kMaxBlockThreads = 1024;  // threads_per_block every kernel launches with
// The streaming kernels are built for two register budgets: blocks of up to kWideBlockThreads
// threads get 128 registers a thread (more bytes in flight per warp, no spills), larger ones 64.
// (`__launch_bounds__(kWideBlockThreads, 1)`: without the 1, ptxas may still aim at two blocks
// an SM and spill at 64.)
inline constexpr int kWideBlockThreads = 512;

}  // namespace moecomm::detail
