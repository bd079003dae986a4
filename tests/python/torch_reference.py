"""A pure-torch reference of the moecomm semantics (DESIGN.md), written for the Python tests and
independent of the C++ host reference. Everything runs on the CPU in plain loops and gathers.

Notation: R ranks, E experts, L = E / R local experts (rank r owns [r*L, (r+1)*L)), K top-k,
M the low-latency capacity per source rank.
"""

import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def make_inputs(gen, T, H, E, K, drop=0.15, device="cuda"):
    """x bf16 [T, H], topk_idx int64 [T, K] (distinct experts, -1 dropped), weights f32 [T, K]."""
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    scores = torch.rand(T, E, generator=gen)
    idx = scores.topk(K, dim=1).indices if T > 0 else torch.zeros(0, K, dtype=torch.int64)
    dropped = torch.rand(T, K, generator=gen) < drop
    idx = idx.masked_fill(dropped, -1)
    w = torch.rand(T, K, generator=gen).masked_fill(dropped, 0.0)
    return x.to(device), idx.to(device), w.to(device)


def float_to_e4m3(v):
    """f32 -> float8_e4m3fn codes as CUDA's __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3):
    round to nearest, ties to even; every |v| >= 448 (infinity included) saturates to +-448;
    NaN gives 0x7f. Returns a torch.float8_e4m3fn tensor of v's shape.

    Done here with exact integer and power-of-two arithmetic, not with torch's cast: torch's
    float -> float8_e4m3fn conversion does not saturate (|v| above 464 becomes NaN) and keeps the
    sign of NaN."""
    v = v.detach().float().cpu().contiguous()
    a = v.abs()
    bits = a.view(torch.int32)
    # e = floor(log2|v|), clamped to the e4m3 minimum normal exponent -6 (subnormals share the
    # quantum of the lowest binade); zero and f32 subnormals clamp too. The quantum of binade e
    # is 2^(e-3).
    e = ((bits >> 23) - 127).clamp(min=-6)
    # |v| / 2^(e-3), exact: a multiplication by a power of two built from its bits (e <= 8 for
    # the values that get here, so 2^(3-e) is a normal float).
    pow2 = ((3 - e.clamp(max=8) + 127) << 23).view(torch.float32)
    n = torch.round(a * pow2).to(torch.int32)  # torch.round: half to even; n in [0, 16]
    # (e + 6) * 8 + n: subnormals (e = -6, n < 8), normals (n in [8, 16)) and the carry into
    # the next binade (n == 16). |v| < 448 never reaches the NaN code 0x7f.
    code = (e + 6) * 8 + n
    code = torch.where(a >= FP8_MAX, torch.full_like(code, 0x7E), code)
    code = code | torch.where(v.view(torch.int32) < 0, 0x80, 0).to(torch.int32)
    code = torch.where(torch.isnan(v), torch.full_like(code, 0x7F), code)
    return code.to(torch.uint8).view(torch.float8_e4m3fn)


