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
#include "paths/regions.hpp"
#include "runtime/arena.hpp"
#include "runtime/engine_choice.hpp"
#include "runtime/node_layout.hpp"

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

TEST_CASE("engine names round-trip") {
  for (RdmaEngine e : {RdmaEngine::kAuto, RdmaEngine::kLoopback, RdmaEngine::kGin}) {
    RdmaEngine back = RdmaEngine::kAuto;
    CHECK(rdma_engine_from_name(rdma_engine_name(e), &back));
    CHECK(back == e);
  }
  RdmaEngine e = RdmaEngine::kGin;
  CHECK(!rdma_engine_from_name("ibgda", &e));
  CHECK(e == RdmaEngine::kGin);
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
  CHECK_THROWS(check_tensor(TensorView::contiguous(reinterpret_cast<char*>(&dummy) + 4, DType::kI64,
                                                   {3, 8}, 0),
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

// ---- groups that span nodes: the RDMA window, its size, and nodes from host ids ------------

TEST_CASE("the RDMA engine: auto picks loopback on one machine, GIN across machines") {
  using detail::choose_engine;
  detail::EngineFacts f;
  f.num_nodes = 1;
  f.one_machine = false;
  CHECK(choose_engine(RdmaEngine::kAuto, f) == RdmaEngine::kLoopback);  // no traffic between nodes
  CHECK(choose_engine(RdmaEngine::kGin, f) == RdmaEngine::kLoopback);
  f.num_nodes = 2;
  f.one_machine = true;
  CHECK(choose_engine(RdmaEngine::kAuto, f) == RdmaEngine::kLoopback);
  CHECK(choose_engine(RdmaEngine::kLoopback, f) == RdmaEngine::kLoopback);
  f.nccl_build_note = "built without NCCL";
  CHECK_THROWS(choose_engine(RdmaEngine::kGin, f), Unsupported,
               "Config.engine=gin, which this build of moecomm lacks: built without NCCL");
  f.one_machine = false;
  CHECK_THROWS(choose_engine(RdmaEngine::kAuto, f), Unsupported,
               "Config.engine=auto: the group's 2 nodes run on several machines and need the "
               "NCCL GIN engine, which this build of moecomm lacks: built without NCCL");
  CHECK_THROWS(choose_engine(RdmaEngine::kLoopback, f), Unsupported,
               "Config.engine=loopback: the group's 2 nodes run on several machines");
  f.nccl_built = true;
  CHECK(choose_engine(RdmaEngine::kAuto, f) == RdmaEngine::kGin);
  CHECK(choose_engine(RdmaEngine::kGin, f) == RdmaEngine::kGin);
  f.one_machine = true;
  CHECK(choose_engine(RdmaEngine::kGin, f) == RdmaEngine::kGin);  // forced on one machine
  f.virtual_group = true;
  CHECK(choose_engine(RdmaEngine::kAuto, f) == RdmaEngine::kLoopback);
  CHECK_THROWS(choose_engine(RdmaEngine::kGin, f), Unsupported,
               "a VirtualGroup's ranks share one process");
}

TEST_CASE("internode fields: validation names the field") {
  Config c = good();
  c.rdma_bytes = -1;
  CHECK_THROWS(c.validate(8), InvalidArgument,
               "Config.rdma_bytes: expected >= 0 (0: no RDMA window), got -1");
  c = good();
  c.engine = static_cast<RdmaEngine>(7);
  CHECK_THROWS(c.validate(8), InvalidArgument,
               "Config.engine: expected kAuto, kLoopback or kGin, got 7");
  c = good();
  c.nic_model_gbps = -1.0;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.nic_model_gbps: expected a value in");
  c.nic_model_gbps = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.nic_model_gbps");
  c.nic_model_gbps = std::numeric_limits<double>::infinity();
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.nic_model_gbps");
  c = good();
  c.nic_model_latency_us = -0.5;
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.nic_model_latency_us: expected a value in");
  c.nic_model_latency_us = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS(c.validate(8), InvalidArgument, "Config.nic_model_latency_us");
  c = good();
  c.rdma_bytes = int64_t{1} << 33;
  c.nic_model_gbps = 50.0;
  c.nic_model_latency_us = 2.0;
  c.validate(8);
}

TEST_CASE("internode fields: round trip through to_text and config files") {
  Config c = good();
  c.rdma_bytes = 9000000000;  // past 32 bits
  c.nic_model_gbps = 48.5;
  c.nic_model_latency_us = 1.0 / 3.0;
  const std::string text = c.to_text();
  CHECK(text.find("rdma_bytes = 9000000000\n") != std::string::npos) << text;
  CHECK(text.find("nic_model_gbps = 48.5\n") != std::string::npos) << text;
  CHECK(text.find("nic_model_latency_us = ") != std::string::npos) << text;
  Config d;
  load_text(d, text);
  CHECK_EQ(d.rdma_bytes, int64_t{9000000000});
  CHECK_EQ(d.nic_model_gbps, 48.5);
  CHECK_EQ(d.nic_model_latency_us, 1.0 / 3.0);
  CHECK_EQ(d.to_text(), text);
  const std::string path = "test_config_internode.cfg";
  c.save_file(path);
  Config e;
  e.load_file(path);
  std::remove(path.c_str());
  CHECK_EQ(e.to_text(), text);
  CHECK_THROWS(load_text(d, "rdma_bytes = 1GB\n"), InvalidArgument,
               "rdma_bytes: expected an integer");
  CHECK_THROWS(load_text(d, "nic_model_gbps = nan\n"), InvalidArgument,
               "nic_model_gbps: expected a finite number");
}

TEST_CASE("required_rdma_bytes: positive across nodes, growing with tokens and hidden") {
  for (Mode mode : {Mode::kHighThroughput, Mode::kLowLatency, Mode::kAuto}) {
    Config c = good();
    c.mode = mode;
    c.max_tokens_per_rank = 128;
    const int64_t base = required_rdma_bytes(c, 16, 2);
    CHECK(base > 0) << mode_name(mode);
    CHECK(required_rdma_bytes(c, 16, 4) > 0) << mode_name(mode);
    Config more = c;
    more.max_tokens_per_rank = 512;
    CHECK(required_rdma_bytes(more, 16, 2) > base) << mode_name(mode);
    Config wider = c;
    wider.hidden = 2 * c.hidden;
    CHECK(required_rdma_bytes(wider, 16, 2) > base) << mode_name(mode);
    // The Config's own rdma_bytes plays no part.
    Config hinted = c;
    hinted.rdma_bytes = 12345;
    CHECK_EQ(required_rdma_bytes(hinted, 16, 2), base);
  }
  Config c = good();
  CHECK_THROWS(required_rdma_bytes(c, 16, 3), InvalidArgument,
               "num_nodes: expected a divisor of num_ranks 16, got 3");
  CHECK_THROWS(required_rdma_bytes(c, 16, 0), InvalidArgument, "num_nodes");
  CHECK_THROWS(required_rdma_bytes(c, 16, 32), InvalidArgument, "num_nodes");
  Config bad = c;
  bad.num_experts = 250;
  CHECK_THROWS(required_rdma_bytes(bad, 16, 2), InvalidArgument, "Config.num_experts");
}

TEST_CASE("symmetric plan of a group spanning nodes: the window must be large enough") {
  for (Mode mode : {Mode::kHighThroughput, Mode::kLowLatency}) {
    Config c = good();
    c.mode = mode;
    c.max_tokens_per_rank = 256;
    const int R = 16, N = 2;
    const int64_t need = required_rdma_bytes(c, R, N);
    const std::string needed = std::to_string(need);
    const auto shape = detail::region_shape(c, R, /*separate_processes=*/true, N);
    CHECK_THROWS(detail::symmetric_plan(c, shape), InvalidArgument, "Config.rdma_bytes");
    CHECK_THROWS(detail::symmetric_plan(c, shape), InvalidArgument, needed);
    c.rdma_bytes = need - 1;
    CHECK_THROWS(detail::symmetric_plan(c, shape), InvalidArgument,
                 "Config.rdma_bytes: expected at least " + needed);
    c.rdma_bytes = need;
    const detail::SymmetricPlan spanning = detail::symmetric_plan(c, shape);
    CHECK_EQ(spanning.window_bytes, static_cast<size_t>(need));
    // The plan does not depend on the node count: a process group allocates before it knows it.
    const auto one_node = detail::region_shape(c, R, /*separate_processes=*/true, 1);
    CHECK_EQ(detail::symmetric_plan(c, one_node).bytes, spanning.bytes);
    c.rdma_bytes = need + 4096;  // a larger hint is accepted
    detail::symmetric_plan(c, shape);
  }
  // One node needs no window.
  Config c = good();
  detail::symmetric_plan(c, detail::region_shape(c, 8, false, 1));
}

TEST_CASE("process groups: every rank derives the same nodes and the same window error") {
  // What connect() does on each rank with the same handles: node layout from the host ids, then
  // the plan for that shape. Every rank sees the same bytes, so every rank raises alike.
  const std::vector<std::string> hosts = {"a", "a", "a", "a", "b", "b", "b", "b"};
  Config c = good();
  c.rdma_bytes = 4096;  // far too small
  std::string first;
  for (int rank = 0; rank < 8; ++rank) {
    const detail::NodeLayout nodes = detail::node_layout(hosts);
    CHECK_EQ(nodes.num_nodes, 2);
    CHECK_EQ(nodes.node_size, 4);
    std::string message;
    try {
      detail::symmetric_plan(c, detail::region_shape(c, 8, true, nodes.num_nodes));
    } catch (const InvalidArgument& e) {
      message = e.what();
    }
    CHECK(message.find("Config.rdma_bytes: expected at least " +
                       std::to_string(required_rdma_bytes(c, 8, 2))) != std::string::npos)
        << message;
    if (rank == 0) first = message;
    CHECK_EQ(message, first);
  }
}

TEST_CASE("node layout from host ids") {
  auto layout = [](std::vector<std::string> hosts) { return detail::node_layout(hosts); };
  detail::NodeLayout n = layout({"h"});
  CHECK_EQ(n.num_nodes, 1);
  CHECK_EQ(n.node_size, 1);
  n = layout({"h", "h", "h", "h"});  // a single host
  CHECK_EQ(n.num_nodes, 1);
  CHECK_EQ(n.node_size, 4);
  n = layout({"a", "a", "b", "b", "c", "c"});
  CHECK_EQ(n.num_nodes, 3);
  CHECK_EQ(n.node_size, 2);
  n = layout({"z", "y"});  // names need no order
  CHECK_EQ(n.num_nodes, 2);
  CHECK_EQ(n.node_size, 1);
  CHECK_THROWS(layout({"a", "b", "a", "b"}), InvalidArgument,
               "host ids: the ranks of host 'a' are not contiguous");
  CHECK_THROWS(layout({"a", "b", "a", "b"}), InvalidArgument,
               "got hosts 'a' (ranks 0,2), 'b' (ranks 1,3)");
  CHECK_THROWS(layout({"a", "a", "a", "b"}), InvalidArgument,
               "hosts hold different numbers of ranks; expected the same number on every host, "
               "got hosts 'a' (ranks 0-2), 'b' (rank 3)");
  CHECK_THROWS(layout({}), InvalidArgument, "host ids");
}

TEST_CASE("host ids in handles: fixed size, checked, never read past") {
  const std::vector<uint8_t> block = detail::encode_host_id("node-17.cluster");
  CHECK_EQ(block.size(), detail::kHostIdSize);
  CHECK_EQ(detail::decode_host_id(block, 0), std::string("node-17.cluster"));
  const std::string longest(detail::kHostIdSize - 1, 'x');
  CHECK_EQ(detail::decode_host_id(detail::encode_host_id(longest), 0), longest);
  CHECK_THROWS(detail::encode_host_id(""), InvalidArgument, "host_id: expected 1..255 bytes");
  CHECK_THROWS(detail::encode_host_id(std::string(detail::kHostIdSize, 'x')), InvalidArgument,
               "host_id");
  CHECK_THROWS(detail::encode_host_id(std::string("a\0b", 3)), InvalidArgument, "host_id");
  std::vector<uint8_t> unterminated(detail::kHostIdSize, 'x');
  CHECK_THROWS(detail::decode_host_id(unterminated, 3), InvalidArgument,
               "all_handles: entry 3 holds no host id");
  std::vector<uint8_t> empty(detail::kHostIdSize, 0);
  CHECK_THROWS(detail::decode_host_id(empty, 1), InvalidArgument, "entry 1 holds no host id");
  CHECK(!detail::default_host_id().empty());
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
