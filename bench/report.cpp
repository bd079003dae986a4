#include "report.hpp"

#include <cuda_runtime_api.h>

#include <cmath>
#include <ctime>
#include <fstream>
#include <sstream>
#include <utility>

#include "bench_common.hpp"
#include "moecomm/version.hpp"

namespace epb {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kGB = 1e9;
constexpr double kUs = 1e-6;

/// "12.8" from 12080.
std::string cuda_version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

// ---------------------------------------------------------------------------------------------
// A minimal JSON value (objects keep insertion order).
class Json {
 public:
  Json() = default;  // null
  Json(double v) : kind_(Kind::kNumber), number_(v) {}
  Json(int v) : Json(static_cast<double>(v)) {}
  Json(int64_t v) : Json(static_cast<double>(v)) {}
  Json(uint64_t v) : Json(static_cast<double>(v)) {}
  Json(bool v) : kind_(Kind::kBool), number_(v ? 1 : 0) {}
  Json(std::string v) : kind_(Kind::kString), text_(std::move(v)) {}
  Json(const char* v) : Json(std::string(v)) {}

  static Json object() { return Json(Kind::kObject); }
  static Json array() { return Json(Kind::kArray); }

  Json& set(const std::string& key, Json value) {
    members_.emplace_back(key, std::move(value));
    return *this;
  }
  Json& push(Json value) {
    items_.push_back(std::move(value));
    return *this;
  }

  void dump(std::ostream& os, int indent = 0) const {
    const std::string pad(indent + 2, ' '), end_pad(indent, ' ');
    switch (kind_) {
      case Kind::kNull:
        os << "null";
        break;
      case Kind::kBool:
        os << (number_ != 0 ? "true" : "false");
        break;
      case Kind::kNumber:
        dump_number(os);
        break;
      case Kind::kString:
        dump_string(os, text_);
        break;
      case Kind::kArray:
        os << "[";
        for (size_t i = 0; i < items_.size(); ++i) {
          os << (i ? ",\n" : "\n") << pad;
          items_[i].dump(os, indent + 2);
        }
        os << (items_.empty() ? "]" : "\n" + end_pad + "]");
        break;
      case Kind::kObject:
        os << "{";
        for (size_t i = 0; i < members_.size(); ++i) {
          os << (i ? ",\n" : "\n") << pad;
          dump_string(os, members_[i].first);
          os << ": ";
          members_[i].second.dump(os, indent + 2);
        }
        os << (members_.empty() ? "}" : "\n" + end_pad + "}");
        break;
    }
  }

 private:
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  explicit Json(Kind kind) : kind_(kind) {}

  void dump_number(std::ostream& os) const {
    constexpr double kExactInteger = 9007199254740992.0;  // 2^53
    if (!std::isfinite(number_)) {
      os << "null";
      return;
    }
    char buf[32];
    if (number_ == std::floor(number_) && std::fabs(number_) < kExactInteger)
      std::snprintf(buf, sizeof buf, "%.0f", number_);
    else
      std::snprintf(buf, sizeof buf, "%.9g", number_);
    os << buf;
  }
  static void dump_string(std::ostream& os, const std::string& s) {
    os << '"';
    for (const char c : s) {
      if (c == '"' || c == '\\')
        os << '\\' << c;
      else if (c == '\n')
        os << "\\n";
      else if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        os << buf;
      } else
        os << c;
    }
    os << '"';
  }

  Kind kind_ = Kind::kNull;
  double number_ = 0;
  std::string text_;
  std::vector<std::pair<std::string, Json>> members_;
  std::vector<Json> items_;
};

/// The Config's key = value lines as a JSON object (numbers where they parse as numbers).
Json config_json(const moecomm::Config& config) {
  Json out = Json::object();
  std::istringstream in(config.to_text());
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find(" = ");
    if (eq == std::string::npos) continue;
    const std::string key = line.substr(0, eq), value = line.substr(eq + 3);
    char* end = nullptr;
    const double number = std::strtod(value.c_str(), &end);
    if (!value.empty() && *end == '\0')
      out.set(key, number);
    else
      out.set(key, value);
  }
  return out;
}

