// Host-side API checks that need the library (CUDA runtime linked): the clear error raised where
// no GPU is present (or, with one, the co-residency check). Config, tensor views and config files
// are tested in test_config.cpp (host code only, also run under the sanitizers).
#include <string>

#include "common/harness.hpp"
#include "common/standard_config.hpp"
#include "moecomm/moecomm.hpp"

using namespace moecomm;

namespace {

Config good() {
  return test::standard_config();
}

}  // namespace

TEST_CASE("groups: a clear error without a GPU, the co-residency check with one") {
  Config c = good();
  c.max_tokens_per_rank = 16;
  c.hidden = 128;
  if (cuda_device_count() == 0) {
    CHECK_THROWS(VirtualGroup(c, 2), Unsupported, "no CUDA device");
    CHECK_THROWS(device_sm_count(0), Unsupported, "no CUDA device");
  } else {
    c.num_sms = device_sm_count(0);
    CHECK_THROWS(VirtualGroup(c, 2), InvalidArgument, "Config.num_sms");
  }
  Config bad = c;
  bad.num_experts = 9;
  CHECK_THROWS(VirtualGroup(bad, 2), InvalidArgument, "Config.num_experts");
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
