// The config agreement of process groups, without a GPU: each rank's handle starts with a digest
// (runtime/config_digest.hpp) and connect() compares all of them. Here the digests of "ranks"
// with different configs and versions are built directly and compared as connect() does.
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "moecomm/config.hpp"
#include "moecomm/error.hpp"
#include "moecomm/version.hpp"
#include "runtime/config_digest.hpp"

using namespace moecomm;
using namespace moecomm::detail;

namespace {

Config good() {
  Config c;
  c.num_experts = 256;
  c.hidden = 7168;
  c.topk = 8;
  c.max_tokens_per_rank = 4096;
  return c;
}

using Block = std::vector<uint8_t>;

/// The digests of a group whose rank r has configs[r] (and versions[r], default this library's).
std::vector<Block> digests(const std::vector<Config>& configs,
                           const std::vector<std::string>& versions = {}) {
  std::vector<Block> out;
  const int R = static_cast<int>(configs.size());
  for (int r = 0; r < R; ++r)
    out.push_back(
        encode_config_digest(configs[r], r, R, versions.empty() ? version() : versions[r]));
  return out;
}

/// Compares them as connect() does: by span, each block as a rank sent it.
void check(const std::vector<Block>& blocks) {
  std::vector<std::span<const uint8_t>> spans;
  for (const Block& b : blocks) spans.emplace_back(b);
  check_config_digests(spans);
}

}  // namespace

TEST_CASE("the digest has a fixed size and fits every valid config") {
  CHECK_EQ(encode_config_digest(good(), 0, 8, version()).size(), kConfigDigestSize);
  Config big = good();  // the longest value of every field
  big.num_experts = -2147483647 - 1;
  big.hidden = -2147483647 - 1;
  big.topk = -2147483647 - 1;
  big.max_tokens_per_rank = -2147483647 - 1;
  big.num_sms = -2147483647 - 1;
  big.threads_per_block = -2147483647 - 1;
  big.expert_alignment = -2147483647 - 1;
  big.timeout_seconds = -1.2345678901234567e-300;
  big.max_recv_tokens = -9223372036854775807LL - 1;
  big.low_latency_max_tokens = -2147483647 - 1;
  big.auto_low_latency_max_tokens = -2147483647 - 1;
  const Block b = encode_config_digest(big, 63, 64, version());
  CHECK_EQ(b.size(), kConfigDigestSize);
  CHECK_EQ(b.back(), 0);
  // Half the block is still free for fields added later.
  CHECK(std::strlen(reinterpret_cast<const char*>(b.data())) < kConfigDigestSize / 2);
}

TEST_CASE("equal configs agree") {
  check(digests({good()}));
  check(digests({good(), good(), good(), good()}));
}

TEST_CASE("a differing field is named with the ranks on each side") {
  Config other = good();
  other.hidden = 4096;
  CHECK_THROWS(check(digests({good(), other, good()})), InvalidArgument,
               "Config.hidden differs: ranks 0,2 have 7168, rank 1 has 4096 (every rank of a "
               "group needs the same Config)");
  // Every differing field is listed, in the order of Config::to_text().
  other.mode = Mode::kLowLatency;
  other.timeout_seconds = 10.5;
  CHECK_THROWS(check(digests({good(), good(), good(), good(), other})), InvalidArgument,
               "Config.hidden differs: ranks 0-3 have 7168, rank 4 has 4096; Config.mode differs: "
               "ranks 0-3 have high_throughput, rank 4 has low_latency; "
               "Config.timeout_seconds differs: ranks 0-3 have 10, rank 4 has 10.5");
  // Three values.
  Config third = good();
  third.hidden = 2048;
  CHECK_THROWS(check(digests({good(), other, third, good()})), InvalidArgument,
               "Config.hidden differs: ranks 0,3 have 7168, rank 1 has 4096, rank 2 has 2048");
}