Json& add_stats(Json& j, const Stats& s) {
  return j.set("median_us", s.median)
      .set("p10_us", s.p10)
      .set("p90_us", s.p90)
      .set("min_us", s.min)
      .set("max_us", s.max)
      .set("mean_us", s.mean)
      .set("samples", s.samples);
}

Json op_json(const OpResult& op, double copy_rate, const PointResult& p) {
  Json j = Json::object().set("op", op_key(op.op));
  add_stats(j, op.time);
  j.set("gbps_per_rank", gbps_per_rank(op.traffic, op.time));
  j.set("bytes_per_rank", op.traffic.convention_bytes_per_rank);
  j.set("hbm_bytes", op.traffic.hbm_bytes);
  j.set("copy_rate_fraction", copy_rate_fraction(op.traffic, op.time, copy_rate));
  // What the time and the bandwidth would be at the copy rate: the floor and the ceiling.
  const double floor_us = op.traffic.hbm_bytes / copy_rate / kUs;
  j.set("floor_us", floor_us);
  j.set("ceiling_gbps_per_rank", op.traffic.convention_bytes_per_rank / (floor_us * kUs) / kGB);
  // Virtual nodes (null on one node): DeepEP's internode figures and the modelled NIC's load.
  const bool nodes = p.shape.nodes > 1;
  const auto node_figure = [&](double v) { return nodes ? Json(v) : Json(); };
  j.set("rdma_bytes_per_rank", node_figure(op.traffic.rdma_bytes_per_rank));
  j.set("nvlink_bytes_per_rank", node_figure(op.traffic.nvlink_bytes_per_rank));
  j.set("rdma_gbps_per_rank", node_figure(rdma_gbps_per_rank(op.traffic, op.time)));
  j.set("nvl_gbps_per_rank", node_figure(nvl_gbps_per_rank(op.traffic, op.time)));
  j.set("nic_fraction", node_figure(nic_fraction(op.traffic, op.time, p.config.nic_model_gbps)));
  if (nodes && p.shape.ht()) {
    j.set("deepep_rdma_bytes_per_rank", op.traffic.deepep_rdma_bytes_per_rank);
    j.set("deepep_rdma_gbps_per_rank",
          op.time.median > 0 ? op.traffic.deepep_rdma_bytes_per_rank / (op.time.median * kUs) / kGB
                             : 0.0);
  }
  if (op.naive.samples > 0) {
    Json naive = Json::object();
    add_stats(naive, op.naive);
    naive.set("gbps_per_rank", gbps_per_rank(op.traffic, op.naive));
    if (nodes) {  // the modelled figure: measured intranode part + the NIC stage
      naive.set("measured_us", op.naive.median - op.naive_nic_us);
      naive.set("nic_stage_us", op.naive_nic_us);
      naive.set("rdma_gbps_per_rank", rdma_gbps_per_rank(op.traffic, op.naive));
    }
    j.set("naive", std::move(naive));
    j.set("speedup", op.naive.median / op.time.median);
  }
  if (op.split) {
    const PhaseSplit& s = *op.split;
    j.set("phases_us", Json::object()
                           .set("launch", s.launch)
                           .set("block_start", s.block_start)
                           .set("open", s.open)
                           .set("stream", s.stream)
                           .set("close", s.close)
                           .set("receive", s.receive)
                           .set("tail", s.tail)
                           .set("samples", s.samples));
  }
  return j;
}

Json machine_json(const Machine& m) {
  return Json::object()
      .set("gpu", m.gpu)
      .set("device", m.device)
      .set("sm_count", m.sm_count)
      .set("compute_capability", std::to_string(m.cc_major) + "." + std::to_string(m.cc_minor))
      .set("memory_gib", m.memory_gib)
      .set("driver_version", m.driver_version)
      .set("runtime_version", m.runtime_version)
      .set("cuda_version", m.cuda_version);
}

const char* mode_key(const Shape& shape) {
  return shape.ht() ? "ht" : "ll";
}

