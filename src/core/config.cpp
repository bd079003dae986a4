// Config: the names of its enums (one parser for config files and the bindings), its checks
// against the limits every layer shares (runtime/limits.hpp), and the config-file format.
#include "moecomm/config.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>

#include "moecomm/error.hpp"
#include "runtime/limits.hpp"

namespace moecomm {

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kLowLatency:
      return "low_latency";
    case Mode::kHighThroughput:
      return "high_throughput";
    case Mode::kAuto:
      return "auto";
  }
  return "?";
}

const char* mode_short_name(Mode mode) {
  switch (mode) {
    case Mode::kLowLatency:
      return "ll";
    case Mode::kHighThroughput:
      return "ht";
    case Mode::kAuto:
      return "auto";
  }
  return "?";
}

bool mode_from_name(const std::string& name, Mode* mode) {
  for (Mode m : {Mode::kLowLatency, Mode::kHighThroughput, Mode::kAuto})
    if (name == mode_name(m) || name == mode_short_name(m)) {
      *mode = m;
      return true;
    }
  return false;
}

const char* scale_format_name(ScaleFormat format) {
  return format == ScaleFormat::kPowerOfTwo ? "pow2" : "f32";
}

bool scale_format_from_name(const std::string& name, ScaleFormat* format) {
  if (name == "f32" || name == "float32") {
    *format = ScaleFormat::kFloat32;
    return true;
  }
  if (name == "pow2" || name == "power_of_two") {
    *format = ScaleFormat::kPowerOfTwo;
    return true;
  }
  return false;
}

const char* rdma_engine_name(RdmaEngine engine) {
  switch (engine) {
    case RdmaEngine::kAuto:
      return "auto";
    case RdmaEngine::kLoopback:
      return "loopback";
    case RdmaEngine::kGin:
      return "gin";
  }
  return "?";
}

bool rdma_engine_from_name(const std::string& name, RdmaEngine* engine) {
  for (RdmaEngine e : {RdmaEngine::kAuto, RdmaEngine::kLoopback, RdmaEngine::kGin})
    if (name == rdma_engine_name(e)) {
      *engine = e;
      return true;
    }
  return false;
}

namespace {

[[noreturn]] void bad(const std::string& field, const std::string& expected, long long got) {
  throw InvalidArgument("Config." + field + ": expected " + expected + ", got " +
                        std::to_string(got));
}

}  // namespace

