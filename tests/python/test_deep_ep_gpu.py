"""GPU tests of moecomm.deep_ep, the DeepEP-compatible API (skipped without torch or a CUDA
device). Four virtual ranks of one GPU (moecomm.deep_ep.virtual_buffers) and a two-process
torch.distributed group on one GPU. Every test draws seeded random inputs (the seed is printed
and named in failures), poisons what it can, and checks every element against the pure-torch
reference of torch_reference.py."""

import pytest

torch = pytest.importorskip("torch")

import moecomm  # noqa: E402  (before the first CUDA call: CUDA_DEVICE_MAX_CONNECTIONS)
import moecomm.deep_ep as deep_ep  # noqa: E402

import torch_reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or moecomm.cuda_device_count() == 0,
                                reason="no CUDA device")

R = 4            # virtual ranks
E = 16           # experts
L = E // R
K = 4
H = 512          # a multiple of 512: fp8 with UE8M0 scales packs four groups per int32
T_MAX = 64       # HT capacity per rank
M = 32           # LL: num_max_dispatch_tokens_per_rank
SMS = 8


@pytest.fixture(scope="module")
def bufs():
    b = deep_ep.virtual_buffers(R, max_tokens_per_rank=T_MAX, low_latency_mode=True,
                                num_sms=SMS, timeout_seconds=30.0)
    yield b
    b.synchronize()


def inputs(seed, Ts, drop=0.15):
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for T in Ts:
        x, i, w = ref.make_inputs(gen, T, H, E, K, drop=drop)
        xs.append(x)
        idxs.append(i)
        ws.append(w)
    return xs, idxs, ws


def assert_bf16_close(actual, expected_f32, what):
    """Within one bf16 rounding of the fp32 value (accumulation order may differ)."""
    torch.testing.assert_close(actual.detach().float().cpu(), expected_f32.bfloat16().float(),
                               rtol=1.6e-2, atol=1e-2, msg=lambda m: f"{what}: {m}")