Json options_json(const Options& o) {
  Json modes = Json::array();
  if (o.run_ht) modes.push("ht");
  if (o.run_ll) modes.push("ll");
  return Json::object()
      .set("modes", std::move(modes))
      .set("ranks", o.ranks)
      .set("ht_tokens", o.ht_tokens)
      .set("ll_tokens", o.ll_tokens)
      .set("hidden", o.hidden)
      .set("topk", o.topk)
      .set("experts", o.experts)
      .set("dtype", o.fp8 ? "fp8" : "bf16")
      .set("num_sms", o.num_sms)
      .set("threads_per_block", o.threads)
      .set("warmup", o.warmup)
      .set("iters", o.iters)
      .set("routing", routing_name(o.routing))
      .set("zipf_s", o.zipf_s)
      .set("topk_groups", o.topk_groups)
      .set("cached", o.cached)
      .set("graph", o.graph)
      .set("phases", o.phases)
      .set("config_file", o.config_path)
      .set("nodes", o.nodes)
      .set("nic_gbps", o.nic_gbps)
      .set("nic_latency_us", o.nic_latency_us);
}

/// How the naive figures of a point were obtained.
Json naive_model_json(const PointResult& p) {
  const NaiveNicStage& st = p.naive_nic;
  if (!st.on)
    return Json::object()
        .set("kind", "measured")
        .set("description", "permute -> per-peer cudaMemcpyAsync -> unpermute, measured");
  return Json::object()
      .set("kind", "measured_intranode_plus_nic_stage")
      .set("description",
           "measured time of the naive pipeline with only its copies between ranks of one node "
           "(permute -> intranode cudaMemcpyAsync -> unpermute), plus a serial NIC stage for "
           "its copies to other nodes: max over ranks of max(bytes sent to, bytes received "
           "from other nodes) / nic_gbps + nic_latency_us (once per stage); dispatch rows "
           "as dispatched (data + scales), combine bf16 rows, one per (token, destination "
           "rank); round trips pay both stages")
      .set("nic_gbps", st.nic.gbps)
      .set("nic_latency_us", st.nic.latency_us)
      .set("dispatch_nic_bytes_max_rank", st.dispatch_bytes_max_rank)
      .set("combine_nic_bytes_max_rank", st.combine_bytes_max_rank)
      .set("dispatch_nic_stage_us", st.dispatch_us)
      .set("combine_nic_stage_us", st.combine_us);
}

Json point_json(const PointResult& p, double copy_rate) {
  Json ops = Json::array();
  for (const OpResult& op : p.ops) ops.push(op_json(op, copy_rate, p));
  return Json::object()
      .set("mode", mode_key(p.shape))
      .set("axis_value", p.axis_value)
      .set("ranks", p.shape.ranks)
      .set("nodes", p.shape.nodes)
      .set("tokens", p.shape.tokens)
      .set("hidden", p.shape.hidden)
      .set("topk", p.shape.topk)
      .set("experts", p.shape.experts)
      .set("num_sms", p.config.num_sms)
      .set("threads_per_block", p.config.threads_per_block)
      .set("config", config_json(p.config))
      .set("naive_model", naive_model_json(p))
      .set("ops", std::move(ops));
}

Json tune_json(const RunRecord& run, const Options& o) {
  Json trials = Json::array();
  for (const TuneTrial& t : run.tune_trials)
    trials.push(Json::object()
                    .set("num_sms", t.num_sms)
                    .set("threads_per_block", t.threads)
                    .set("score_us", t.score_us));
  return Json::object()
      .set("out", o.tune_out)
      .set("best", config_json(run.tuned_config))
      .set("trials", std::move(trials));
}

}  // namespace

double gbps_per_rank(const Traffic& traffic, const Stats& time) {
  return time.median > 0 ? traffic.convention_bytes_per_rank / (time.median * kUs) / kGB : 0.0;
}

double copy_rate_fraction(const Traffic& traffic, const Stats& time, double copy_rate) {
  return time.median > 0 && copy_rate > 0 ? traffic.hbm_bytes / (time.median * kUs) / copy_rate
                                          : 0.0;
}

double rdma_gbps_per_rank(const Traffic& traffic, const Stats& time) {
  return time.median > 0 ? traffic.rdma_bytes_per_rank / (time.median * kUs) / kGB : 0.0;
}

double nvl_gbps_per_rank(const Traffic& traffic, const Stats& time) {
  return time.median > 0 ? traffic.nvlink_bytes_per_rank / (time.median * kUs) / kGB : 0.0;
}

double nic_fraction(const Traffic& traffic, const Stats& time, double nic_gbps) {
  return nic_gbps > 0 ? rdma_gbps_per_rank(traffic, time) / nic_gbps : 0.0;
}

