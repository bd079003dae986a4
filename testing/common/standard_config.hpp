// The standard MoE shape of the benchmarks (hidden 7168, top-8 of 256 experts, 4096 tokens per
// rank), as a valid Config for tests to start from.
#pragma once

#include "moecomm/config.hpp"

namespace moecomm::test {

inline Config standard_config() {
  Config c;
  c.num_experts = 256;
  c.hidden = 7168;
  c.topk = 8;
  c.max_tokens_per_rank = 4096;
  return c;
}

}  // namespace moecomm::test