def quantize_fp8_pow2(x):
    """The reference of power-of-two scales (round_scale=True): s = max(amax, 1e-4) / 448
    rounded up to a power of two (exact bit arithmetic), q = e4m3(x / s)."""
    n, Hx = x.shape
    xf = x.detach().float().cpu().view(n, Hx // 128, 128)
    amax = xf.abs().amax(dim=-1).clamp(min=torch.tensor(ref.AMAX_FLOOR))
    s = torch.div(amax, torch.full_like(amax, ref.FP8_MAX))
    bits = s.view(torch.int32)
    up = (bits & 0x7FFFFF) != 0
    bits = torch.where(up, (bits & ~0x7FFFFF) + 0x800000, bits)
    scale = bits.view(torch.float32)
    q = ref.float_to_e4m3(xf * (1.0 / scale)[..., None]).view(n, Hx)
    return q, scale


def layouts(bufs, idxs):
    return [bufs[r].get_dispatch_layout(idxs[r], E) for r in range(R)]


def ht_dispatch_all(bufs, xs, idxs, ws, **kw):
    lay = layouts(bufs, idxs)

    def one(r):
        per_rank, rdma, per_expert, in_rank, _ = lay[r]
        assert rdma is None
        return bufs[r].dispatch(xs[r], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                num_tokens_per_expert=per_expert, topk_idx=idxs[r],
                                topk_weights=ws[r] if ws is not None else None, **kw)

    return bufs.parallel(one)


# --- layout ---------------------------------------------------------------------------------
def test_get_dispatch_layout(bufs):
    seed = 1
    Ts = [64, 17, 0, 40]
    _, idxs, _ = inputs(seed, Ts)
    for r in range(R):
        per_rank, rdma, per_expert, in_rank, event = bufs[r].get_dispatch_layout(idxs[r], E)
        idx = idxs[r].cpu()
        owner = ref.owner(idx, L)
        want_in = torch.stack([(owner == d).any(dim=1) for d in range(R)], dim=1) \
            if Ts[r] else torch.zeros(0, R, dtype=torch.bool)
        assert rdma is None and event.event is None
        assert per_rank.dtype == torch.int32 and per_expert.dtype == torch.int32
        assert in_rank.dtype == torch.bool and in_rank.shape == (Ts[r], R)
        assert torch.equal(in_rank.cpu(), want_in), f"seed {seed} rank {r}"
        assert torch.equal(per_rank.cpu(), want_in.sum(0).to(torch.int32)), f"seed {seed} rank {r}"
        want_e = torch.tensor([int((idx == e).any(dim=1).sum()) for e in range(E)],
                              dtype=torch.int32)
        assert torch.equal(per_expert.cpu(), want_e), f"seed {seed} rank {r}"
    # async: an event the caller waits for; previous_event: a captured one
    prev = deep_ep.Buffer.capture()
    out = bufs[0].get_dispatch_layout(idxs[0], E, previous_event=prev, async_finish=True)
    assert out[4].event is not None
    out[4].current_stream_wait()
    assert torch.equal(out[3].cpu(), bufs[0].get_dispatch_layout(idxs[0], E)[3].cpu())


# --- high throughput ------------------------------------------------------------------------
def check_ht(res, xs, idxs, ws, seed, alignment=1):
    for d in range(R):
        recv_x, recv_idx, recv_w, counts, handle, event = res[d]
        want = ref.ht_dispatch(xs, idxs, ws, R, L, d, alignment=alignment)
        what = f"seed {seed} rank {d}"
        assert isinstance(counts, list) and counts == want["num_recv_tokens_per_expert"].tolist(), what
        assert recv_x.dtype == torch.bfloat16 and torch.equal(recv_x.cpu(), want["recv_x"]), what
        assert recv_idx.dtype == torch.int64 and torch.equal(recv_idx.cpu(), want["recv_topk_idx"]), what
        assert torch.equal(recv_w.cpu(), want["recv_topk_weights"]), what
        assert isinstance(handle, deep_ep.DispatchHandle) and event.event is None


def test_ht_dispatch_cached_and_combine(bufs):
    seed = 2
    Ts = [64, 33, 1, 50]
    # A first dispatch of other data leaves stale rows in the registered buffers (poison).
    px, pidx, pw = inputs(seed + 1000, Ts)
    ht_dispatch_all(bufs, [x.mul(1000) for x in px], pidx, pw)
    xs, idxs, ws = inputs(seed, Ts)
    res = ht_dispatch_all(bufs, xs, idxs, ws, expert_alignment=4)
    check_ht(res, xs, idxs, ws, seed, alignment=4)
    handles = [r[4] for r in res]

    # Cached dispatch of new tokens with the same routing: recv_x only (DeepEP returns None for
    # the rest).
    xs2 = inputs(seed + 1, Ts)[0]
    cached = [bufs[r].dispatch(xs2[r], handle=handles[r]) for r in range(R)]
    for d in range(R):
        recv_x, a, b, c, h, event = cached[d]
        assert (a, b, c, h) == (None, None, None, None)
        want = ref.ht_dispatch(xs2, idxs, None, R, L, d)
        assert torch.equal(recv_x.cpu(), want["recv_x"]), f"seed {seed} cached rank {d}"

    # Combine with the received weights and two biases.
    gen = torch.Generator().manual_seed(seed)
    ys = [(r[0].float() * (d + 1)).bfloat16() for d, r in enumerate(res)]
    b0 = [torch.randn(T, H, generator=gen).bfloat16().cuda() for T in Ts]
    b1 = [torch.randn(T, H, generator=gen).bfloat16().cuda() for T in Ts]
    out = [bufs[r].combine(ys[r], handles[r], topk_weights=res[r][2], bias=(b0[r], b1[r]))
           for r in range(R)]
    recv_ws = [r[2] for r in res]
    for s in range(R):
        combined, cw, event = out[s]
        assert combined.shape == (Ts[s], H) and combined.dtype == torch.bfloat16
        # Two biases are summed and rounded to bf16 before the combine adds them (docs/deep_ep.md).
        bias = (b0[s].float() + b1[s].float()).bfloat16().float()
        assert_bf16_close(combined, ref.ht_combine(ys, idxs, R, L, s, bias=bias),
                          f"seed {seed} combine rank {s}")
        torch.testing.assert_close(cw.cpu(), ref.ht_combine_weights(recv_ws, idxs, R, L, s),
                                   msg=lambda m: f"seed {seed} combined weights rank {s}: {m}")
        assert event.event is None

    # One bias, no weights: combined_topk_weights is None.
    out = [bufs[r].combine(ys[r], handles[r], bias=b0[r]) for r in range(R)]
    for s in range(R):
        assert out[s][1] is None
        assert_bf16_close(out[s][0], ref.ht_combine(ys, idxs, R, L, s, bias=b0[s]),
                          f"seed {seed} combine one bias rank {s}")


def test_ht_dispatch_fp8(bufs):
    seed = 3
    Ts = [40, 64, 7, 20]
    xs, idxs, ws = inputs(seed, Ts)
    qs, scales = zip(*[ref.quantize_fp8(x) for x in xs])
    x8 = [(q.cuda(), s.cuda()) for q, s in zip(qs, scales)]
    res = ht_dispatch_all(bufs, x8, idxs, ws)
    for d in range(R):
        (rx, rs), recv_idx, recv_w, counts, handle, _ = res[d]
        assert rx.dtype == torch.float8_e4m3fn and rs.dtype == torch.float32
        want_q = ref.ht_dispatch([q.view(torch.uint8) for q in qs], idxs, ws, R, L, d)
        want_s = ref.ht_dispatch(list(scales), idxs, None, R, L, d)
        assert torch.equal(rx.view(torch.uint8).cpu(), want_q["recv_x"]), f"seed {seed} rank {d}"
        assert torch.equal(rs.cpu(), want_s["recv_x"]), f"seed {seed} rank {d}"
        assert torch.equal(recv_idx.cpu(), want_q["recv_topk_idx"]), f"seed {seed} rank {d}"
    # cached fp8 dispatch returns the (x, scales) tuple as well
    cached = [bufs[r].dispatch(x8[r], handle=res[r][4]) for r in range(R)]
    for d in range(R):
        rx, rs = cached[d][0]
        want_s = ref.ht_dispatch(list(scales), idxs, None, R, L, d)
        assert torch.equal(rs.cpu(), want_s["recv_x"]), f"seed {seed} cached rank {d}"


def test_ht_worst_case_tokens(bufs):
    """num_worst_tokens: no host wait (so ranks may go one after another from one thread),
    outputs of that many rows, rows past the received count with recv_topk_idx -1."""
    seed = 4
    Ts = [64, 3, 30, 45]
    worst = R * T_MAX
    xs, idxs, ws = inputs(seed, Ts)
    lay = layouts(bufs, idxs)
    res = [bufs[r].dispatch(xs[r], num_tokens_per_rank=lay[r][0], is_token_in_rank=lay[r][3],
                            num_tokens_per_expert=lay[r][2], topk_idx=idxs[r],
                            topk_weights=ws[r], num_worst_tokens=worst) for r in range(R)]
    for d in range(R):
        recv_x, recv_idx, recv_w, counts, handle, _ = res[d]
        want = ref.ht_dispatch(xs, idxs, ws, R, L, d)
        n = want["num_recv"]
        what = f"seed {seed} rank {d}"
        assert counts == [] and recv_x.shape == (worst, H) and recv_idx.shape == (worst, K), what
        assert torch.equal(recv_x[:n].cpu(), want["recv_x"]), what
        assert torch.equal(recv_idx[:n].cpu(), want["recv_topk_idx"]), what
        assert bool((recv_idx[n:] == -1).all()), what
        assert torch.equal(recv_w[:n].cpu(), want["recv_topk_weights"]), what
    ys = [(r[0].float() * 0.5).bfloat16() for r in res]
    out = [bufs[r].combine(ys[r], res[r][4]) for r in range(R)]
    trimmed = [ys[d][:ref.ht_dispatch(xs, idxs, None, R, L, d)["num_recv"]] for d in range(R)]
    for s in range(R):
        assert_bf16_close(out[s][0], ref.ht_combine(trimmed, idxs, R, L, s),
                          f"seed {seed} worst-case combine rank {s}")


def test_ht_async_and_previous_event(bufs):
    seed = 5
    Ts = [12, 64, 31, 5]
    xs, idxs, ws = inputs(seed, Ts)
    lay = layouts(bufs, idxs)
    prev = [deep_ep.Buffer.capture() for _ in range(R)]

    def one(r):
        return bufs[r].dispatch(xs[r], num_tokens_per_rank=lay[r][0], is_token_in_rank=lay[r][3],
                                num_tokens_per_expert=lay[r][2], topk_idx=idxs[r],
                                topk_weights=ws[r], previous_event=prev[r], async_finish=True)

    res = bufs.parallel(one)
    for r in range(R):  # every rank has made the call: now the current stream may wait
        assert res[r][5].event is not None and res[r][5].extra_tensors is not None
        res[r][5].current_stream_wait()
    check_ht([(*x[:5], deep_ep.EventOverlap()) for x in res], xs, idxs, ws, seed)
    ys = [x[0] for x in res]
    outs = [bufs[r].combine(ys[r], res[r][4], async_finish=True) for r in range(R)]
    for r in range(R):
        with outs[r][2]:  # `with` waits at the end of the block
            pass
    for s in range(R):
        assert_bf16_close(outs[s][0], ref.ht_combine(ys, idxs, R, L, s), f"seed {seed} rank {s}")


def test_errors_name_the_argument(bufs):
    _, idxs, ws = inputs(6, [8] * R)
    b = bufs[0]
    with pytest.raises(moecomm.InvalidArgument, match="^topk_idx: expected"):
        b.get_dispatch_layout(idxs[0].float(), E)
    with pytest.raises(moecomm.InvalidArgument, match="^num_experts: expected a multiple"):
        b.get_dispatch_layout(idxs[0], E + 1)
    x = torch.zeros(8, H, device="cuda")  # float32, not bf16
    with pytest.raises(moecomm.InvalidArgument, match=r"^x: expected \[num_tokens, hidden\]"):
        b.dispatch(x, topk_idx=idxs[0])
    xb = x.bfloat16()
    with pytest.raises(moecomm.InvalidArgument, match="^num_tokens_per_rank: required"):
        b.dispatch(xb, topk_idx=idxs[0])
    with pytest.raises(moecomm.InvalidArgument, match=r"^x\[1\]: expected"):
        b.dispatch((xb.to(torch.float8_e4m3fn), torch.ones(8, 3, device="cuda")), topk_idx=idxs[0])
    with pytest.raises(moecomm.InvalidArgument, match="^x: 9 tokens, expected at most "
                                                      "num_max_dispatch_tokens_per_rank = 8"):
        b.low_latency_dispatch(torch.zeros(9, H, dtype=torch.bfloat16, device="cuda"),
                               torch.zeros(9, K, dtype=torch.int64, device="cuda"), 8, E)
    with pytest.raises(moecomm.InvalidArgument, match="^cumulative_local_expert_recv_stats"):
        b.low_latency_dispatch(xb, idxs[0], M, E,
                               cumulative_local_expert_recv_stats=torch.zeros(L, device="cuda"))


# --- low latency ----------------------------------------------------------------------------
def ll_dispatch_all(bufs, xs, idxs, **kw):
    return [bufs[r].low_latency_dispatch(xs[r], idxs[r], M, E, **kw) for r in range(R)]


def valid_slots(idxs, d):
    """[L, R*M] bool: the slots of rank d that hold a token."""
    mask = torch.zeros(L, R * M, dtype=torch.bool)
    for (e, s), tokens in ref.ll_slots(idxs, R, L, M, d).items():
        mask[e, s * M:s * M + tokens.numel()] = True
    return mask


def check_ll_bf16(res, xs, idxs, seed):
    for d in range(R):
        recv_x, count, handle, event, hook = res[d]
        what = f"seed {seed} rank {d}"
        assert recv_x.shape == (L, R * M, H) and recv_x.dtype == torch.bfloat16, what
        assert count.dtype == torch.int32 and count.shape == (L,), what
        slots = ref.ll_slots(idxs, R, L, M, d)
        rx = recv_x.cpu()
        for e in range(L):
            n_e = 0
            for s in range(R):
                tokens = slots[(e, s)]
                n = tokens.numel()
                assert torch.equal(rx[e, s * M:s * M + n], xs[s].cpu()[tokens]), f"{what} e{e} s{s}"
                n_e += n
            assert int(count[e]) == n_e, what


def test_ll_dispatch_combine_bf16(bufs):
    seed = 7
    Ts = [32, 9, 0, 20]
    xs, idxs, ws = inputs(seed, Ts)
    stats = [torch.full((L,), 5, dtype=torch.int32, device="cuda") for _ in range(R)]
    res = [bufs[r].low_latency_dispatch(xs[r], idxs[r], M, E, use_fp8=False,
                                        cumulative_local_expert_recv_stats=stats[r])
           for r in range(R)]
    check_ll_bf16(res, xs, idxs, seed)
    for d in range(R):
        assert torch.equal(stats[d].cpu(), res[d][1].cpu() + 5), f"seed {seed} stats rank {d}"
        assert isinstance(res[d][2], deep_ep.LowLatencyHandle) and res[d][4] is None
    # Experts' output: NaN in every empty slot, which combine must never read.
    ys = []
    for d in range(R):
        mask = valid_slots(idxs, d).cuda()[..., None]
        ys.append(torch.where(mask, res[d][0].float() * (d + 1),
                              torch.full((), float("nan"), device="cuda")).bfloat16())
    outs = [torch.full((Ts[r], H), float("nan"), dtype=torch.bfloat16, device="cuda")
            for r in range(R)]
    comb = [bufs[r].low_latency_combine(ys[r], idxs[r], ws[r], res[r][2], out=outs[r])
            for r in range(R)]
    for s in range(R):
        combined, event, hook = comb[s]
        assert combined is outs[s] and hook is None and event.event is None
        assert_bf16_close(combined, ref.ll_combine(ys, idxs, ws, R, L, M, s),
                          f"seed {seed} LL combine rank {s}")


def test_ll_fp8_scales(bufs):
    seed = 8
    Ts = [32, 31, 5, 17]
    xs, idxs, _ = inputs(seed, Ts)
    G = H // 128
    res = ll_dispatch_all(bufs, xs, idxs)  # use_fp8=True is the default
    for d in range(R):
        (q, scales), count, _, _, _ = res[d]
        what = f"seed {seed} rank {d}"
        assert q.dtype == torch.float8_e4m3fn and q.shape == (L, R * M, H), what
        assert scales.dtype == torch.float32 and scales.shape == (L, R * M, G), what
        assert scales.stride() == (G * R * M, 1, R * M), f"{what}: column-major as in DeepEP"
        qc, sc = q.view(torch.uint8).cpu(), scales.cpu()
        for (e, s), tokens in ref.ll_slots(idxs, R, L, M, d).items():
            n = tokens.numel()
            wq, ws_ = ref.quantize_fp8(xs[s].cpu()[tokens])
            assert torch.equal(qc[e, s * M:s * M + n], wq.view(torch.uint8)), f"{what} e{e} s{s}"
            assert torch.equal(sc[e, s * M:s * M + n], ws_), f"{what} e{e} s{s}"

    # round_scale + use_ue8m0: power-of-two scales, their exponents packed four per int32.
    res = ll_dispatch_all(bufs, xs, idxs, round_scale=True, use_ue8m0=True)
    for d in range(R):
        (q, packed), _, _, _, _ = res[d]
        what = f"seed {seed} ue8m0 rank {d}"
        assert packed.dtype == torch.int32 and packed.shape == (L, R * M, G // 4), what
        assert packed.stride() == (G // 4 * R * M, 1, R * M), what
        # A fresh row-major copy: with G // 4 == 1 .contiguous() would keep the column-major
        # strides (a size-1 dimension counts as contiguous) and the byte view would fail.
        dense = torch.empty(tuple(packed.shape), dtype=torch.int32)
        dense.copy_(packed)
        exps = dense.view(torch.uint8).view(L, R * M, G).to(torch.int32)
        qc = q.view(torch.uint8).cpu()
        for (e, s), tokens in ref.ll_slots(idxs, R, L, M, d).items():
            n = tokens.numel()
            wq, wscale = quantize_fp8_pow2(xs[s].cpu()[tokens])
            want_exp = (wscale.view(torch.int32) >> 23) & 0xFF
            assert torch.equal(exps[e, s * M:s * M + n], want_exp), f"{what} e{e} s{s}"
            assert torch.equal(qc[e, s * M:s * M + n], wq.view(torch.uint8)), f"{what} e{e} s{s}"

    # round_scale without UE8M0: float32 powers of two
    res = ll_dispatch_all(bufs, xs, idxs, round_scale=True)
    for d in range(R):
        (_, scales), _, _, _, _ = res[d]
        for (e, s), tokens in ref.ll_slots(idxs, R, L, M, d).items():
            n = tokens.numel()
            _, wscale = quantize_fp8_pow2(xs[s].cpu()[tokens])
            assert torch.equal(scales[e, s * M:s * M + n].cpu(), wscale), f"seed {seed} rank {d}"


def test_ll_hooks_and_zero_copy(bufs):
    seed = 9
    Ts = [20, 32, 11, 1]
    xs, idxs, ws = inputs(seed, Ts)
    res = ll_dispatch_all(bufs, xs, idxs, use_fp8=False, return_recv_hook=True)
    for r in range(R):
        assert callable(res[r][4]) and res[r][3].event is None
    for r in range(R):
        res[r][4]()  # the receive phase, every rank
    check_ll_bf16(res, xs, idxs, seed)
    with pytest.raises(moecomm.InvalidArgument, match="already called"):
        res[0][4]()
    # Zero-copy combine: the experts write into the buffer combine reads; poison it first.
    ys = []
    for d in range(R):
        buf = bufs[d].get_next_low_latency_combine_buffer(res[d][2])
        assert buf.shape == (L, R * M, H) and buf.dtype == torch.bfloat16
        buf.fill_(float("nan"))
        mask = valid_slots(idxs, d).cuda()[..., None]
        buf.copy_(torch.where(mask, res[d][0].float() * (d + 2), buf.float()).bfloat16())
        ys.append(buf.clone())
    comb = [bufs[r].low_latency_combine(bufs[r].get_next_low_latency_combine_buffer(res[r][2]),
                                        idxs[r], ws[r], res[r][2], zero_copy=True,
                                        return_recv_hook=True)
            for r in range(R)]
    for r in range(R):
        comb[r][2]()
    for s in range(R):
        assert_bf16_close(comb[s][0], ref.ll_combine(ys, idxs, ws, R, L, M, s),
                          f"seed {seed} zero-copy combine rank {s}")


def test_ll_async(bufs):
    seed = 10
    Ts = [3, 32, 30, 12]
    xs, idxs, ws = inputs(seed, Ts)
    res = ll_dispatch_all(bufs, xs, idxs, use_fp8=False, async_finish=True)
    for r in range(R):
        res[r][3].current_stream_wait()
    check_ll_bf16(res, xs, idxs, seed)
    comb = [bufs[r].low_latency_combine(res[r][0], idxs[r], ws[r], res[r][2], async_finish=True)
            for r in range(R)]
    for r in range(R):
        comb[r][1].current_stream_wait()
    ys = [r_[0] for r_ in res]
    for s in range(R):
        assert_bf16_close(comb[s][0], ref.ll_combine(ys, idxs, ws, R, L, M, s),
                          f"seed {seed} async combine rank {s}")


def test_ll_cuda_graph(bufs):
    """One decode step of every rank (fp8 dispatch, experts into the combine buffer, zero-copy
    combine) captured once and replayed with new tokens and routing."""
    seed = 11
    Ts = [32, 16, 25, 8]
    xs, idxs, ws = inputs(seed, Ts)
    outs = [torch.empty(T, H, dtype=torch.bfloat16, device="cuda") for T in Ts]
    keep = []  # the handles of the captured calls must outlive the graph

    def step():
        d = ll_dispatch_all(bufs, xs, idxs)
        keep.append(d)
        for r in range(R):
            (q, scales), _, handle, _, _ = d[r]
            buf = bufs[r].get_next_low_latency_combine_buffer(handle)
            deq = q.float().view(L, R * M, H // 128, 128) * scales[..., None]
            buf.copy_((deq * 2).view(L, R * M, H).bfloat16())
        for r in range(R):
            bufs[r].low_latency_combine(bufs[r].get_next_low_latency_combine_buffer(d[r][2]),
                                        idxs[r], ws[r], d[r][2], zero_copy=True, out=outs[r])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up, eager
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for it in range(3):
        new_x, new_idx, new_w = inputs(seed * 100 + it, Ts)
        for r in range(R):
            xs[r].copy_(new_x[r])
            idxs[r].copy_(new_idx[r])
            ws[r].copy_(new_w[r])
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for r in range(R):
            want = torch.zeros(Ts[r], H)
            slots = ref.ll_slot_of(new_idx, R, L, M, r)
            w_cpu = new_w[r].cpu()
            q, scale = ref.quantize_fp8(new_x[r].cpu())
            deq = (q.float().view(Ts[r], H // 128, 128) * scale[..., None]).view(Ts[r], H)
            deq = (deq * 2).bfloat16().float()
            for t in range(Ts[r]):
                for k in range(K):
                    if slots[t][k] is not None:
                        want[t] += w_cpu[t, k] * deq[t]
            assert_bf16_close(outs[r], want, f"seed {seed * 100 + it} graph replay rank {r}")


# --- shrink mode (masked ranks) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def shrink_bufs():
    b = deep_ep.virtual_buffers(R, max_tokens_per_rank=T_MAX, low_latency_mode=True,
                                num_sms=SMS, timeout_seconds=10.0, enable_shrink=True)
    yield b
    b.synchronize()


def masked_routing(idxs, masked, viewer):
    """The routing rank `viewer` takes part in while every rank masks rank `masked`: for another
    rank, `masked`'s experts are dropped (-1) and `masked` sends nothing; for `masked` itself,
    which completes its calls alone, only its own tokens to its own experts."""
    out = []
    for s, idx in enumerate(idxs):
        idx = idx.cpu()
        owner = torch.where(idx >= 0, torch.div(idx, L, rounding_mode="floor"),
                            torch.full_like(idx, -1))
        if viewer == masked:
            keep = (owner == masked) & (s == masked)
        else:
            keep = (owner >= 0) & (owner != masked) & (s != masked)
        out.append(torch.where(keep, idx, torch.full_like(idx, -1)))
    return out


def check_ll_bf16_views(res, xs, views, seed, what):
    """LL bf16 dispatch outputs of every rank d against the routing views[d] (the valid slots of
    every source and the counts)."""
    for d in range(R):
        recv_x, count = res[d][0], res[d][1]
        slots = ref.ll_slots(views[d], R, L, M, d)
        rx, cnt = recv_x.cpu(), count.cpu()
        for e in range(L):
            n_e = 0
            for s in range(R):
                tokens = slots[(e, s)]
                n = tokens.numel()
                assert torch.equal(rx[e, s * M:s * M + n], xs[s].cpu()[tokens]), \
                    f"seed {seed} {what} rank {d} e{e} s{s}"
                n_e += n
            assert int(cnt[e]) == n_e, f"seed {seed} {what} rank {d} expert {e}: count"


def ll_round(bufs, xs, idxs, ws, views, seed, what):
    """LL bf16 dispatch and combine on every rank, checked element by element against the
    routing each rank takes part in (views[d]). Empty slots of the experts' output are NaN
    (combine must never read them), and so is `out` before the combine."""
    res = [bufs[r].low_latency_dispatch(xs[r], idxs[r], M, E, use_fp8=False) for r in range(R)]
    check_ll_bf16_views(res, xs, views, seed, what)
    ys = []
    for d in range(R):
        mask = valid_slots(views[d], d).cuda()[..., None]
        ys.append(torch.where(mask, res[d][0].float() * (d + 1),
                              torch.full((), float("nan"), device="cuda")).bfloat16())
    outs = [torch.full((x.shape[0], H), float("nan"), dtype=torch.bfloat16, device="cuda")
            for x in xs]
    comb = [bufs[r].low_latency_combine(ys[r], idxs[r], ws[r], res[r][2], out=outs[r])
            for r in range(R)]
    for s in range(R):
        assert comb[s][0] is outs[s]
        assert_bf16_close(outs[s], ref.ll_combine(ys, views[s], ws, R, L, M, s),
                          f"seed {seed} {what} combine rank {s}")


def query_all(bufs):
    out = []
    for b in bufs:
        status = torch.full((R,), -1, dtype=torch.int32, device="cuda")
        b.low_latency_query_mask_buffer(status)
        out.append(status.cpu().tolist())
    return out


def test_shrink_mask_one_rank(shrink_bufs):
    """DeepEP's shrink mode: every rank masks rank 1 (rank 1 too); low-latency results are those
    without rank 1 (its experts dropped, nothing from it; rank 1 alone with its own experts);
    query reports the mask, HT ignores it, and after a clean the results are full again."""
    bufs = shrink_bufs
    seed = 12
    m = 1
    Ts = [32, 20, 9, 27]
    # Poison: unmasked rounds of other data fill both alternating LL buffers with stale rows.
    px, pidx, pw = inputs(seed + 1000, Ts)
    for _ in range(2):
        ll_round(bufs, [x.mul(1000) for x in px], pidx, pw, [pidx] * R, seed + 1000, "poison")
    assert query_all(bufs) == [[0] * R] * R

    xs, idxs, ws = inputs(seed, Ts)
    full_views = [idxs] * R
    for b in bufs:
        b.low_latency_update_mask_buffer(m, True)
    want = [[1 if r == m else 0 for r in range(R)]] * R
    assert query_all(bufs) == want
    views = [masked_routing(idxs, m, d) for d in range(R)]
    for it in range(2):  # both alternating buffers
        ll_round(bufs, xs, idxs, ws, views, seed, f"rank {m} masked, round {it}")
    bufs.synchronize()
    assert query_all(bufs) == want  # and no time-out masked anyone else

    # High-throughput calls ignore the mask (as DeepEP's, which never read it).
    check_ht(ht_dispatch_all(bufs, xs, idxs, ws), xs, idxs, ws, seed)

    for b in bufs:
        b.low_latency_clean_mask_buffer()
    assert query_all(bufs) == [[0] * R] * R
    ll_round(bufs, xs, idxs, ws, full_views, seed, "after clean")

    # update(mask=False) unmasks as well.
    for b in bufs:
        b.low_latency_update_mask_buffer(R - 1, True)
    ll_round(bufs, xs, idxs, ws, [masked_routing(idxs, R - 1, d) for d in range(R)], seed,
             f"rank {R - 1} masked")
    for b in bufs:
        b.low_latency_update_mask_buffer(R - 1, False)
    assert query_all(bufs) == [[0] * R] * R
    ll_round(bufs, xs, idxs, ws, full_views, seed, "after unmask")
    bufs.synchronize()
    assert query_all(bufs) == [[0] * R] * R


def test_shrink_needs_enable_shrink(bufs):
    status = torch.zeros(R, dtype=torch.int32, device="cuda")
    with pytest.raises(moecomm.InvalidArgument, match="enable_shrink=False"):
        bufs[0].low_latency_query_mask_buffer(status)
    with pytest.raises(moecomm.InvalidArgument, match="enable_shrink=False"):
        bufs[0].low_latency_update_mask_buffer(1, True)


# --- a two-process group ----------------------------------------------------------------------
def test_two_process_group(tmp_path):
    """Two processes on cuda:0 over a gloo group: Buffer(group) as frameworks make it."""
    import torch.multiprocessing as mp

    import deep_ep_process_worker

    mp.spawn(deep_ep_process_worker.run, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
