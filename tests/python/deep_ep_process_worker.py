"""One rank of the two-process test of tests/python/test_deep_ep_gpu.py (torch.multiprocessing
spawn): both processes on cuda:0, a gloo process group, and `import deep_ep` served by
moecomm.deep_ep.install(), the way a framework would use it."""

import os


def run(rank, world, init_file):
    import torch
    import torch.distributed as dist

    import moecomm  # before the first CUDA call
    import moecomm.deep_ep

    moecomm.deep_ep.install()
    import deep_ep  # noqa: E402  (moecomm's)

    import torch_reference as ref

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _check(rank, world, torch, dist, deep_ep, ref)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _gather(dist, R, t):
    out = [None] * R
    dist.all_gather_object(out, t.cpu())
    return out


def _check(rank, R, torch, dist, deep_ep, ref):
    E, K, H, M = 8, 2, 256, 16
    L = E // R
    seed = 21
    print(f"rank {rank}: seed {seed}")
    deep_ep.Buffer.set_num_sms(8)
    cfg = deep_ep.Buffer.get_dispatch_config(R)
    buf = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=cfg.get_nvl_buffer_size_hint(2 * H, R),
                         num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                         low_latency_mode=True, num_qps_per_rank=L, timeout_seconds=60.0)
    assert buf.rank == rank and buf.group_size == R and buf.get_num_rdma_ranks() == 1

    # Every process makes every rank's inputs from one seed; each sends its own.
    gen = torch.Generator().manual_seed(seed)
    for Ts in ((48, 33), (200, 5)):  # the second round grows the HT capacity (agreed by both)
        data = [ref.make_inputs(gen, T, H, E, K) for T in Ts]
        xs, idxs, ws = [d[0] for d in data], [d[1] for d in data], [d[2] for d in data]
        per_rank, rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], E)
        recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
            xs[rank], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=idxs[rank], topk_weights=ws[rank],
            config=cfg)
        want = ref.ht_dispatch(xs, idxs, ws, R, L, rank)
        what = f"seed {seed} rank {rank} T {Ts}"
        assert counts == want["num_recv_tokens_per_expert"].tolist(), what
        assert torch.equal(recv_x.cpu(), want["recv_x"]), what
        assert torch.equal(recv_idx.cpu(), want["recv_topk_idx"]), what
        assert torch.equal(recv_w.cpu(), want["recv_topk_weights"]), what

        y = (recv_x.float() * (rank + 1)).bfloat16()
        biases = [torch.randn(T, H, generator=gen).bfloat16().cuda() for T in Ts]
        combined, cw, _ = buf.combine(y, handle, topk_weights=recv_w, bias=biases[rank],
                                      config=deep_ep.Buffer.get_combine_config(R))
        ys, rws = _gather(dist, R, y), _gather(dist, R, recv_w)
        expected = ref.ht_combine(ys, idxs, R, L, rank, bias=biases[rank]).bfloat16().float()
        torch.testing.assert_close(combined.float().cpu(), expected, rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(cw.cpu(), ref.ht_combine_weights(rws, idxs, R, L, rank))

    # Low latency, fp8, then a zero-copy combine.
    data = [ref.make_inputs(gen, T, H, E, K) for T in (16, 9)]
    xs, idxs, ws = [d[0] for d in data], [d[1] for d in data], [d[2] for d in data]
    (q, scales), count, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], M, E)
    slots = ref.ll_slots(idxs, R, L, M, rank)
    qc, sc = q.view(torch.uint8).cpu(), scales.cpu()
    for (e, s), tokens in slots.items():
        n = tokens.numel()
        wq, wscale = ref.quantize_fp8(xs[s].cpu()[tokens])
        assert torch.equal(qc[e, s * M:s * M + n], wq.view(torch.uint8)), f"rank {rank} e{e} s{s}"
        assert torch.equal(sc[e, s * M:s * M + n], wscale), f"rank {rank} e{e} s{s}"
    assert count.cpu().tolist() == [sum(slots[(e, s)].numel() for s in range(R)) for e in range(L)]
    cbuf = buf.get_next_low_latency_combine_buffer(handle)
    deq = q.float().view(L, R * M, H // 128, 128) * scales[..., None]
    cbuf.copy_(deq.view(L, R * M, H).bfloat16())
    mine = cbuf.cpu()
    combined, _, _ = buf.low_latency_combine(cbuf, idxs[rank], ws[rank], handle, zero_copy=True)
    bufs = _gather(dist, R, mine)
    expected = ref.ll_combine(bufs, idxs, ws, R, L, M, rank).bfloat16().float()
    torch.testing.assert_close(combined.float().cpu(), expected, rtol=1.6e-2, atol=1e-2)
    torch.cuda.synchronize()


if __name__ == "__main__":  # manual run: python deep_ep_process_worker.py (2 processes)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(2, os.path.join(d, "init")), nprocs=2, join=True)
