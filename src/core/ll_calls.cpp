// The low-latency path's calls: argument checks, the alternating buffers, receive hooks, and the
// parameters of the LL kernels (ll/ll.hpp), launched per rank or recorded for one group launch.
#include <memory>
#include <string>

#include "core/comm_impl.hpp"
#include "core/handle_state.hpp"
#include "core/staging.hpp"
#include "core/stream_order.hpp"
#include "core/validate.hpp"
#include "ll/group_plan.hpp"
#include "ll/ll.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"

namespace moecomm::detail {

// A group that spans nodes runs LL through the RDMA engine for the ranks of other nodes (ll/*.cu's
// internode kernels). Not offered there, and refused before any state changes:
// - one launch for the group (VirtualGroup::dispatch_all / combine_all): its kernel serves every
//   rank of one GPU from one grid, which an internode group is not meant to be; call each rank;
// - masked ranks (mask_rank, Config::mask_unresponsive_ranks): the counter signals of the engine
//   have no way to leave a rank out of a call and let it rejoin.
namespace {

void check_ll_internode(const DeviceContext& ctx, const Config& config, uint64_t explicit_mask,
                        bool group_call) {
  const int N = ctx.num_nodes;
  if (N <= 1) return;
  const std::string nodes = "num_nodes = " + std::to_string(N);
  if (group_call)
    throw Unsupported(
        "VirtualGroup::dispatch_all / combine_all: one launch for a group that spans " + nodes +
        " nodes is not supported in low-latency mode; call dispatch / combine on each rank");
  if (config.mask_unresponsive_ranks)
    throw Unsupported(
        "Config.mask_unresponsive_ranks: not supported by low-latency calls of a "
        "group that spans " +
        nodes + " nodes");
  refuse_masks_across_nodes(N, explicit_mask, "low-latency call");
}

}  // namespace

// One kernel per call without a hook (send, then receive); with a hook the send kernel returns
// at once and the hook launches the receive. Consecutive calls alternate between two buffers so
// that a call's outputs stay valid while the next one is in flight.
DispatchOutput CommImpl::dispatch_ll(const DispatchArgs& args, const DispatchOptions& o,
                                     GroupCall* group) {
  const Config& c = config();
  const int R = num_ranks(), L = c.local_experts(R), H = c.hidden, G = H / kFp8Group;
  const int M = ctx_.ll.capacity;
  const int64_t T = args.x.shape[0];
  check_ll_internode(ctx_, c, explicit_mask_, group != nullptr);
  if (T > M)
    throw InvalidArgument(
        "x: " + std::to_string(T) +
        " tokens, expected at most the low-latency capacity M = " + std::to_string(M));
  check_tensor(args.x,
               {"x",
                {DType::kBF16},
                {T, H},
                "[T=" + std::to_string(T) + ", " + std::to_string(H) +
                    "] (LL takes bf16 and quantises on the fly)"},
               device_);
  check_absent(args.x_scales, "x_scales", "in low-latency dispatch (x is bf16)");
  if (o.quantize_fp8 && !c.enable_fp8)
    throw InvalidArgument("quantize_fp8: needs Config.enable_fp8 = true");
  check_topk(args, T);
  if (group && group->plan.validate_only) {
    check_errors();  // a pending device error raises here, before any rank's state changes
    return {};
  }

  const Streams s = begin_call(o.stream, o.async);
  auto staging = std::make_unique<CallStaging>(s.exec);
  auto state = new_handle(Mode::kLowLatency, T);
  // Every rank counts its LL calls the same way, so all ranks pick the same buffer for a call.
  const int b = static_cast<int>(ll_calls_ % 2);
  state->buffer = b;

  ll::DispatchSendParams p;
  p.x = static_cast<const uint16_t*>(staging->input(args.x));
  p.num_tokens = T;
  p.topk_idx = args.topk_idx.data;
  p.idx_i64 = args.topk_idx.dtype == DType::kI64;
  p.fp8 = o.quantize_fp8;
  p.pow2_scales = c.scale_format == ScaleFormat::kPowerOfTwo;
  p.buffer = b;
  p.slot_of = state->ll_slot;
  p.layout = layout_params(args.topk_idx, /*exchange=*/false, /*close=*/false, nullptr, 0);
  p.layout.prefix = false;  // positions straight from the bitmap words (rows of T <= M tokens)
  ll::DispatchRecvParams& rp = p.recv;
  rp.buffer = b;
  rp.recv_count = ctx_.ll.recv_count + b * L;
  rp.recv_layout = ctx_.ll.recv_layout + static_cast<size_t>(b) * L * R * 2;
  rp.fp8 = o.quantize_fp8;
  p.receive = !o.return_recv_hook;  // without a hook, one kernel does both phases
  if (group) {
    group->plan.add_dispatch(ctx_, p);
    group->staging.push_back(std::move(staging));  // finished after the group's launch
  } else {
    ll::launch_dispatch_send(ctx_, p, c.num_sms, c.threads_per_block, s.exec);
    staging->finish();
  }
  ++ll_calls_;  // nothing below throws: the buffer parity advances with the call

  DispatchOutput out;
  if (o.return_recv_hook) {
    // The hook may run after later calls of this rank: it captures the context and parameters by
    // value, and waits for the call's own sequence number (stored by the send phase).
    const DeviceContext ctx = ctx_;
    const cudaStream_t default_stream = s.exec;
    std::shared_ptr<StreamOrder> order = order_;
    out.hook = RecvHook([ctx, rp, default_stream, order](cudaStream_t st) {
      const cudaStream_t run = st ? st : default_stream;
      order->before(run);
      ll::launch_dispatch_recv(ctx, rp, run);
      order->after(run);
    });
  }

  // Views of this call's buffer: valid until the call after next reuses it.
  const ll::Regions& lay = ctx_.ll;
  const int64_t slots = static_cast<int64_t>(R) * M;
  out.mode = Mode::kLowLatency;
  out.recv_x = sym_view(lay.x[b], o.quantize_fp8 ? DType::kFP8E4M3 : DType::kBF16, {L, slots, H});
  if (o.quantize_fp8) out.recv_x_scales = sym_view(lay.scales[b], DType::kF32, {L, slots, G});
  out.recv_src_info = sym_view(lay.src_token[b], DType::kI32, {L, slots});
  out.recv_count = local_view(rp.recv_count, DType::kI32, {L});
  out.recv_layout = local_view(rp.recv_layout, DType::kI32, {L, R, 2});
  out.handle = Handle(state);
  out.event = end_call(s, o.async);
  return out;
}

// Combine reads y in the dispatch's buffer: y is published (send phase), then each token's owner
// gathers its K slots and weights them (receive phase). Without a hook, one kernel does both.
CombineOutput CommImpl::combine_ll(const CombineArgs& args, HandleState& h, const CombineOptions& o,
                                   GroupCall* group) {
  const Config& c = config();
  const int R = num_ranks(), L = c.local_experts(R), H = c.hidden, K = c.topk;
  const int M = ctx_.ll.capacity;
  const int64_t T = h.num_tokens;
  const int64_t slots = static_cast<int64_t>(R) * M;
  check_ll_internode(ctx_, c, explicit_mask_, group != nullptr);
  check_tensor(args.y,
               {"y",
                {DType::kBF16},
                {L, slots, H},
                "[L=" + std::to_string(L) + ", R*M=" + std::to_string(slots) + ", " +
                    std::to_string(H) + "]"},
               device_);
  check_tensor(args.topk_weights,
               {"topk_weights",
                {DType::kF32},
                {T, K},
                "[T=" + std::to_string(T) + ", " + std::to_string(K) + "]"},
               device_);
  check_absent(args.recv_topk_weights, "recv_topk_weights",
               "in LL combine (weights are applied on the token's rank)");
  check_absent(args.bias, "bias", "in LL combine");
  const std::string tag = "[T=" + std::to_string(T) + ", " + std::to_string(H) + "]";
  if (o.out.present()) check_tensor(o.out, {"out", {DType::kBF16}, {T, H}, tag}, device_);
  if (group && group->plan.validate_only) {
    check_errors();  // a pending device error raises here, before any rank's state changes
    return {};
  }

  const Streams s = begin_call(o.stream, o.async);
  // A staged out lives until the receive phase has run (with a hook: inside the hook). y is read
  // in place by the peers (see combine_ht).
  std::shared_ptr<CallStaging> staging = std::make_shared<CallStaging>(s.exec);
  ll::CombineSendParams sp;
  const size_t combine_bytes = static_cast<size_t>(L) * slots * H * 2;
  // Same-node peers read y in place; with nodes, the rows for other nodes are put from this
  // rank's window (y itself when it lies there, else each such row copied there first).
  sp.y =
      publish(args.y.data, args.y.nbytes(), ctx_.ll.combine[h.buffer], combine_bytes, "y", s.exec);
  sp.buffer = h.buffer;
  const int blocks = c.num_sms, threads = c.threads_per_block;
  if (o.return_recv_hook) ll::launch_combine_send(ctx_, sp, blocks, threads, s.exec);

  ll::CombineRecvParams rp;
  rp.publish_y = !o.return_recv_hook;  // without a hook, one kernel does both phases
  rp.y = sp.y;
  rp.buffer = h.buffer;
  rp.slot_of = h.ll_slot;
  rp.topk_weights = static_cast<const float*>(args.topk_weights.data);
  rp.num_tokens = T;
  rp.out = o.out.present() ? static_cast<uint16_t*>(staging->output(o.out)) : combine_out_;
  CombineOutput out;
  if (o.return_recv_hook) {
    const DeviceContext ctx = ctx_;
    const cudaStream_t default_stream = s.exec;
    std::shared_ptr<StreamOrder> order = order_;
    out.hook =
        RecvHook([ctx, rp, blocks, threads, default_stream, order, staging](cudaStream_t st) {
          const cudaStream_t run = st ? st : default_stream;
          order->before(run);
          ll::launch_combine_recv(ctx, rp, blocks, threads, run);
          staging->finish(run);
          order->after(run);
        });
  } else if (group) {
    group->plan.add_combine(ctx_, rp);
    group->staging.push_back(staging);  // finished after the group's launch
  } else {
    ll::launch_combine_recv(ctx_, rp, blocks, threads, s.exec);
    staging->finish();
  }
  out.out = o.out.present() ? o.out : local_view(combine_out_, DType::kBF16, {T, H});
  out.event = end_call(s, o.async);
  return out;
}

// The registered region combine reads: an expert MLP that writes its output here saves the copy
// into the staging area (publish finds it already registered).
TensorView CommImpl::combine_buffer(const Handle& handle) {
  HandleState& h = handle_state(handle, Mode::kLowLatency, "combine_buffer");
  const int R = num_ranks(), L = config().local_experts(R), H = config().hidden;
  const int64_t slots = static_cast<int64_t>(R) * ctx_.ll.capacity;
  return sym_view(ctx_.ll.combine[h.buffer], DType::kBF16, {L, slots, H});
}

}  // namespace moecomm::detail
