// A project outside the tree that uses the installed package.
#include <moecomm/moecomm.hpp>

#include <cstdio>

int main() {
  moecomm::Config config;
  config.num_experts = 8;
  config.hidden = 128;
  config.topk = 2;
  config.max_tokens_per_rank = 16;
  config.validate(2);
  std::printf("moecomm %s\n", moecomm::version());
  return 0;
}
