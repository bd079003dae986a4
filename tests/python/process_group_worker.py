"""One rank of the two-process test of tests/python/test_gpu.py (torch.multiprocessing.spawn):
both processes on cuda:0, bootstrapped over a gloo process group."""

import os


def run(rank, world, init_file):
    import torch
    import torch.distributed as dist

    import moecomm  # before the first CUDA call

    import torch_reference as ref

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _check(rank, world, torch, dist, moecomm, ref)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_mismatch(rank, world, init_file):
    """Rank 1 has hidden 512, the others 256: process_group_communicator raises InvalidArgument on
    every rank, naming Config.hidden and the ranks on each side."""
    import torch
    import torch.distributed as dist

    import moecomm

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        cfg = moecomm.MoECommunicatorConfig(num_experts=8, hidden=512 if rank == 1 else 256,
                                            topk=2, max_tokens_per_rank=16, num_sms=4)
        try:
            moecomm.process_group_communicator(cfg)
        except moecomm.InvalidArgument as e:
            others = ",".join(str(r) for r in range(world) if r != 1)
            want = (f"Config.hidden differs: rank{'s' if world > 2 else ''} {others} "
                    f"ha{'ve' if world > 2 else 's'} 256, rank 1 has 512")
            assert want in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: a config mismatch was not refused")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _check(rank, R, torch, dist, moecomm, ref):
    E, K, H = 8, 2, 256
    L = E // R
    # auto: up to 16 tokens take the LL path, above it HT.
    cfg = moecomm.MoECommunicatorConfig(num_experts=E, hidden=H, topk=K, max_tokens_per_rank=64,
                                        mode="auto", auto_low_latency_max_tokens=16,
                                        low_latency_max_tokens=16, num_sms=4,
                                        timeout_seconds=60.0)
    comm = moecomm.process_group_communicator(cfg)
    assert comm.rank == rank and comm.num_ranks == R

    # Every process makes every rank's inputs from one seed; each sends its own.
    gen = torch.Generator().manual_seed(7)
    ht = [ref.make_inputs(gen, T, H, E, K) for T in (48, 33)]
    ll = [ref.make_inputs(gen, T, H, E, K) for T in (16, 9)]

    # HT, exact sizing (the host waits for the counts: fine, one rank per process).
    xs, idxs, ws = [d[0] for d in ht], [d[1] for d in ht], [d[2] for d in ht]
    out, handle = comm.dispatch(xs[rank], idxs[rank], ws[rank])
    want = ref.ht_dispatch(xs, idxs, ws, R, L, rank)
    assert out.mode == "ht" and out.num_recv_tokens == want["num_recv"]
    assert torch.equal(out.recv_x.cpu(), want["recv_x"])
    assert torch.equal(out.recv_topk_idx.cpu(), want["recv_topk_idx"])
    assert torch.equal(out.recv_topk_weights.cpu(), want["recv_topk_weights"])
    # y lives in user memory: the library stages it into registered memory.
    ys_local = (out.recv_x.float() * (rank + 1)).bfloat16()  # a tensor of the caller's
    c = comm.combine(ys_local, handle)
    # Every rank needs every rank's y for the reference: gather them.
    ys = [None] * R
    dist.all_gather_object(ys, ys_local.cpu())
    got = c.out.float().cpu()
    expected = ref.ht_combine(ys, idxs, R, L, rank).bfloat16().float()
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)

    # HT on a torch stream of its own: the kernels go on the caller's stream directly.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out2, h2 = comm.dispatch(xs[rank], idxs[rank], previous_handle=handle)
        got2 = out2.recv_x.clone()
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got2.cpu(), want["recv_x"])

    # LL (auto picks it for 16 tokens or fewer), fp8 on the way.
    xs, idxs, ws = [d[0] for d in ll], [d[1] for d in ll], [d[2] for d in ll]
    M = 16
    out, handle = comm.dispatch(xs[rank], idxs[rank], quantize_fp8=True)
    assert out.mode == "ll"
    slots = ref.ll_slots(idxs, R, L, M, rank)
    rx = out.recv_x.cpu()
    for e in range(L):
        for src in range(R):
            tokens = slots[(e, src)]
            q, scale = ref.quantize_fp8(xs[src].cpu()[tokens])
            n = tokens.numel()
            assert torch.equal(rx[e, src * M:src * M + n].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(out.recv_x_scales.cpu()[e, src * M:src * M + n], scale)
    buf = comm.combine_buffer(handle)
    deq = (out.recv_x.float().view(L, R * M, H // 128, 128) * out.recv_x_scales[..., None])
    buf.copy_(deq.view(L, R * M, H).bfloat16())
    mine = buf.cpu()
    c = comm.combine(buf, handle, topk_weights=ws[rank])
    bufs = [None] * R
    dist.all_gather_object(bufs, mine)
    expected = ref.ll_combine(bufs, idxs, ws, R, L, M, rank).bfloat16().float()
    torch.testing.assert_close(c.out.float().cpu(), expected, rtol=1.6e-2, atol=1e-2)
    comm.synchronize()


if __name__ == "__main__":  # manual run: python process_group_worker.py (2 processes)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(2, os.path.join(d, "init")), nprocs=2, join=True)