TEST_CASE("every field takes part, the bool and double ones too") {
  Config a = good(), b = good();
  b.validate_inputs = !a.validate_inputs;
  CHECK_THROWS(check(digests({a, b})), InvalidArgument, "Config.validate_inputs differs");
  b = good();
  b.timeout_seconds = 10.000000000000002;  // one ulp
  CHECK_THROWS(check(digests({a, b})), InvalidArgument, "Config.timeout_seconds differs");
  b = good();
  b.scale_format = ScaleFormat::kPowerOfTwo;
  CHECK_THROWS(check(digests({a, b})), InvalidArgument,
               "Config.scale_format differs: rank 0 has f32, rank 1 has pow2");
}

TEST_CASE("the internode fields take part: an rdma_bytes mismatch is reported") {
  Config a = good(), b = good();
  a.rdma_bytes = int64_t{1} << 30;
  b.rdma_bytes = int64_t{1} << 29;
  CHECK_THROWS(check(digests({a, a, b})), InvalidArgument,
               "Config.rdma_bytes differs: ranks 0,1 have 1073741824, rank 2 has 536870912");
  b = a;
  b.nic_model_gbps = 50.0;
  CHECK_THROWS(check(digests({a, b})), InvalidArgument,
               "Config.nic_model_gbps differs: rank 0 has 0, rank 1 has 50");
  b = a;
  b.nic_model_latency_us = 2.0;
  CHECK_THROWS(check(digests({a, b})), InvalidArgument, "Config.nic_model_latency_us differs");
  b = a;
  b.engine = RdmaEngine::kGin;
  CHECK_THROWS(check(digests({a, b})), InvalidArgument,
               "Config.engine differs: rank 0 has auto, rank 1 has gin");
}

TEST_CASE("a different library version is named first") {
  Config other = good();
  other.hidden = 4096;
  CHECK_THROWS(check(digests({good(), good(), other}, {"0.1.0", "0.1.0", "0.2.0"})),
               InvalidArgument,
               "library version differs: ranks 0,1 have 0.1.0, rank 2 has 0.2.0 (every rank of a "
               "group must load the same moecomm)");
}

TEST_CASE("group size and rank order") {
  std::vector<Block> b = digests({good(), good(), good()});
  std::swap(b[1], b[2]);
  CHECK_THROWS(check(b), InvalidArgument,
               "all_handles: entry 1 holds rank 2's handle; expected the handles in rank order");
  b = digests({good(), good(), good()});
  b[2] = encode_config_digest(good(), 2, 4, version());
  CHECK_THROWS(check(b), InvalidArgument,
               "group size differs: ranks 0,1 have 3, rank 2 has 4 (every rank's "
               "ProcessGroupBuilder needs the same size)");
  b.pop_back();
  b[0] = encode_config_digest(good(), 0, 3, version());
  b[1] = encode_config_digest(good(), 1, 3, version());
  CHECK_THROWS(check(b), InvalidArgument,
               "all_handles: expected 3 handles (the group size every rank passed), got 2");
}

TEST_CASE("bytes that are not a digest are refused, never read past") {
  std::vector<Block> b = digests({good(), good()});
  b[1].assign(kConfigDigestSize, 0xab);  // no NUL inside the block
  CHECK_THROWS(check(b), InvalidArgument,
               "all_handles: entry 1 is not a moecomm handle (expected the bytes of rank 1's "
               "ProcessGroupBuilder::local_handle(), in rank order)");
  b[1].assign(kConfigDigestSize, 0);  // empty text
  CHECK_THROWS(check(b), InvalidArgument, "entry 1 is not a moecomm handle");
  b[1] = Block(b[0].begin(), b[0].begin() + 100);  // short
  CHECK_THROWS(check(b), InvalidArgument, "entry 1 is not a moecomm handle");
  b = digests({good(), good()});
  b[0][3] = 'X';  // header
  CHECK_THROWS(check(b), InvalidArgument, "entry 0 is not a moecomm handle");
}

TEST_CASE("rank lists") {
  CHECK_EQ(rank_list({0}), std::string("0"));
  CHECK_EQ(rank_list({0, 2}), std::string("0,2"));
  CHECK_EQ(rank_list({0, 1}), std::string("0,1"));
  CHECK_EQ(rank_list({0, 1, 2, 3, 5, 7, 8, 9}), std::string("0-3,5,7-9"));
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
