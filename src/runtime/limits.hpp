// The limits every layer shares: kernels size fixed arrays by them, Config::validate enforces
// them, and the host reference quantises with the same group size.
#pragma once

namespace moecomm::detail {

inline constexpr int kMaxRanks = 64;       // token->rank masks are 64-bit
inline constexpr int kMaxTopk = 32;        // a token's experts fit one warp
inline constexpr int kMaxExperts = 12288;  // the layout kernel keeps a column of E words per warp
inline constexpr int kFp8Group = 128;      // channels per fp8 scale
inline constexpr int kMaxBlockThreads = 1024;  // threads_per_block every kernel launches with

}  // namespace moecomm::detail