Machine query_machine(int device) {
  cudaDeviceProp prop{};
  MOECOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  int driver = 0, runtime = 0;
  MOECOMM_CUDA_CHECK(cudaDriverGetVersion(&driver));
  MOECOMM_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  Machine m;
  m.gpu = prop.name;
  m.device = device;
  m.sm_count = prop.multiProcessorCount;
  m.cc_major = prop.major;
  m.cc_minor = prop.minor;
  m.memory_gib = static_cast<double>(prop.totalGlobalMem) / kGiB;
  m.driver_version = cuda_version_string(driver);
  m.runtime_version = cuda_version_string(runtime);
  m.cuda_version = cuda_version_string(CUDART_VERSION);
  return m;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

namespace {

std::string format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

/// --phases: where each op's time went (medians of each part over the timed iterations).
void print_phases(const RunRecord& run, std::FILE* out) {
  bool any = false;
  for (const PointResult& p : run.points)
    for (const OpResult& op : p.ops) any = any || op.split.has_value();
  if (!any) return;
  std::fprintf(out,
               "\nWhere the time went (us, medians over the timed iterations; device phase "
               "marks of every rank's call, the group's latest rank each):\n");
  std::fprintf(out, "%-4s %6s %4s  %-24s %9s %8s %8s %8s %9s %8s %8s %8s\n", "mode", "tokens",
               "sms", "op", "median", "launch", "blocks", "open", "stream", "close", "receive",
               "tail");
  for (const PointResult& p : run.points)
    for (const OpResult& op : p.ops) {
      if (!op.split) continue;
      const PhaseSplit& s = *op.split;
      std::fprintf(out, "%-4s %6d %4d  %-24s %9.1f %8.1f %8.1f %8.1f %9.1f %8.1f %8s %8.1f\n",
                   mode_key(p.shape), p.shape.tokens, p.config.num_sms, op_name(op.op),
                   op.time.median, s.launch, s.block_start, s.open, s.stream, s.close,
                   s.receive != 0 ? format("%.1f", s.receive).c_str() : "-", s.tail);
    }
  std::fprintf(out,
               "launch: gate release -> first block of the group; blocks: -> every block of every "
               "rank began; open: -> every rank past its opening round (layout and count "
               "exchange, arrivals, published outputs); stream: -> every rank's rows moved; "
               "close: -> every closing round done (LL dispatch: counts published); receive: -> "
               "LL receive phase done; tail: -> last end event.\n");
}

}  // namespace

void print_table(const RunRecord& run, const Options& o, std::FILE* out) {
  const Machine& m = run.machine;
  std::fprintf(out, "\nep_bench (moecomm %s) on %s: %d SMs, driver CUDA %s, runtime %s, %s\n",
               moecomm::version(), m.gpu.c_str(), m.sm_count, m.driver_version.c_str(),
               m.runtime_version.c_str(), run.date.c_str());
  std::fprintf(out,
               "%d %s, top-%d of %d experts, %s dispatch / bf16 combine, %s routing, "
               "seed %llu, %d iterations; device copy rate %.0f GB/s (read + written)\n",
               o.ranks, run.ranks_as == "processes" ? "ranks (one process each)" : "virtual ranks",
               o.topk, o.experts, o.fp8 ? "fp8" : "bf16", routing_name(o.routing),
               static_cast<unsigned long long>(o.seed), o.iters, run.copy_rate / kGB);
  const bool nodes = o.nodes > 1;
  if (nodes && run.ranks_as == "processes")
    std::fprintf(out,
                 "%d nodes x %d ranks; between declared nodes of one host the loopback engine "
                 "with a NIC model of %.1f GB/s per rank, %.1f us per signal\n",
                 o.nodes, o.ranks / o.nodes, o.nic_gbps, o.nic_latency_us);
  else if (nodes)
    std::fprintf(out,
                 "%d virtual nodes x %d ranks (loopback RDMA between nodes); NIC model %.1f GB/s "
                 "per rank, %.1f us per signal\n",
                 o.nodes, o.ranks / o.nodes, o.nic_gbps, o.nic_latency_us);
  for (const std::string& note : run.notes) std::fprintf(out, "note: %s\n", note.c_str());
  std::fprintf(out, "\n%-4s %6s %6s %4s %5s  %-24s %10s %17s %9s %7s %10s %8s", "mode", "tokens",
               "hidden", "sms", "thr", "op", "median us", "p10-p90 us", "GB/s/rank", "% copy",
               "naive us", "speed-up");
  if (nodes) std::fprintf(out, " %9s %8s %6s", "RDMA GB/s", "NVL GB/s", "% NIC");
  std::fprintf(out, "\n");
  for (const PointResult& p : run.points)
    for (const OpResult& op : p.ops) {
      const std::string spread = format("%.1f", op.time.p10) + "-" + format("%.1f", op.time.p90);
      const bool naive = op.naive.samples > 0;
      std::fprintf(out, "%-4s %6d %6d %4d %5d  %-24s %10.1f %17s %9.1f %6.1f%% %10s %8s",
                   mode_key(p.shape), p.shape.tokens, p.shape.hidden, p.config.num_sms,
                   p.config.threads_per_block, op_name(op.op), op.time.median, spread.c_str(),
                   gbps_per_rank(op.traffic, op.time),
                   100.0 * copy_rate_fraction(op.traffic, op.time, run.copy_rate),
                   naive ? format("%.1f", op.naive.median).c_str() : "-",
                   naive ? format("%.2fx", op.naive.median / op.time.median).c_str() : "-");
      if (nodes)
        std::fprintf(out, " %9.1f %8.1f %5.1f%%", rdma_gbps_per_rank(op.traffic, op.time),
                     nvl_gbps_per_rank(op.traffic, op.time),
                     100.0 * nic_fraction(op.traffic, op.time, o.nic_gbps));
      std::fprintf(out, "\n");
    }
  std::fprintf(out,
               "\nGB/s/rank: HT = rows received per rank x (row + scale bytes) / time (DeepEP); "
               "LL = valid (token, expert) selections x hidden x bytes per element / time (NCCL "
               "EP).\n%% copy: (source rows read once + destination rows written once, all "
               "ranks) / time, over the copy rate. naive: permute -> per-peer cudaMemcpyAsync -> "
               "unpermute, same run.\n");
  if (nodes)
    std::fprintf(out,
                 "RDMA GB/s: bytes a rank sends across nodes / time, per rank (HT: rows as "
                 "dispatched once per (token, other node), combine bf16 partials the same; LL: "
                 "(token, expert) messages to other nodes). NVL GB/s: bytes delivered within "
                 "nodes / time (HT: rows received per rank; LL: messages within the node). %% "
                 "NIC: RDMA GB/s / %.1f.\nnaive us with nodes: measured naive time with only "
                 "its intranode copies + a serial NIC stage for its copies to other nodes "
                 "(busiest rank's bytes / NIC bandwidth + latency); see docs/bench.md.\n",
                 o.nic_gbps);
  print_phases(run, out);
  if (run.tuned)
    std::fprintf(out, "tuned: num_sms = %d, threads_per_block = %d, written to %s\n",
                 run.tuned_config.num_sms, run.tuned_config.threads_per_block, o.tune_out.c_str());
}

void write_json(const RunRecord& run, const Options& o, const std::string& path) {
  Json points = Json::array();
  for (const PointResult& p : run.points) points.push(point_json(p, run.copy_rate));
  Json notes = Json::array();
  for (const std::string& n : run.notes) notes.push(n);
  Json root = Json::object()
                  .set("schema", "moecomm.ep_bench.v1")
                  .set("date", run.date)
                  .set("ranks_as", run.ranks_as)
                  .set("seed", o.seed)
                  .set("moecomm_version", moecomm::version())
                  .set("machine", machine_json(run.machine))
                  .set("options", options_json(o))
                  .set("copy_rate_gbps", run.copy_rate / kGB)
                  .set("sweep_axis", axis_name(o.sweep))
                  .set("notes", std::move(notes))
                  .set("points", std::move(points));
  if (run.tuned) root.set("tune", tune_json(run, o));
  std::ofstream file(path);
  if (!file) throw std::runtime_error("--json: cannot write '" + path + "'");
  root.dump(file);
  file << "\n";
  if (!file) throw std::runtime_error("--json: error writing '" + path + "'");
}

}  // namespace epb
