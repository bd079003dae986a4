// Configuration of a MoECommunicator: the MoE shape, the mode and the resource hints.
#pragma once

#include <cstdint>
#include <string>

namespace moecomm {

/// Which kernels serve dispatch and combine.
enum class Mode {
  kLowLatency,      ///< expert-major, fixed capacity, no host sync, graph-capturable (decoding)
  kHighThroughput,  ///< token-major, deduplicated per rank (training, prefill)
  kAuto,            ///< low-latency up to Config::auto_low_latency_max_tokens tokens, else HT
};

/// "low_latency", "high_throughput" or "auto".
const char* mode_name(Mode mode);
/// "ll", "ht" or "auto" (the Python package's spelling).
const char* mode_short_name(Mode mode);
/// The mode a name stands for: either spelling ("low_latency" or "ll", "high_throughput" or
/// "ht", "auto"); false for any other name. Config files and the bindings both parse with this.
bool mode_from_name(const std::string& name, Mode* mode);

/// How fp8 scales are formed (one fp32 scale per 128 channels).
enum class ScaleFormat {
  kFloat32,     ///< scale = amax / 448
  kPowerOfTwo,  ///< scale rounded up to a power of two (UE8M0-compatible)
};

/// "f32" or "pow2".
const char* scale_format_name(ScaleFormat format);
/// The scale format a name stands for ("f32" or "float32", "pow2" or "power_of_two"); false for
/// any other name.
bool scale_format_from_name(const std::string& name, ScaleFormat* format);

/// Which RDMA engine carries the traffic between ranks on different nodes (docs/internode.md,
/// docs/multinode.md).
enum class RdmaEngine {
  kAuto,      ///< loopback when every rank runs on one machine, else NCCL GIN (when available)
  kLoopback,  ///< loads, stores and atomics: ranks whose buffers this machine can address
  kGin,       ///< NCCL's GPU-initiated networking (needs a build with NCCL and a GIN-capable NIC)
};

/// "auto", "loopback" or "gin".
const char* rdma_engine_name(RdmaEngine engine);
/// The engine a name stands for ("auto", "loopback", "gin"); false for any other name.
bool rdma_engine_from_name(const std::string& name, RdmaEngine* engine);

/// Everything a communicator needs to size its buffers and choose its kernels. Validated by
/// MoECommunicator's constructor; each violation raises InvalidArgument naming the field.
struct Config {
  int num_experts = 0;          ///< E, divisible by the number of ranks
  int hidden = 0;               ///< H, a multiple of 128 if fp8 is used, else of 8
  int topk = 0;                 ///< K, 1..32
  int max_tokens_per_rank = 0;  ///< largest T a rank may pass (HT); LL capacity M unless set below
  Mode mode = Mode::kHighThroughput;

  /// SMs (thread blocks) each rank's communication kernels may use. Virtual ranks on one GPU
  /// must fit together: sum over co-located ranks <= the device's SM count.
  int num_sms = 16;
  /// Threads per block of the copy kernels (multiple of 32, <= 1024).
  int threads_per_block = 512;

  /// HT: each entry of num_recv_tokens_per_expert is rounded up to a multiple of this.
  int expert_alignment = 1;

  /// Buffers for fp8 (e4m3 data + fp32 scales per 128 channels) are allocated when true.
  bool enable_fp8 = true;
  ScaleFormat scale_format = ScaleFormat::kFloat32;

  /// Any device-side wait longer than this becomes a TimeoutError naming rank, peer and phase.
  double timeout_seconds = 10.0;
  /// Low-latency calls: a peer that does not answer within timeout_seconds is masked (as
  /// MoECommunicator::mask_rank does) instead of raising, and the call completes without it;
  /// masked_ranks() reports it. High-throughput calls still raise: their count exchange needs
  /// every live rank to agree on who is masked, which a time-out seen by one rank cannot give.
  bool mask_unresponsive_ranks = false;

  /// HT receive capacity in rows per rank; 0 means num_ranks * max_tokens_per_rank (the worst
  /// case, which can never overflow).
  int64_t max_recv_tokens = 0;
  /// LL capacity M per source rank; 0 means max_tokens_per_rank (or the Auto threshold in Auto).
  int low_latency_max_tokens = 0;
  /// Auto mode: calls with T <= this take the LL path. Every rank must be on the same side of it
  /// in a call. Default from `ep_bench --mode both --sweep tokens` (8 ranks on an H100, hidden
  /// 7168, top-8 of 256): LL's dispatch + combine is faster up to 128 tokens per rank, HT's above
  /// (bench/RESULTS.md, "Auto threshold"). Re-measure for other shapes and machines.
  int auto_low_latency_max_tokens = 128;

  /// Bytes of each rank's RDMA window: the part of its registered buffer that ranks on other nodes
  /// may write into (through the RDMA engine only). 0: no window, the group must lie in one node
  /// (a group spanning nodes then raises, naming the size it needs). required_rdma_bytes() gives
  /// the size a group needs; a larger hint is accepted and the rest left unused.
  int64_t rdma_bytes = 0;
  /// The loopback RDMA engine (virtual nodes, or processes of one host declared as nodes) can
  /// model a NIC: each rank's puts then complete no faster than this many GB/s, each signal no
  /// sooner than nic_model_latency_us after its data. 0 (the default): puts complete at once, as
  /// tests want; ep_bench sets 50 GB/s and 2 us (a 400 Gb/s NIC).
  double nic_model_gbps = 0.0;
  double nic_model_latency_us = 0.0;
  /// The engine between nodes. kAuto: loopback when every rank runs on one machine (virtual
  /// nodes, processes of one host declared as nodes), NCCL GIN when the ranks span machines;
  /// connect() raises Unsupported naming what is missing (a build without NCCL, the NCCL version,
  /// no GIN-capable network) when GIN is needed but unavailable. kLoopback across machines and
  /// kGin without GIN raise Unsupported too. Unused by groups of one node.
  RdmaEngine engine = RdmaEngine::kAuto;

  /// Check topk_idx on the device (range, duplicates) before every dispatch. Defaults to on in
  /// debug builds.
#ifdef NDEBUG
  bool validate_inputs = false;
#else
  bool validate_inputs = true;
#endif

  /// Raises InvalidArgument for the first field that is out of range. num_ranks: the group size.
  void validate(int num_ranks) const;
  /// num_experts / num_ranks.
  int local_experts(int num_ranks) const {
    return num_experts / num_ranks;
  }
  /// Effective LL capacity M.
  int ll_capacity() const;
  /// Key=value text (one per line) for tuned configs; see load()/save().
  std::string to_text() const;
  /// Applies the keys of a config file written by to_text() (or ep_bench --tune) onto *this.
  void load_file(const std::string& path);
  void save_file(const std::string& path) const;
};

/// RDMA window bytes (Config::rdma_bytes) each rank needs for a group of num_ranks ranks on
/// num_nodes nodes (num_ranks / num_nodes ranks each) with this Config (whose own rdma_bytes is
/// ignored). DeepEP's size hints play this part. Raises InvalidArgument for a bad shape.
int64_t required_rdma_bytes(const Config& config, int num_ranks, int num_nodes);

}  // namespace moecomm
