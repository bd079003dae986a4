"""An MoE layer for decoding, on virtual ranks of one GPU (low-latency path).

    router -> dispatch (fp8 on the way) -> expert MLPs (per local expert) -> combine

The low-latency path has fixed shapes and never synchronises with the host, so a whole decode
step (all ranks) is captured once in a CUDA graph and replayed for every new batch of tokens.
The experts write their output straight into the communicator's combine buffer (zero copy).

The low-latency path serves inference: it has no backward. Training (and prefill) use the
high-throughput path, which is differentiable: see moe_layer_ht.py (or mode="auto", which picks
LL up to auto_low_latency_max_tokens tokens and HT above).

Run: python docs/examples/moe_layer_ll.py   (needs a GPU, torch and moecomm)
"""

import moecomm  # before torch starts CUDA (it sets CUDA_DEVICE_MAX_CONNECTIONS)
import torch
import torch.nn.functional as F

R, E, K = 4, 16, 4          # ranks, experts, top-k
H, FFN = 512, 1024          # hidden, expert MLP width
M = 64                      # decode tokens per rank (the LL capacity)
L = E // R
FP8 = True                  # quantise to fp8 e4m3 in the dispatch send warp

torch.manual_seed(0)
device = torch.device("cuda", 0)

cfg = moecomm.MoECommunicatorConfig(num_experts=E, hidden=H, topk=K, max_tokens_per_rank=M,
                                    mode="ll", num_sms=16)
group = moecomm.virtual_group(R, cfg, device=0)

router = torch.randn(H, E, device=device) / H ** 0.5
w1 = torch.randn(E, H, FFN, device=device) / H ** 0.5
w2 = torch.randn(E, FFN, H, device=device) / FFN ** 0.5


def route(x):
    probs = torch.softmax(x.float() @ router, dim=-1)
    weights, idx = probs.topk(K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), idx


def experts(rank, d, buf):
    """All local experts of `rank` at once on their [L, R*M, H] slots, written into `buf`.
    Slots past recv_count hold stale data: computed, never read by combine."""
    x = d.recv_x.float()
    if FP8:  # dequantise: one fp32 scale per 128 channels
        x = (x.view(L, R * M, H // 128, 128) * d.recv_x_scales[..., None]).view(L, R * M, H)
    mine = slice(rank * L, (rank + 1) * L)
    y = torch.bmm(F.silu(torch.bmm(x, w1[mine])), w2[mine])
    buf.copy_(y)


# Static inputs and outputs of the captured step (a decode step reads and writes these).
xs = [torch.zeros(M, H, dtype=torch.bfloat16, device=device) for _ in range(R)]
outs = [torch.zeros(M, H, dtype=torch.bfloat16, device=device) for _ in range(R)]
keep = []  # handles of the captured calls: they must live as long as the graph


def decode_step():
    routed = [route(x) for x in xs]
    # LL calls never wait on the host: issue every rank's call, rank after rank, then use the
    # outputs (a rank's outputs are ready once every rank has made the call).
    sent = [group[r].dispatch(xs[r], routed[r][1], quantize_fp8=FP8) for r in range(R)]
    keep.append(sent)
    bufs = []
    for r, (d, handle) in enumerate(sent):
        buf = group[r].combine_buffer(handle)
        experts(r, d, buf)
        bufs.append(buf)
    done = [group[r].combine(bufs[r], sent[r][1], topk_weights=routed[r][0]) for r in range(R)]
    for r in range(R):
        outs[r].copy_(done[r].out)


def dense_reference():
    result = []
    for x in xs:
        w, idx = route(x)
        xf = x.float()
        out = torch.zeros_like(xf)
        for k in range(K):
            g = idx[:, k]
            h = F.silu(torch.bmm(xf[:, None, :], w1[g]))
            out += w[:, k:k + 1] * torch.bmm(h, w2[g])[:, 0]
        result.append(out)
    return result


def main():
    # Warm up eagerly on a side stream, then capture one decode step of every rank.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step()

    for step in range(5):
        for x in xs:  # the next tokens
            x.copy_(torch.randn(M, H, device=device))
        graph.replay()
        want = dense_reference()
        err = max(float((o.float() - w).norm() / w.norm()) for o, w in zip(outs, want))
        print(f"decode step {step}: relative difference to the dense reference {err:.2e}")
        assert err < (6e-2 if FP8 else 2e-2)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"one graphed decode step of {R} ranks: {start.elapsed_time(end) / 20 * 1e3:.0f} us")


if __name__ == "__main__":
    main()
