"""An MoE layer that trains, on virtual ranks of one GPU (high-throughput path).

    router -> dispatch -> expert MLPs (per local expert) -> combine,  forward and backward

Each virtual rank holds its tokens and L = E / R experts. moecomm.autograd makes dispatch and
combine differentiable (dispatch's backward is a combine, combine's backward a cached
dispatch), so loss.backward() trains the experts, the router and whatever produced x.

Run: python docs/examples/moe_layer_ht.py   (needs a GPU, torch and moecomm)
"""

import moecomm  # before torch starts CUDA (it sets CUDA_DEVICE_MAX_CONNECTIONS)
import torch
import torch.nn.functional as F

R, E, K = 4, 16, 4          # ranks, experts, top-k
H, FFN = 512, 1024          # hidden, expert MLP width
T = 256                     # tokens per rank
L = E // R                  # experts per rank

torch.manual_seed(0)
device = torch.device("cuda", 0)

cfg = moecomm.MoECommunicatorConfig(num_experts=E, hidden=H, topk=K, max_tokens_per_rank=T,
                                    mode="ht", num_sms=16)
group = moecomm.virtual_group(R, cfg, device=0)

# Parameters: one router (replicated: every rank uses the same one here) and E experts; rank r
# owns experts [r*L, (r+1)*L). All ranks share the GPU, so all parameters live together.
router = torch.nn.Linear(H, E, bias=False, device=device)
w1 = torch.nn.Parameter(torch.randn(E, H, FFN, device=device) / H ** 0.5)
w2 = torch.nn.Parameter(torch.randn(E, FFN, H, device=device) / FFN ** 0.5)
params = [router.weight, w1, w2]


def expert(g, x):
    """Expert g's MLP (fp32 math)."""
    return F.silu(x @ w1[g]) @ w2[g]


def route(x):
    probs = torch.softmax(router(x), dim=-1)
    weights, idx = probs.topk(K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), idx


def local_experts(rank, d):
    """Rank `rank`'s experts on its received rows: y[n] = sum over its local experts e picked by
    row n of w[n, e] * expert_e(x[n]) (one row per received token, reduced over local experts)."""
    x = d.recv_x.float()
    y = torch.zeros_like(x)
    for e in range(L):
        picked = d.recv_topk_idx == e                       # [N, K]
        rows = picked.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        coef = (d.recv_topk_weights * picked).sum(dim=1)[rows, None]
        y = y.index_add(0, rows, coef * expert(rank * L + e, x[rows]))
    return y


def moe_layer(xs):
    """xs: one [T, H] tensor per rank. Returns one [T, H] bf16 output per rank."""
    routed = [route(x) for x in xs]
    # Exact sizing: each rank waits on the host for its receive count, so moecomm.autograd runs
    # the ranks' dispatches on the group's threads.
    recv = moecomm.autograd.dispatch(group, [x.bfloat16() for x in xs],
                                     [idx for _, idx in routed], [w for w, _ in routed])
    ys = [local_experts(r, d) for r, d in enumerate(recv)]
    return moecomm.autograd.combine(group, ys, [d.handle for d in recv])


def dense_reference(xs):
    """The same layer without communication (fp32), to check the result."""
    outs = []
    for x in xs:
        w, idx = route(x)
        xb = x.bfloat16().float()
        out = torch.zeros_like(xb)
        for g in range(E):
            hit = idx == g
            rows = hit.any(dim=1).nonzero().flatten()
            if rows.numel():
                out = out.index_add(0, rows, (w * hit).sum(1)[rows, None] * expert(g, xb[rows]))
        outs.append(out)
    return outs


def main():
    opt = torch.optim.SGD(params, lr=0.5)
    xs = [torch.randn(T, H, device=device) for _ in range(R)]
    targets = [torch.randn(T, H, device=device) * 0.1 for _ in range(R)]
    for step in range(10):
        opt.zero_grad()
        outs = moe_layer(xs)
        # Every rank's loss goes into one backward: all ranks run backward together.
        loss = sum(F.mse_loss(o.float(), t) for o, t in zip(outs, targets)) / R
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.5f}")

    with torch.no_grad():
        got = moe_layer(xs)
        want = dense_reference(xs)
        err = max(float((g.float() - w).norm() / w.norm()) for g, w in zip(got, want))
    print(f"relative difference to the dense reference: {err:.2e}")
    assert err < 2e-2


if __name__ == "__main__":
    main()
