// Host-side API checks: Config validation messages, tensor views, config files, and the clear
// error raised where no GPU is present (or, with one, the co-residency check).
#include <cstdio>
#include <string>

#include "common/harness.hpp"
#include "moecomm/moecomm.hpp"

using namespace moecomm;

namespace {

Config good() {
  Config c;
  c.num_experts = 256;
  c.hidden = 7168;
  c.topk = 8;
  c.max_tokens_per_rank = 4096;
  return c;
}

}  // namespace

TEST_CASE("a valid config passes") {
  good().validate(8);
}

TEST_CASE("config errors name the field and the expected range") {
  Config c = good();
  c.num_experts = 250;
  CHECK_THROWS(c.validate(8), InvalidArgument,
               "Config.num_experts: expected a multiple of the number of ranks (8)");
  c = good();
  c.topk = 0;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.topk: expected 1..32, got 0");
  c.topk = 33;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.topk: expected 1..32, got 33");
  c = good();
  c.hidden = 7000;
  CHECK_THROWS(c.validate(8), InvalidArgument,
               "Config.hidden: expected a multiple of 128 when enable_fp8");
  c.enable_fp8 = false;
  c.hidden = 7004;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.hidden: expected a multiple of 8");
  c.hidden = 7000;
  c.validate(8);  // fp8 off: multiples of 8 are fine
  c = good();
  c.max_tokens_per_rank = 0;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.max_tokens_per_rank");
  c = good();
  c.num_sms = 0;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.num_sms");
  c = good();
  c.threads_per_block = 100;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.threads_per_block");
  c = good();
  c.timeout_seconds = 0;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.timeout_seconds");
  CHECK_THROWS(good().validate(0), InvalidArgument, "num_ranks: expected 1..64");
  CHECK_THROWS(good().validate(65), InvalidArgument, "num_ranks");
}

TEST_CASE("tensor views describe themselves and know contiguity") {
  int dummy = 0;
  TensorView v = TensorView::contiguous(&dummy, DType::kBF16, {4, 7168}, 0);
  CHECK_EQ(v.numel(), 4 * 7168);
  CHECK_EQ(v.nbytes(), size_t{4 * 7168 * 2});
  CHECK(v.is_contiguous());
  CHECK_EQ(v.describe(), std::string("[4, 7168] bf16 on cuda:0"));
  v.strides[0] = 8000;
  CHECK(!v.is_contiguous());
  TensorView absent;
  CHECK(!absent.present());
  CHECK_EQ(absent.describe(), std::string("absent"));
  TensorView empty = TensorView::contiguous(nullptr, DType::kI64, {0, 8}, kHostDevice);
  CHECK(empty.present());
  CHECK_EQ(empty.numel(), 0);
}

TEST_CASE("config files round-trip and reject unknown keys") {
  Config c = good();
  c.num_sms = 20;
  c.mode = Mode::kAuto;
  c.scale_format = ScaleFormat::kPowerOfTwo;
  const std::string path = "test_api_config.cfg";
  c.save_file(path);
  Config d;
  d.load_file(path);
  CHECK_EQ(d.num_sms, 20);
  CHECK(d.mode == Mode::kAuto);
  CHECK(d.scale_format == ScaleFormat::kPowerOfTwo);
  CHECK_EQ(d.to_text(), c.to_text());
  {
    FILE* f = std::fopen(path.c_str(), "w");
    std::fputs("num_sms = 12\nwarp_speed = 9\n", f);
    std::fclose(f);
  }
  CHECK_THROWS(d.load_file(path), InvalidArgument, "unknown key 'warp_speed'");
  {
    FILE* f = std::fopen(path.c_str(), "w");
    std::fputs("num_sms = many\n", f);
    std::fclose(f);
  }
  CHECK_THROWS(d.load_file(path), InvalidArgument, "num_sms: expected an integer");
  CHECK_THROWS(d.load_file("/nonexistent/x.cfg"), InvalidArgument, "cannot be opened");
  std::remove(path.c_str());
}

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
