// Config: the names of its enums (one parser for config files and the bindings), its checks
// against the limits every layer shares (runtime/limits.hpp), and the config-file format.
#include "moecomm/config.hpp"

#include <fstream>
#include <functional>
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
  if (num_sms < 1) bad("num_sms", ">= 1", num_sms);
  if (threads_per_block < 32 || threads_per_block > detail::kMaxBlockThreads ||
      threads_per_block % 32 != 0)
    bad("threads_per_block", "a multiple of 32 in 32..1024", threads_per_block);
  if (expert_alignment < 1) bad("expert_alignment", ">= 1", expert_alignment);
  if (!(timeout_seconds > 0.0) || timeout_seconds > 3600.0)
    throw InvalidArgument("Config.timeout_seconds: expected a value in (0, 3600], got " +
                          std::to_string(timeout_seconds));
  if (max_recv_tokens < 0) bad("max_recv_tokens", ">= 0 (0: worst case)", max_recv_tokens);
  if (low_latency_max_tokens < 0) bad("low_latency_max_tokens", ">= 0", low_latency_max_tokens);
  if (auto_low_latency_max_tokens < 1)
    bad("auto_low_latency_max_tokens", ">= 1", auto_low_latency_max_tokens);
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

template <typename T>
Field int_field(const char* name, T Config::*member) {
  return {name, [member](const Config& c) { return std::to_string(c.*member); },
          [member, name](Config& c, const std::string& v) {
            try {
              c.*member = static_cast<T>(std::stoll(v));
            } catch (const std::exception&) {
              throw InvalidArgument(std::string("config file: ") + name +
                                    ": expected an integer, got '" + v + "'");
            }
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
           throw InvalidArgument(
               "config file: mode: expected low_latency, high_throughput or auto, got '" + v + "'");
       }},
      int_field("num_sms", &Config::num_sms),
      int_field("threads_per_block", &Config::threads_per_block),
      int_field("expert_alignment", &Config::expert_alignment),
      int_field("enable_fp8", &Config::enable_fp8),
      {"scale_format",
       [](const Config& c) { return std::string(scale_format_name(c.scale_format)); },
       [](Config& c, const std::string& v) {
         if (!scale_format_from_name(v, &c.scale_format))
           throw InvalidArgument("config file: scale_format: expected f32 or pow2, got '" + v +
                                 "'");
       }},
      {"timeout_seconds", [](const Config& c) { return std::to_string(c.timeout_seconds); },
       [](Config& c, const std::string& v) {
         try {
           c.timeout_seconds = std::stod(v);
         } catch (const std::exception&) {
           throw InvalidArgument("config file: timeout_seconds: expected a number, got '" + v +
                                 "'");
         }
       }},
      int_field("max_recv_tokens", &Config::max_recv_tokens),
      int_field("low_latency_max_tokens", &Config::low_latency_max_tokens),
      int_field("auto_low_latency_max_tokens", &Config::auto_low_latency_max_tokens),
      int_field("validate_inputs", &Config::validate_inputs),
      int_field("mask_unresponsive_ranks", &Config::mask_unresponsive_ranks),
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
    bool known = false;
    for (const auto& f : fields())
      if (key == f.name) {
        f.set(*this, value);
        known = true;
      }
    if (!known)
      throw InvalidArgument("config file '" + path + "' line " + std::to_string(lineno) +
                            ": unknown key '" + key + "'");
  }
}

void Config::save_file(const std::string& path) const {
  std::ofstream out(path);
  if (!out) throw InvalidArgument("config file '" + path + "': cannot be written");
  out << "# moecomm config\n" << to_text();
}

}  // namespace moecomm
