// The high-throughput path's calls: argument checks, handle bookkeeping and the parameters of
// the HT kernels (ht/intranode.hpp, or internode/internode.hpp when the group spans nodes); the
// results are views of the registered buffers.
#include <string>

#include "core/comm_impl.hpp"
#include "core/handle_state.hpp"
#include "core/staging.hpp"
#include "core/validate.hpp"
#include "ht/intranode.hpp"
#include "internode/internode.hpp"
#include "moecomm/error.hpp"

namespace moecomm::detail {

namespace {

/// The internode part of a handle's slot: after the intranode part, which ends with the rank
/// prefix [R + 1] (comm_impl.cpp sizes the slot with internode::handle_ints).
internode::HandleArrays internode_arrays(const HandleState& h, const DeviceContext& ctx) {
  return internode::carve_handle(h.recv_rank_prefix + ctx.num_ranks + 1, ctx.max_tokens,
                                 ctx.num_ranks, ctx.num_nodes);
}

}  // namespace

// One kernel per call: the layout steps with the count exchange (unless cached: the handle holds
// the routing), then the rows. Exact sizing waits on the host for N; the other forms return at
// once with views sized to the capacity.
DispatchOutput CommImpl::dispatch_ht(const DispatchArgs& args, const DispatchOptions& o) {
  const Config& c = config();
  if (c.mode == Mode::kLowLatency)
    throw InvalidArgument(
        "Config.mode: the communicator was built for low_latency; HT dispatch needs "
        "high_throughput or auto");
  const int R = num_ranks(), L = c.local_experts(R), K = c.topk, H = c.hidden, G = H / kFp8Group;
  const int64_t T = args.x.shape[0];
  const bool internode = ctx_.internode.num_nodes > 1;
  if (internode) refuse_masks_across_nodes(ctx_.num_nodes, explicit_mask_, "dispatch");
  const std::string t_h = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  const bool fp8_in = args.x.dtype == DType::kFP8E4M3;
  check_tensor(args.x, {"x", {DType::kBF16, DType::kFP8E4M3}, {T, H}, t_h}, device_);
  if (fp8_in || o.quantize_fp8) {
    if (!c.enable_fp8) throw InvalidArgument("x: fp8 needs Config.enable_fp8 = true");
  }
  if (fp8_in) {
    if (o.quantize_fp8)
      throw InvalidArgument("quantize_fp8: expected false for fp8 x (already quantised)");
    check_tensor(args.x_scales,
                 {"x_scales",
                  {DType::kF32},
                  {T, G},
                  "[T=" + std::to_string(T) + ", H/128=" + std::to_string(G) + "]"},
                 device_);
  } else {
    check_absent(args.x_scales, "x_scales", "for bf16 x");
  }
  check_topk(args, T);

  // A cached dispatch reuses the routing: T must match (the caller promises the same topk_idx).
  const bool cached = o.previous_handle != nullptr;
  if (cached) {
    HandleState& prev = handle_state(*o.previous_handle, Mode::kHighThroughput, "dispatch");
    if (prev.num_tokens != T)
      throw InvalidArgument("previous_handle: it routed " + std::to_string(prev.num_tokens) +
                            " tokens, x has " + std::to_string(T) + "; expected the same routing");
    if (prev.mask != explicit_mask_)
      throw InvalidArgument(
          "previous_handle: made while other ranks were masked (mask_rank since); its routing "
          "is stale: dispatch without it");
  }

  const Streams s = begin_call(o.stream, o.async);
  CallStaging staging(s.exec);
  Handle handle;
  if (cached) {
    handle = *o.previous_handle;
  } else {
    handle = Handle(new_handle(Mode::kHighThroughput, T));
  }
  HandleState& h = *handle.state();
  const bool exact = o.sizing == Sizing::kExact;
  // Each dispatch gets its own token, so that a late write of an earlier call's counts is never
  // taken for this one's.
  const uint64_t token = ++host_token_;

  ht::DispatchParams p;
  p.x = staging.input(args.x);
  p.num_tokens = T;
  p.in_row_bytes = static_cast<int>(fp8_in ? H : 2 * H);
  p.out_row_bytes = static_cast<int>(fp8_in || o.quantize_fp8 ? H : 2 * H);
  p.x_scales = fp8_in ? static_cast<const float*>(args.x_scales.data) : nullptr;
  p.quantize = o.quantize_fp8;
  p.pow2_scales = c.scale_format == ScaleFormat::kPowerOfTwo;
  p.topk_idx = args.topk_idx.data;
  p.idx_i64 = args.topk_idx.dtype == DType::kI64;
  p.topk_weights =
      args.topk_weights.present() ? static_cast<const float*>(args.topk_weights.data) : nullptr;
  p.send_row = h.send_row;
  p.cached = cached;
  if (!cached)
    p.layout = layout_params(args.topk_idx, /*exchange=*/!internode, /*close=*/false, &h,
                             exact ? token : 0);
  if (internode) {
    // The same parameters; the internode kernel runs its own count exchange over every rank.
    internode::DispatchParams q;
    static_cast<ht::DispatchParams&>(q) = p;
    q.has_scales = fp8_in || o.quantize_fp8;
    q.has_weights = args.topk_weights.present();
    q.handle = internode_arrays(h, ctx_);
    internode::launch_dispatch(exchange_ctx(), q, c.num_sms, c.threads_per_block, s.exec);
  } else {
    ht::launch_dispatch(exchange_ctx(), p, c.num_sms, c.threads_per_block, s.exec);
  }
  staging.finish();

  if (!cached && exact) {
    wait_host_counts(token);
    h.num_recv = host_counts_[0];
    h.recv_per_expert_host.assign(host_counts_ + 1, host_counts_ + 1 + L);
  }

  // The outputs are views of the registered receive region (zero-copy), valid until the next HT
  // dispatch; without a host-known N they span the whole capacity.
  DispatchOutput out;
  out.mode = Mode::kHighThroughput;
  const int64_t rows = h.num_recv >= 0 ? h.num_recv : ctx_.ht.capacity;
  const bool fp8_out = fp8_in || o.quantize_fp8;
  const ht::Regions& lay = ctx_.ht;
  out.recv_x = sym_view(lay.x, fp8_out ? DType::kFP8E4M3 : DType::kBF16, {rows, H});
  if (fp8_out) out.recv_x_scales = sym_view(lay.scales, DType::kF32, {rows, G});
  out.recv_topk_idx = sym_view(lay.topk_idx, DType::kI64, {rows, K});
  if (args.topk_weights.present())  // (a null pointer is fine when T = 0)
    out.recv_topk_weights = sym_view(lay.topk_weights, DType::kF32, {rows, K});
  out.recv_src_token = sym_view(lay.src_token, DType::kI32, {rows});
  out.recv_rank_prefix = local_view(h.recv_rank_prefix, DType::kI32, {R + 1});
  out.num_recv_tokens_per_expert = local_view(h.recv_per_expert, DType::kI32, {L});
  out.num_recv_tokens_device = local_view(h.num_recv_dev, DType::kI32, {1});
  out.num_recv_tokens = h.num_recv;
  out.num_recv_tokens_per_expert_host = h.recv_per_expert_host;
  out.handle = handle;
  out.event = end_call(s, o.async);
  return out;
}

// Combine pulls: each rank publishes where its y lies, and every token's owner reads the rows
// it sent out and reduces them in rank order. y is checked against N when the host knows it,
// else against the capacity.
CombineOutput CommImpl::combine_ht(const CombineArgs& args, HandleState& h,
                                   const CombineOptions& o) {
  const Config& c = config();
  const int H = c.hidden, K = c.topk;
  const int64_t T = h.num_tokens;
  const bool internode = ctx_.internode.num_nodes > 1;
  if (internode) refuse_masks_across_nodes(ctx_.num_nodes, explicit_mask_, "combine");
  const std::string tag = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  if (h.num_recv >= 0) {
    check_tensor(args.y,
                 {"y",
                  {DType::kBF16},
                  {h.num_recv, H},
                  "[N=" + std::to_string(h.num_recv) + ", " + std::to_string(H) + "]"},
                 device_);
  } else {
    check_tensor(args.y, {"y", {DType::kBF16}, {kAnyDim, H}, "[N, " + std::to_string(H) + "]"},
                 device_);
    if (args.y.shape[0] > ctx_.ht.capacity)
      throw InvalidArgument("y: " + std::to_string(args.y.shape[0]) +
                            " rows, expected at most the receive capacity " +
                            std::to_string(ctx_.ht.capacity));
  }
  const int64_t N = args.y.shape[0];
  if (args.recv_topk_weights.present())
    check_tensor(args.recv_topk_weights,
                 {"recv_topk_weights",
                  {DType::kF32},
                  {N, K},
                  "[N=" + std::to_string(N) + ", " + std::to_string(K) + "]"},
                 device_);
  if (args.bias.present()) check_tensor(args.bias, {"bias", {DType::kBF16}, {T, H}, tag}, device_);
  check_absent(args.topk_weights, "topk_weights", "in HT combine (pass recv_topk_weights)");
  if (o.out.present()) check_tensor(o.out, {"out", {DType::kBF16}, {T, H}, tag}, device_);
  if (o.return_recv_hook)
    throw InvalidArgument(
        "return_recv_hook: expected false for HT combine (hooks are a low-latency feature)");

  const Streams s = begin_call(o.stream, o.async);
  CallStaging staging(s.exec);
  ht::CombineParams p;
  const ht::Regions& lay = ctx_.ht;
  const size_t staged = static_cast<size_t>(lay.stage_rows);
  // y is read by the peers' kernels, in place (their loads take any 2-byte alignment): a temporary
  // copy would be used outside the stream that made it, which CUDA's stream-ordered allocations
  // do not allow.
  p.y = publish(args.y.data, args.y.nbytes(), lay.stage_y, staged * H * 2, "y", s.exec);
  if (args.recv_topk_weights.present())
    p.recv_weights =
        publish(args.recv_topk_weights.data, args.recv_topk_weights.nbytes(), lay.stage_weights,
                staged * K * sizeof(float), "recv_topk_weights", s.exec);
  p.bias = args.bias.present() ? static_cast<const uint16_t*>(staging.input(args.bias)) : nullptr;
  // Without a caller's out, the result lands in this rank's own buffer (valid until the next
  // combine).
  p.out = o.out.present() ? static_cast<uint16_t*>(staging.output(o.out)) : combine_out_;
  const bool want_weights = args.recv_topk_weights.present();
  p.combined_weights = want_weights ? combine_weights_ : nullptr;
  p.send_row = h.send_row;
  p.num_tokens = T;
  if (internode) {
    internode::CombineParams q;
    static_cast<ht::CombineParams&>(q) = p;
    q.handle = internode_arrays(h, ctx_);
    internode::launch_combine(exchange_ctx(), q, c.num_sms, c.threads_per_block, s.exec);
  } else {
    ht::launch_combine(exchange_ctx(), p, c.num_sms, c.threads_per_block, s.exec);
  }
  staging.finish();

  CombineOutput out;
  out.out = o.out.present() ? o.out : local_view(combine_out_, DType::kBF16, {T, H});
  if (want_weights) out.combined_topk_weights = local_view(combine_weights_, DType::kF32, {T, K});
  out.event = end_call(s, o.async);
  return out;
}

}  // namespace moecomm::detail
