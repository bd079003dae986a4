// Host code only (also built with ASan/UBSan, scripts/sanitize.sh): Config validation messages,
// config files (strict values, round trips), tensor views (malformed ones included) and the
// argument checks of the calls.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "common/harness.hpp"
#include "common/standard_config.hpp"
#include "core/validate.hpp"
#include "moecomm/config.hpp"
#include "moecomm/error.hpp"
#include "moecomm/tensor.hpp"

using namespace moecomm;

namespace {

Config good() {
  return test::standard_config();
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

namespace {

/// Writes `text` to a scratch file and loads it onto `c`.
void load_text(Config& c, const std::string& text) {
  const std::string path = "test_config_scratch.cfg";
  FILE* f = std::fopen(path.c_str(), "w");
  std::fputs(text.c_str(), f);
  std::fclose(f);
  try {
    c.load_file(path);
  } catch (...) {
    std::remove(path.c_str());
    throw;
  }
  std::remove(path.c_str());
}

}  // namespace

TEST_CASE("config files: values must parse completely and fit the field") {
  Config c = good();
  CHECK_THROWS(load_text(c, "num_sms = 12abc\n"), InvalidArgument,
               "line 1: num_sms: expected an integer in -2147483648..2147483647, got '12abc'");
  CHECK_THROWS(load_text(c, "\nhidden = 99999999999\n"), InvalidArgument,
               "line 2: hidden: expected an integer");
  CHECK_THROWS(load_text(c, "max_recv_tokens = 99999999999999999999\n"), InvalidArgument,
               "max_recv_tokens: expected an integer");
  CHECK_THROWS(load_text(c, "enable_fp8 = 2\n"), InvalidArgument,
               "enable_fp8: expected 0, 1, true or false, got '2'");
  CHECK_THROWS(load_text(c, "timeout_seconds = 5s\n"), InvalidArgument,
               "timeout_seconds: expected a finite number, got '5s'");
  CHECK_THROWS(load_text(c, "timeout_seconds = nan\n"), InvalidArgument, "finite number");
  CHECK_THROWS(load_text(c, "timeout_seconds = 1e999\n"), InvalidArgument, "finite number");
  CHECK_THROWS(load_text(c, "mode = fast\n"), InvalidArgument,
               "mode: expected low_latency, high_throughput or auto, got 'fast'");
  CHECK_THROWS(load_text(c, "num_sms\n"), InvalidArgument, "expected 'key = value'");
  load_text(c,
            "# tuned\nvalidate_inputs = true   # trailing comment\nenable_fp8 = false\n"
            "max_recv_tokens = 9000000000\n");
  CHECK(c.validate_inputs);
  CHECK(!c.enable_fp8);
  CHECK_EQ(c.max_recv_tokens, int64_t{9000000000});
}

TEST_CASE("config files: every double survives a round trip") {
  for (double t : {10.0, 1e-7, 0.1, 1.0 / 3.0, 3599.9999999999995}) {
    Config c = good();
    c.timeout_seconds = t;
    Config d;
    load_text(d, c.to_text());
    CHECK_EQ(d.timeout_seconds, t);
    CHECK_EQ(d.to_text(), c.to_text());
  }
  Config c = good();
  CHECK(c.to_text().find("timeout_seconds = 10\n") != std::string::npos) << c.to_text();
}

TEST_CASE("config: buffers whose size would wrap are refused") {
  Config c = good();
  c.enable_fp8 = false;
  c.hidden = std::numeric_limits<int>::max() / 8 * 8;
  c.max_tokens_per_rank = std::numeric_limits<int>::max();
  CHECK_THROWS(c.validate(64), InvalidArgument, "Config: buffers of");
  c = good();
  c.max_recv_tokens = std::numeric_limits<int64_t>::max();
  CHECK_THROWS(c.validate(8), InvalidArgument, "max_recv_tokens");
}

TEST_CASE("tensor views: malformed views are described, never read past") {
  int dummy = 0;
  TensorView v = TensorView::contiguous(&dummy, DType::kBF16, {4, 8}, 0);
  v.ndim = 7;
  CHECK_EQ(v.numel(), -1);
  CHECK(!v.is_contiguous());
  CHECK_EQ(v.describe(), std::string("[ndim 7, expected at most 4] bf16 on cuda:0"));
  v = TensorView::contiguous(&dummy, DType::kBF16, {int64_t{1} << 40, int64_t{1} << 40}, 0);
  CHECK_EQ(v.numel(), -1);  // 2^80 elements
  CHECK(!v.is_contiguous());
  v = TensorView::contiguous(&dummy, DType::kI64, {3, -2}, kHostDevice);
  CHECK_EQ(v.numel(), -1);
  CHECK_THROWS(TensorView::contiguous(&dummy, DType::kI64, {1, 2, 3, 4, 5}, 0), InvalidArgument,
               "shape: expected at most 4 dimensions, got 5");
}

TEST_CASE("check_tensor names the argument and what was expected") {
  using detail::check_tensor;
  using detail::kAnyDim;
  int64_t dummy = 0;  // element-aligned for every dtype checked here
  const detail::TensorSpec spec{"topk_idx", {DType::kI64, DType::kI32}, {kAnyDim, 8}, "[T, 8]"};
  // Data that is not aligned to its element size cannot be read: refused by name.
  CHECK_THROWS(check_tensor(TensorView::contiguous(reinterpret_cast<char*>(&dummy) + 4,
                                                   DType::kI64, {3, 8}, 0),
                            spec, 0),
               InvalidArgument, "topk_idx: expected data aligned to its element size (8 bytes");
  check_tensor(TensorView::contiguous(&dummy, DType::kI64, {3, 8}, 0), spec, 0);
  CHECK_THROWS(check_tensor(TensorView::contiguous(&dummy, DType::kF32, {3, 8}, 0), spec, 0),
               InvalidArgument,
               "topk_idx: expected [T, 8] i64 or i32, contiguous, on cuda:0, got [3, 8] f32 on "
               "cuda:0");
  CHECK_THROWS(check_tensor(TensorView::contiguous(&dummy, DType::kI64, {3, 8}, 1), spec, 0),
               InvalidArgument, "got [3, 8] i64 on cuda:1");
  CHECK_THROWS(check_tensor(TensorView::contiguous(nullptr, DType::kI64, {3, 8}, 0), spec, 0),
               InvalidArgument, "topk_idx: expected");
  CHECK_THROWS(check_tensor(TensorView{}, spec, 0), InvalidArgument, "got absent");
  TensorView wide = TensorView::contiguous(&dummy, DType::kI64, {int64_t{1} << 62, 8}, 0);
  CHECK_THROWS(check_tensor(wide, spec, 0), InvalidArgument, "topk_idx: expected");
  TensorView deep = TensorView::contiguous(&dummy, DType::kI64, {3, 8}, 0);
  deep.ndim = 100;
  CHECK_THROWS(check_tensor(deep, spec, 0), InvalidArgument, "[ndim 100, expected at most 4]");
  check_tensor(TensorView::contiguous(nullptr, DType::kI32, {0, 8}, 0), spec, 0);  // empty: fine
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