// Each check names the field, what was expected and what came: the first violation raises.
// The bounds are the kernels' (fixed arrays of kMaxRanks, a warp per token's experts, 16-byte
// row vectors), so a config that passes here can always launch.
void Config::validate(int num_ranks) const {
  if (num_ranks < 1 || num_ranks > detail::kMaxRanks)
    throw InvalidArgument("num_ranks: expected 1.." + std::to_string(detail::kMaxRanks) + ", got " +
                          std::to_string(num_ranks));
  if (num_experts < 1 || num_experts > detail::kMaxExperts)
    bad("num_experts", "1.." + std::to_string(detail::kMaxExperts), num_experts);
  if (num_experts % num_ranks != 0)
    throw InvalidArgument("Config.num_experts: expected a multiple of the number of ranks (" +
                          std::to_string(num_ranks) + "), got " + std::to_string(num_experts));
  if (topk < 1 || topk > detail::kMaxTopk) bad("topk", "1..32", topk);
  if (topk > num_experts) bad("topk", "<= num_experts (" + std::to_string(num_experts) + ")", topk);
  if (hidden < 1) bad("hidden", ">= 1", hidden);
  if (enable_fp8 && hidden % detail::kFp8Group != 0)
    bad("hidden", "a multiple of 128 when enable_fp8 is set", hidden);
  if (hidden % 8 != 0) bad("hidden", "a multiple of 8", hidden);  // rows move as 16-byte vectors
  if (max_tokens_per_rank < 1) bad("max_tokens_per_rank", ">= 1", max_tokens_per_rank);
  // Enums cast from integers (C++ callers may) would otherwise reach the kernels' selection.
  if (mode != Mode::kLowLatency && mode != Mode::kHighThroughput && mode != Mode::kAuto)
    bad("mode", "kLowLatency, kHighThroughput or kAuto", static_cast<long long>(mode));
  if (scale_format != ScaleFormat::kFloat32 && scale_format != ScaleFormat::kPowerOfTwo)
    bad("scale_format", "kFloat32 or kPowerOfTwo", static_cast<long long>(scale_format));
  if (num_sms < 1) bad("num_sms", ">= 1", num_sms);
  if (threads_per_block < 32 || threads_per_block > detail::kMaxBlockThreads ||
      threads_per_block % 32 != 0)
    bad("threads_per_block", "a multiple of 32 in 32..1024", threads_per_block);
  if (expert_alignment < 1) bad("expert_alignment", ">= 1", expert_alignment);
  if (!(timeout_seconds > 0.0) || timeout_seconds > 3600.0)
    throw InvalidArgument("Config.timeout_seconds: expected a value in (0, 3600], got " +
                          std::to_string(timeout_seconds));
  if (rdma_bytes < 0) bad("rdma_bytes", ">= 0 (0: no RDMA window)", rdma_bytes);
  if (!(nic_model_gbps >= 0.0) || nic_model_gbps > 1e6)
    throw InvalidArgument(
        "Config.nic_model_gbps: expected a value in [0, 1e6] (0: no NIC model), "
        "got " +
        std::to_string(nic_model_gbps));
  if (!(nic_model_latency_us >= 0.0) || nic_model_latency_us > 1e6)
    throw InvalidArgument("Config.nic_model_latency_us: expected a value in [0, 1e6], got " +
                          std::to_string(nic_model_latency_us));
  if (engine != RdmaEngine::kAuto && engine != RdmaEngine::kLoopback && engine != RdmaEngine::kGin)
    bad("engine", "kAuto, kLoopback or kGin", static_cast<long long>(engine));
  if (max_recv_tokens < 0) bad("max_recv_tokens", ">= 0 (0: worst case)", max_recv_tokens);
  if (low_latency_max_tokens < 0) bad("low_latency_max_tokens", ">= 0", low_latency_max_tokens);
  if (auto_low_latency_max_tokens < 1)
    bad("auto_low_latency_max_tokens", ">= 1", auto_low_latency_max_tokens);
  // Buffer sizes are products of these fields in size_t. Keep them far from its range: a size
  // that wrapped would allocate a small buffer that the kernels then overrun. The bound is
  // generous (every region of both paths, double-buffered, 8 bytes per hidden channel).
  const long double ht_rows = max_recv_tokens > 0
                                  ? static_cast<long double>(max_recv_tokens)
                                  : static_cast<long double>(num_ranks) * max_tokens_per_rank;
  const long double ll_slots = static_cast<long double>(num_experts) * ll_capacity();
  const long double row_bytes = 8.0L * hidden + 16.0L * topk + 64.0L;
  const long double bytes = (ht_rows + 2.0L * ll_slots) * row_bytes;
  constexpr long double kMaxBytes = 1ULL << 60;
  if (bytes > kMaxBytes) {
    char text[64];
    std::snprintf(text, sizeof(text), "%.3Lg", bytes);
    throw InvalidArgument(std::string("Config: buffers of about ") + text +
                          " bytes per rank; expected at most 2^60 (reduce max_tokens_per_rank, "
                          "max_recv_tokens, low_latency_max_tokens or hidden)");
  }
}

int Config::ll_capacity() const {
  if (low_latency_max_tokens > 0) return low_latency_max_tokens;
  if (mode == Mode::kAuto) return std::min(auto_low_latency_max_tokens, max_tokens_per_rank);
  return max_tokens_per_rank;
}

namespace {

// One table serves to_text and load_file: name, how to print, how to parse.
struct Field {
  const char* name;
  std::function<std::string(const Config&)> get;
  std::function<void(Config&, const std::string&)> set;
};

// Values must parse completely and fit the field: "12abc" or 2^40 for an int field is an error,
// never a silently different value. Messages start with the key; load_file adds file and line.
template <typename T>
Field int_field(const char* name, T Config::*member) {
  return {name, [member](const Config& c) { return std::to_string(c.*member); },
          [member, name](Config& c, const std::string& v) {
            long long parsed = 0;
            const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), parsed);
            if (ec == std::errc() && end == v.data() + v.size() &&
                parsed >= static_cast<long long>(std::numeric_limits<T>::min()) &&
                parsed <= static_cast<long long>(std::numeric_limits<T>::max())) {
              c.*member = static_cast<T>(parsed);
              return;
            }
            throw InvalidArgument(std::string(name) + ": expected an integer in " +
                                  std::to_string(std::numeric_limits<T>::min()) + ".." +
                                  std::to_string(std::numeric_limits<T>::max()) + ", got '" + v +
                                  "'");
          }};
}