def quantize_fp8(x):
    """Per 128 channels of a bf16 row (f32 arithmetic throughout):
    a = max(amax, 1e-4) with amax = max|x| over the non-NaN channels (0 if none), scale = a / 448,
    inv = 448 / a (each one correctly rounded division), q = e4m3(x * inv) (one rounding, then
    float_to_e4m3). Returns (q float8_e4m3fn [n, H], scale f32 [n, H / 128])."""
    n, H = x.shape
    xf = x.detach().float().cpu().view(n, H // 128, 128)
    xa = xf.abs()
    amax = torch.where(torch.isnan(xa), torch.zeros_like(xa), xa).amax(dim=-1)  # fmax skips NaN
    a = amax.clamp(min=torch.tensor(AMAX_FLOOR, dtype=torch.float32))
    # Tensor / tensor divisions: `448.0 / a` would be a.reciprocal() * 448 in torch (two
    # roundings), and a division by a Python scalar may be a multiplication by its reciprocal.
    scale = torch.div(a, torch.full_like(a, FP8_MAX))
    inv = torch.div(torch.full_like(a, FP8_MAX), a)
    q = float_to_e4m3(xf * inv[..., None]).view(n, H)
    return q, scale


def owner(idx, L):
    """Rank owning each entry of idx (-1 where idx is -1)."""
    return torch.where(idx >= 0, torch.div(idx, L, rounding_mode="floor"), torch.full_like(idx, -1))


# --- high throughput --------------------------------------------------------------------------
def ht_dispatch(xs, idxs, ws, R, L, dest, alignment=1):
    """What rank `dest` receives: rows ordered by source rank then source token."""
    rx, ridx, rw, rsrc, prefix = [], [], [], [], [0]
    H = xs[0].shape[1]
    K = idxs[0].shape[1]
    for s in range(R):
        idx = idxs[s].cpu()
        mine = (idx >= 0) & (owner(idx, L) == dest)
        t = mine.any(dim=1).nonzero().flatten()
        rx.append(xs[s].cpu()[t])
        ridx.append(torch.where(mine[t], idx[t] - dest * L, torch.full_like(idx[t], -1)))
        if ws is not None:
            rw.append(torch.where(mine[t], ws[s].cpu()[t], torch.zeros(())))
        rsrc.append(t.to(torch.int32))
        prefix.append(prefix[-1] + t.numel())
    recv_idx = torch.cat(ridx) if ridx else torch.zeros(0, K, dtype=torch.int64)
    counts = [int((recv_idx == e).any(dim=1).sum()) for e in range(L)]
    padded = [(c + alignment - 1) // alignment * alignment for c in counts]
    return dict(
        recv_x=torch.cat(rx) if rx else torch.zeros(0, H, dtype=xs[0].dtype),
        recv_topk_idx=recv_idx,
        recv_topk_weights=torch.cat(rw) if ws is not None else None,
        recv_src_token=torch.cat(rsrc),
        recv_rank_prefix=torch.tensor(prefix, dtype=torch.int32),
        num_recv_tokens_per_expert=torch.tensor(padded, dtype=torch.int32),
        num_recv=prefix[-1],
    )


def ht_combine(ys, idxs, R, L, src, bias=None):
    """fp32 out[t] of rank `src` = sum over the ranks d that got token t of y_d[row of t] (+bias).

    ys[d]: what rank d passes to combine, one row per row it received."""
    T, _ = idxs[src].shape
    H = ys[0].shape[1]
    out = torch.zeros(T, H)
    for d in range(R):
        ref = ht_dispatch([torch.zeros(i.shape[0], 1) for i in idxs], idxs, None, R, L, d)
        lo, hi = int(ref["recv_rank_prefix"][src]), int(ref["recv_rank_prefix"][src + 1])
        tokens = ref["recv_src_token"][lo:hi].long()
        out.index_add_(0, tokens, ys[d].detach().cpu().float()[lo:hi])
    if bias is not None:
        out += bias.detach().cpu().float()
    return out


def ht_combine_weights(recv_ws, idxs, R, L, src):
    """sum over ranks of recv_topk_weights rows, per token of rank `src` (f32 [T, K])."""
    T, K = idxs[src].shape
    out = torch.zeros(T, K)
    for d in range(R):
        ref = ht_dispatch([torch.zeros(i.shape[0], 1) for i in idxs], idxs, None, R, L, d)
        lo, hi = int(ref["recv_rank_prefix"][src]), int(ref["recv_rank_prefix"][src + 1])
        tokens = ref["recv_src_token"][lo:hi].long()
        out.index_add_(0, tokens, recv_ws[d].detach().cpu().float()[lo:hi])
    return out


# --- low latency ------------------------------------------------------------------------------
def ll_slots(idxs, R, L, M, dest):
    """{(e, s): tokens of rank s that chose local expert e of `dest`, ascending}; their slots are
    [e][s*M, s*M + count)."""
    out = {}
    for s in range(R):
        idx = idxs[s].cpu()
        for e in range(L):
            g = dest * L + e
            out[(e, s)] = (idx == g).any(dim=1).nonzero().flatten()
    return out


def ll_slot_of(idxs, R, L, M, src):
    """[T, K] slot (dest, e, position) of each (token, k) of rank src; None where idx is -1."""
    idx = idxs[src].cpu()
    T, K = idx.shape
    result = [[None] * K for _ in range(T)]
    for t in range(T):
        for k in range(K):
            g = int(idx[t, k])
            if g < 0:
                continue
            d, e = divmod(g, L)
            tokens = (idx == g).any(dim=1).nonzero().flatten().tolist()
            result[t][k] = (d, e, src * M + tokens.index(t))
    return result


def ll_combine(ys, idxs, ws, R, L, M, src):
    """fp32 out[t] = sum_k w[t,k] * y_owner[e][slot of (t, k)]."""
    slots = ll_slot_of(idxs, R, L, M, src)
    w = ws[src].cpu()
    T, K = w.shape
    H = ys[0].shape[-1]
    ycpu = [y.detach().cpu().float() for y in ys]
    out = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            if slots[t][k] is None:
                continue
            d, e, slot = slots[t][k]
            out[t] += w[t, k] * ycpu[d][e, slot]
    return out
