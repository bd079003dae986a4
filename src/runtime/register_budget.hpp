// The two register budgets the streaming kernels are built for, and the launch that picks one.
#pragma once

#include <type_traits>

#include "runtime/limits.hpp"

namespace moecomm::detail {

/// Blocks of up to kWideBlockThreads threads get 128 registers a thread (more bytes in flight per
/// warp, no spills); larger blocks get 64. A kernel built for both is a template on its block size
/// with `__launch_bounds__(kBlockThreads, 1)`: without the 1, ptxas may still aim at two blocks an
/// SM and spill at 64 registers.
inline constexpr int kWideBlockThreads = 512;

template <int kBlockThreads>
using RegisterBudget = std::integral_constant<int, kBlockThreads>;

/// Calls launch(budget) with the budget for blocks of `threads` threads: a kernel template is
/// then launched as kernel<decltype(budget)::value>.
template <typename Launch>
void with_register_budget(int threads, Launch&& launch) {
  if (threads <= kWideBlockThreads)
    launch(RegisterBudget<kWideBlockThreads>{});
  else
    launch(RegisterBudget<kMaxBlockThreads>{});
}

/// Calls fn(budget) for both budgets (preloading both instantiations of a kernel).
template <typename Fn>
void for_each_register_budget(Fn&& fn) {
  fn(RegisterBudget<kWideBlockThreads>{});
  fn(RegisterBudget<kMaxBlockThreads>{});
}

}  // namespace moecomm::detail