Field bool_field(const char* name, bool Config::*member) {
  return {name, [member](const Config& c) { return std::string(c.*member ? "1" : "0"); },
          [member, name](Config& c, const std::string& v) {
            if (v == "1" || v == "true")
              c.*member = true;
            else if (v == "0" || v == "false")
              c.*member = false;
            else
              throw InvalidArgument(std::string(name) + ": expected 0, 1, true or false, got '" +
                                    v + "'");
          }};
}

/// Shortest text that reads back as the same double (so that save_file/load_file and the
/// process-group config check see every bit of it).
std::string double_text(double v) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

Field double_field(const char* name, double Config::*member) {
  return {
      name, [member](const Config& c) { return double_text(c.*member); },
      [member, name](Config& c, const std::string& v) {
        double parsed = 0;
        const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), parsed);
        if (ec != std::errc() || end != v.data() + v.size() || !std::isfinite(parsed))
          throw InvalidArgument(std::string(name) + ": expected a finite number, got '" + v + "'");
        c.*member = parsed;
      }};
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      int_field("num_experts", &Config::num_experts),
      int_field("hidden", &Config::hidden),
      int_field("topk", &Config::topk),
      int_field("max_tokens_per_rank", &Config::max_tokens_per_rank),
      {"mode", [](const Config& c) { return std::string(mode_name(c.mode)); },
       [](Config& c, const std::string& v) {
         if (!mode_from_name(v, &c.mode))
           throw InvalidArgument("mode: expected low_latency, high_throughput or auto, got '" + v +
                                 "'");
       }},
      int_field("num_sms", &Config::num_sms),
      int_field("threads_per_block", &Config::threads_per_block),
      int_field("expert_alignment", &Config::expert_alignment),
      bool_field("enable_fp8", &Config::enable_fp8),
      {"scale_format",
       [](const Config& c) { return std::string(scale_format_name(c.scale_format)); },
       [](Config& c, const std::string& v) {
         if (!scale_format_from_name(v, &c.scale_format))
           throw InvalidArgument("scale_format: expected f32 or pow2, got '" + v + "'");
       }},
      double_field("timeout_seconds", &Config::timeout_seconds),
      int_field("max_recv_tokens", &Config::max_recv_tokens),
      int_field("low_latency_max_tokens", &Config::low_latency_max_tokens),
      int_field("auto_low_latency_max_tokens", &Config::auto_low_latency_max_tokens),
      bool_field("validate_inputs", &Config::validate_inputs),
      bool_field("mask_unresponsive_ranks", &Config::mask_unresponsive_ranks),
      int_field("rdma_bytes", &Config::rdma_bytes),
      double_field("nic_model_gbps", &Config::nic_model_gbps),
      double_field("nic_model_latency_us", &Config::nic_model_latency_us),
      {"engine", [](const Config& c) { return std::string(rdma_engine_name(c.engine)); },
       [](Config& c, const std::string& v) {
         if (!rdma_engine_from_name(v, &c.engine))
           throw InvalidArgument("engine: expected auto, loopback or gin, got '" + v + "'");
       }},
  };
  return table;
}

}  // namespace

std::string Config::to_text() const {
  std::string text;
  for (const auto& f : fields()) text += std::string(f.name) + " = " + f.get(*this) + "\n";
  return text;
}

void Config::load_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgument("config file '" + path + "': cannot be opened");
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    const auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    const auto eq = line.find('=');
    auto trim = [](std::string s) {
      const auto b = s.find_first_not_of(" \t\r");
      const auto e = s.find_last_not_of(" \t\r");
      return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
    };
    if (trim(line).empty()) continue;
    if (eq == std::string::npos)
      throw InvalidArgument("config file '" + path + "' line " + std::to_string(lineno) +
                            ": expected 'key = value'");
    const std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    const std::string where = "config file '" + path + "' line " + std::to_string(lineno) + ": ";
    const auto f = std::find_if(fields().begin(), fields().end(),
                                [&](const Field& field) { return key == field.name; });
    if (f == fields().end()) throw InvalidArgument(where + "unknown key '" + key + "'");
    try {
      f->set(*this, value);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(where + e.what());
    }
  }
}

void Config::save_file(const std::string& path) const {
  std::ofstream out(path);
  if (!out) throw InvalidArgument("config file '" + path + "': cannot be written");
  out << "# moecomm config\n" << to_text();
}

}  // namespace moecomm
