"""Tests of the Python package that need no GPU (CI): the extension builds and imports, config
errors carry clear messages, DLPack plumbing, and the errors raised where there is no device."""

import builtins
import dataclasses
import os
import sys

import numpy as np
import pytest

import moecomm
from moecomm import _C
from moecomm import _frameworks
from moecomm.communicator import _Joiner

HAS_GPU = moecomm.cuda_device_count() > 0


def make_config(**kw):
    base = dict(num_experts=8, hidden=256, topk=2, max_tokens_per_rank=64)
    base.update(kw)
    return moecomm.MoECommunicatorConfig(**base)


# --- the extension ----------------------------------------------------------------------------
def test_imports_and_version():
    assert moecomm.__version__ == "0.1.0"
    assert isinstance(moecomm.cuda_device_count(), int)
    assert _C.cuda_runtime_version() >= 13000


def test_exception_hierarchy():
    assert issubclass(moecomm.Error, RuntimeError)
    for cls in (moecomm.InvalidArgument, moecomm.TimeoutError, moecomm.Unsupported,
                moecomm.CudaError):
        assert issubclass(cls, moecomm.Error)
    assert issubclass(moecomm.InvalidArgument, ValueError)
    assert issubclass(moecomm.TimeoutError, builtins.TimeoutError)
    assert moecomm.InvalidArgument.__module__ == "moecomm"
    assert moecomm.InvalidArgument.__name__ == "InvalidArgument"


def test_installed_layout():
    # The library sits next to the extension (RPATH $ORIGIN) once installed as a wheel.
    here = os.path.dirname(_C.__file__)
    if "site-packages" not in here and "dist-packages" not in here:
        pytest.skip("moecomm is imported from a build tree")
    assert any(name.startswith("libmoecomm.so") for name in os.listdir(here))


# --- config -----------------------------------------------------------------------------------
def test_config_defaults_mirror_cpp():
    cfg = make_config()
    cpp = _C.Config()
    for f in dataclasses.fields(cfg):
        if f.name in ("num_experts", "hidden", "topk", "max_tokens_per_rank", "validate_inputs"):
            continue
        assert getattr(cfg, f.name) == getattr(cpp, f.name), f.name
    assert cfg.local_experts(4) == 2
    assert cfg.ll_capacity() == 64


def test_config_topk_zero():
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.topk: expected 1\.\.32, got 0"):
        make_config(topk=0)


def test_config_topk_above_experts():
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.topk: expected <= num_experts"):
        make_config(topk=9)


def test_config_experts_not_divisible():
    cfg = make_config(num_experts=8)
    with pytest.raises(moecomm.InvalidArgument,
                       match=r"Config\.num_experts: expected a multiple of the number of ranks "
                             r"\(3\), got 8"):
        cfg.validate(num_ranks=3)
    # The group checks the config before it looks for a device.
    with pytest.raises(moecomm.InvalidArgument, match=r"multiple of the number of ranks \(3\)"):
        moecomm.virtual_group(3, cfg)


def test_config_hidden_fp8():
    with pytest.raises(moecomm.InvalidArgument,
                       match=r"Config\.hidden: expected a multiple of 128 when enable_fp8"):
        make_config(hidden=200)
    make_config(hidden=200 - 200 % 8, enable_fp8=False)


def test_config_bad_mode_and_types():
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.mode: expected 'll', 'ht' or 'auto'"):
        make_config(mode="fast")
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.scale_format"):
        make_config(scale_format="e8m0")
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.hidden: expected an integer"):
        make_config(hidden="256")
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.timeout_seconds"):
        make_config(timeout_seconds=0)
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.num_sms: expected >= 1"):
        make_config(num_sms=0)
    assert make_config(mode="low_latency").mode == "ll"
    assert make_config(mode="ll")._to_cpp().mode == "ll"


def test_config_is_an_error_and_a_valueerror():
    with pytest.raises(ValueError):
        make_config(topk=0)
    with pytest.raises(moecomm.Error):
        make_config(topk=0)


def test_config_file_roundtrip(tmp_path):
    cfg = make_config(mode="auto", num_sms=8, scale_format="pow2", timeout_seconds=2.5,
                      max_recv_tokens=100)
    path = tmp_path / "tuned.cfg"
    cfg.save(path)
    text = path.read_text()
    assert "num_sms = 8" in text and "mode = auto" in text and "scale_format = pow2" in text
    back = moecomm.MoECommunicatorConfig.load(path)
    for f in dataclasses.fields(cfg):
        if f.name != "validate_inputs":
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name
    with pytest.raises(moecomm.InvalidArgument, match="cannot be opened"):
        moecomm.MoECommunicatorConfig.load(tmp_path / "missing.cfg")


def test_config_from_dict_in_group():
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.topk"):
        moecomm.virtual_group(2, dict(num_experts=8, hidden=256, topk=0, max_tokens_per_rank=4))
    with pytest.raises(moecomm.InvalidArgument, match="config: expected a moecomm.MoECommunicatorConfig"):
        moecomm.virtual_group(2, 42)


# --- groups that span nodes -------------------------------------------------------------------
def test_internode_fields_mirror_cpp_and_validate():
    cfg = make_config(rdma_bytes=2**33, nic_model_gbps=50.0, nic_model_latency_us=2.0)
    cpp = cfg._to_cpp()
    assert (cpp.rdma_bytes, cpp.nic_model_gbps, cpp.nic_model_latency_us) == (2**33, 50.0, 2.0)
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.rdma_bytes: expected >= 0"):
        make_config(rdma_bytes=-1)
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.rdma_bytes: expected an integer"):
        make_config(rdma_bytes=1.5)
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.nic_model_gbps"):
        make_config(nic_model_gbps=-1.0)
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.nic_model_gbps"):
        make_config(nic_model_gbps=float("nan"))
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.nic_model_latency_us"):
        make_config(nic_model_latency_us=float("nan"))
    with pytest.raises(moecomm.InvalidArgument, match=r"Config\.nic_model_latency_us"):
        make_config(nic_model_latency_us="soon")


def test_internode_fields_roundtrip(tmp_path):
    cfg = make_config(rdma_bytes=9_000_000_000, nic_model_gbps=48.5, nic_model_latency_us=1.25)
    text = cfg.to_text()
    assert "rdma_bytes = 9000000000" in text and "nic_model_gbps = 48.5" in text
    assert "nic_model_latency_us = 1.25" in text
    path = tmp_path / "internode.cfg"
    cfg.save(path)
    back = moecomm.MoECommunicatorConfig.load(path)
    assert (back.rdma_bytes, back.nic_model_gbps, back.nic_model_latency_us) == (
        9_000_000_000, 48.5, 1.25)
    assert moecomm.MoECommunicatorConfig.load(path, rdma_bytes=0).rdma_bytes == 0


def test_required_rdma_bytes():
    for mode in ("ht", "ll"):
        cfg = make_config(mode=mode)
        base = moecomm.required_rdma_bytes(cfg, 4, 2)
        assert base > 0
        assert moecomm.required_rdma_bytes(make_config(mode=mode, max_tokens_per_rank=256),
                                           4, 2) > base
        assert moecomm.required_rdma_bytes(make_config(mode=mode, hidden=512), 4, 2) > base
        # a dict serves too, and the config's own rdma_bytes plays no part
        assert moecomm.required_rdma_bytes(
            dict(num_experts=8, hidden=256, topk=2, max_tokens_per_rank=64, mode=mode,
                 rdma_bytes=1), 4, 2) == base
    with pytest.raises(moecomm.InvalidArgument, match="num_nodes: expected a divisor"):
        moecomm.required_rdma_bytes(make_config(), 4, 3)


def test_virtual_group_nodes_checked_before_the_device():
    # The node layout and the window are host-side checks: they raise with or without a GPU.
    cfg = make_config()
    with pytest.raises(moecomm.InvalidArgument, match="num_nodes: expected a divisor"):
        moecomm.virtual_group(4, cfg, nodes=3)
    need = moecomm.required_rdma_bytes(cfg, 4, 2)
    with pytest.raises(moecomm.InvalidArgument, match=rf"Config\.rdma_bytes.*{need}"):
        moecomm.virtual_group(4, cfg, nodes=2)
    with pytest.raises(moecomm.InvalidArgument, match=rf"expected at least {need}"):
        moecomm.virtual_group(4, make_config(rdma_bytes=need - 1), nodes=2)
    if not HAS_GPU:
        with pytest.raises(moecomm.Unsupported, match="no CUDA device"):
            moecomm.virtual_group(4, make_config(rdma_bytes=need), nodes=2)


def test_process_group_communicator_has_host_id_override():
    import inspect

    params = inspect.signature(moecomm.process_group_communicator).parameters
    assert params["host_id"].default is None and params["host_id"].kind == params["host_id"].KEYWORD_ONLY


# --- no device --------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_GPU, reason="a CUDA device is present")
def test_virtual_group_without_gpu():
    with pytest.raises(moecomm.Unsupported, match="no CUDA device is visible"):
        moecomm.virtual_group(2, make_config())


@pytest.mark.skipif(HAS_GPU, reason="a CUDA device is present")
def test_process_group_builder_without_gpu():
    with pytest.raises(moecomm.Unsupported, match="no CUDA device is visible"):
        _C.ProcessGroupBuilder(make_config()._to_cpp(), 0, 2, 0)
    with pytest.raises(moecomm.Unsupported):
        moecomm.device_sm_count(0)


def test_process_group_builder_checks_rank_first():
    with pytest.raises(moecomm.InvalidArgument, match="rank: expected 0..1, got 5"):
        _C.ProcessGroupBuilder(make_config()._to_cpp(), 5, 2, 0)


def test_process_group_handle_size():
    # A 2048-byte config digest (version, rank, size, every Config field), then the CUDA IPC
    # handle: the same on every rank, so that any launcher can gather fixed-size handles.
    # Between them: a 256-byte host-id block (the rank's node), a 256-byte machine id (the engine
    # choice: one machine or several) and a 128-byte NCCL unique id (rank 0, for the GIN engine).
    assert _C.ProcessGroupBuilder.handle_size() == 2048 + 256 + 256 + 128 + 64


# --- DLPack plumbing (host arrays through the extension and back) ------------------------------
@pytest.mark.parametrize("dtype,name", [(np.float32, "f32"), (np.int32, "i32"), (np.int64, "i64"),
                                        (np.uint8, "u8"), (np.uint16, "bf16"), (np.int16, "bf16")])
def test_dlpack_dtypes(dtype, name):
    a = np.arange(24).astype(dtype).reshape(4, 6)
    d = _C._roundtrip(a)
    assert d["dtype"] == name
    assert d["describe"] == f"[4, 6] {name} on host"
    if name != "bf16":
        np.testing.assert_array_equal(np.from_dlpack(d["array"]), a)


def test_dlpack_x_bytes_are_fp8_and_bf16_bits():
    a = np.zeros((2, 128), np.uint8)
    assert _C._roundtrip(a, as_x=True)["dtype"] == "fp8_e4m3"
    bits = np.arange(8, dtype=np.uint16).reshape(2, 4)
    back = np.from_dlpack(_C._roundtrip(bits, bf16_as_u16=True)["array"])
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, bits)


def test_dlpack_strides_and_ownership():
    a = np.arange(48, dtype=np.float32).reshape(6, 8)[::2, 1::3]
    d = _C._roundtrip(a)
    assert d["describe"] == "[3, 3] f32 on host"
    view = np.from_dlpack(d["array"])
    np.testing.assert_array_equal(view, a)
    before = sys.getrefcount(a)
    del d
    # The returned view keeps its owner (here the input array) alive.
    assert sys.getrefcount(a) == before
    del view
    assert sys.getrefcount(a) < before


class _CopyingProducer:
    """A DLPack producer whose export owns its memory (a fresh copy per ``__dlpack__``), as DLPack
    allows: the exported memory lives exactly as long as the export, not as the producer."""

    def __init__(self, a):
        self.a = a
        self.exports = []  # weak references to the copies handed out

    def __dlpack__(self, **kwargs):
        import weakref

        copy = self.a.copy()
        self.exports.append(weakref.ref(copy))
        return copy.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_dlpack_view_owns_the_export_not_just_the_producer():
    import gc

    a = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)
    producer = _CopyingProducer(a)
    d = _C._roundtrip(producer)
    gc.collect()
    [export] = producer.exports
    # The returned view must hold the export (the copy); holding the producer is not enough.
    assert export() is not None
    view = np.from_dlpack(d["array"])
    del d
    gc.collect()
    assert export() is not None
    np.testing.assert_array_equal(view, a)
    del view
    gc.collect()
    assert export() is None  # and lets it go with the last view


def test_dlpack_errors_name_the_argument():
    with pytest.raises(moecomm.InvalidArgument, match=r"a: dtype float16 is not supported"):
        _C._roundtrip(np.zeros(4, np.float16))
    with pytest.raises(moecomm.InvalidArgument, match=r"a: expected an array that supports DLPack"):
        _C._roundtrip("not an array")
    with pytest.raises(moecomm.InvalidArgument, match=r"a: expected 1 to 4 dimensions, got 5"):
        _C._roundtrip(np.zeros((1, 1, 1, 1, 1), np.float32))


def test_framework_detection():
    assert _frameworks.of(np.zeros(1)).name == "dlpack"
    assert _frameworks.stream_ptr(5) == 5

    class S:
        cuda_stream = 7

    assert _frameworks.stream_ptr(S()) == 7
    with pytest.raises(moecomm.InvalidArgument, match="stream: expected an int"):
        _frameworks.stream_ptr("s")


# --- the deferred stream joins of virtual ranks -----------------------------------------------
class FakeEvent:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def stream_wait(self, stream):
        self.log.append(("wait", stream, self.name))

    def synchronize(self):
        self.log.append(("sync", self.name))


def test_joiner_rounds():
    log = []
    j = _Joiner(3)
    j.add(0, 11, FakeEvent(log, "r0c0"), None)
    j.add(0, 11, FakeEvent(log, "r0c1"), None)  # rank 0 ran ahead (threads)
    j.add(1, 11, FakeEvent(log, "r1c0"), None)
    assert log == [] and j.pending() == [2, 1, 0]
    j.add(2, None, FakeEvent(log, "r2c0"), None)
    # Only the first round is joined: rank 0's second call waits for the others'.
    assert log == [("wait", 11, "r0c0"), ("wait", 11, "r1c0"), ("sync", "r2c0")]
    assert j.pending() == [1, 0, 0]


def test_joiner_single_rank_is_immediate():
    log = []
    j = _Joiner(1)
    j.add(0, 3, FakeEvent(log, "a"), None)
    assert log == [("wait", 3, "a")]


def test_joiner_holds_references_until_joined():
    import weakref

    class Ref:
        pass

    j = _Joiner(2)
    r = Ref()
    w = weakref.ref(r)
    j.add(0, 1, FakeEvent([], "x"), (r,))
    del r
    assert w() is not None
    j.add(1, 1, FakeEvent([], "y"), None)
    assert w() is None


def test_autograd_module_needs_torch():
    if "torch" in sys.modules or _torch_installed():
        pytest.skip("torch is installed")
    with pytest.raises(ImportError):
        moecomm.autograd  # noqa: B018


def _torch_installed():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --- the Python layer over a fake backend (stream plans, joins, outputs, hooks, events) --------
# The fake mirrors the extension's signatures (keyword-only arguments as the package passes them).
class FakeHandle:
    def __init__(self, T):
        self.mode, self.num_tokens, self.num_recv_tokens, self.valid = "ht", T, T, True


class FakeHook:
    def __init__(self, log, rank):
        self.log, self.rank = log, rank

    def __call__(self, stream=0):
        self.log.append(("hook", self.rank, stream))


class FakeCppComm:
    def __init__(self, rank, num_ranks, log):
        self.rank, self.num_ranks, self.device, self.stream = rank, num_ranks, 0, 1000 + rank
        self.config = make_config()._to_cpp()
        self.log = log

    def dispatch(self, x, x_scales, topk_idx, topk_weights, *, quantize_fp8, worst_case,
                 previous_handle, stream, async_, return_recv_hook, bf16_as_u16):
        self.log.append(("dispatch", self.rank, stream, async_))
        raw = {k: None for k in ("recv_x_scales", "recv_topk_weights", "recv_src_token",
                                 "recv_rank_prefix", "num_recv_tokens_device", "recv_count",
                                 "recv_src_info", "recv_layout", "event")}
        raw.update(mode="ht", recv_x=_C._roundtrip(x, bf16_as_u16=True)["array"],
                   recv_topk_idx=_C._roundtrip(topk_idx)["array"],
                   num_recv_tokens_per_expert=_C._roundtrip(np.array([1, 2], np.int32))["array"],
                   num_recv_tokens=x.shape[0], num_recv_tokens_per_expert_host=[1, 2],
                   handle=previous_handle or FakeHandle(x.shape[0]),
                   hook=FakeHook(self.log, self.rank) if return_recv_hook else None)
        return raw

    def combine(self, y, handle, topk_weights, recv_topk_weights, bias, out, *, stream, async_,
                return_recv_hook, bf16_as_u16):
        self.log.append(("combine", self.rank, stream, async_))
        return dict(out=None if out is not None else _C._roundtrip(y, bf16_as_u16=True)["array"],
                    combined_topk_weights=None, event=None, hook=None)


class FakeEvent2:
    log = []

    def __init__(self, device):
        self.stream = None

    def record(self, stream):
        self.stream = stream

    def stream_wait(self, stream):
        FakeEvent2.log.append(("join", stream, self.stream))

    def synchronize(self):
        FakeEvent2.log.append(("host", self.stream))


class StreamFramework(_frameworks.Framework):
    """A framework with a current stream (77), like torch, over numpy arrays."""
    name, has_streams = "fake", True

    def current_stream(self, device):
        return 77


@pytest.fixture
def fake(monkeypatch):
    from moecomm.communicator import MoECommunicator, _GroupContext

    log = []
    FakeEvent2.log = log
    monkeypatch.setattr(_C, "CudaEvent", FakeEvent2)
    monkeypatch.setattr(_C, "stream_wait_stream",
                        lambda waiter, signaler, device: log.append(("fork", waiter, signaler)))

    def make(num_ranks, framework=None):
        if framework is not None:
            monkeypatch.setattr(_frameworks, "of", lambda x: framework)
        ctx = _GroupContext(None, num_ranks, [0])
        return [MoECommunicator(FakeCppComm(r, num_ranks, log), ctx, r) for r in range(num_ranks)]

    return make, log


def test_virtual_ranks_join_after_every_rank(fake):
    make, log = fake
    comms = make(2, StreamFramework())
    x = np.arange(8, dtype=np.uint16).reshape(2, 4)
    idx = np.zeros((2, 2), np.int64)
    out0, h0 = comms[0].dispatch(x, idx)
    # Rank 0 forked from the caller's stream and ran on its own; no join yet.
    assert log == [("fork", 1000, 77), ("dispatch", 0, 1000, False)]
    out1, h1 = comms[1].dispatch(x, idx)
    assert log[2:] == [("fork", 1001, 77), ("dispatch", 1, 1001, False),
                       ("join", 77, 1000), ("join", 77, 1001)]
    np.testing.assert_array_equal(np.from_dlpack(out0.recv_x), x)
    assert out0.num_recv_tokens_per_expert_host == [1, 2]
    assert out0.mode == "ht" and out0.handle is h0 and h0.num_tokens == 2
    assert repr(out0).startswith("DispatchOutput(recv_x")
    assert out0.recv_x_scales is None
    # combine with a caller-owned out returns that very object
    y = np.ones((2, 4), np.uint16)
    c = comms[0].combine(y, h0, out=y)
    assert c.out is y
    with pytest.raises(moecomm.InvalidArgument, match="made by another communicator"):
        comms[1].combine(y, h0)
    with pytest.raises(moecomm.InvalidArgument, match="expected a moecomm.Handle"):
        comms[1].dispatch(x, idx, previous_handle=object())


def test_single_local_rank_runs_on_the_callers_stream(fake):
    make, log = fake
    (comm,) = make(1, StreamFramework())
    comm.dispatch(np.zeros((1, 4), np.uint16), np.zeros((1, 2), np.int64))
    assert log == [("dispatch", 0, 77, False)]  # direct: no fork, no event, no join
    out, _ = comm.dispatch(np.zeros((1, 4), np.uint16), np.zeros((1, 2), np.int64), async_=True)
    assert log[-1] == ("dispatch", 0, 77, True)  # the library's own async mode


def test_explicit_stream_and_async(fake):
    make, log = fake
    comms = make(2, StreamFramework())
    x, idx = np.zeros((1, 4), np.uint16), np.zeros((1, 2), np.int64)
    comms[0].dispatch(x, idx, stream=5)
    assert log == [("dispatch", 0, 5, False)]
    log.clear()
    outs = [comms[r].dispatch(x, idx, async_=True) for r in range(2)]
    # async in a virtual group: own streams, an event each, no join of the caller's stream
    assert [e for e in log if e[0] == "join"] == []
    for out, _ in outs:
        assert out.event is not None
        out.event.current_stream_wait()
    assert [e for e in log if e[0] == "join"] == [("join", 77, 1000), ("join", 77, 1001)]


def test_hooks_join_like_calls(fake):
    make, log = fake
    comms = make(2, StreamFramework())
    x, idx = np.zeros((1, 4), np.uint16), np.zeros((1, 2), np.int64)
    outs = [comms[r].dispatch(x, idx, return_recv_hook=True) for r in range(2)]
    log.clear()
    outs[0][0].hook()
    outs[1][0].hook()
    assert log == [("hook", 0, 0), ("hook", 1, 0), ("join", 77, 1000), ("join", 77, 1001)]
    with pytest.raises(moecomm.InvalidArgument, match="already called"):
        outs[0][0].hook()


def test_streamless_framework_waits_on_the_host(fake):
    make, log = fake
    comms = make(2)  # numpy: no stream API
    x, idx = np.zeros((1, 4), np.uint16), np.zeros((1, 2), np.int64)
    comms[0].dispatch(x, idx)
    comms[1].dispatch(x, idx)
    assert log == [("dispatch", 0, 1000, False), ("dispatch", 1, 1001, False),
                   ("host", 1000), ("host", 1001)]


# --- the torch reference's fp8 rule (tests/python/torch_reference.py, used by test_gpu.py) -------
def test_reference_e4m3_rounding_and_saturation():
    """float_to_e4m3 is CUDA's SATFINITE e4m3 conversion: ties to even, +-448 for everything at or
    above 448 (infinity too), 0x7f for NaN. Codes worked out by hand: value = (8 + m) * 2^(e - 10)
    for code e*8 + m (e >= 1), m * 2^-9 for subnormals (e = 0)."""
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    cases = [  # (value, code); a list, not a dict: 0.0 == -0.0
        (0.0, 0x00), (-0.0, 0x80), (2.0 ** -9, 0x01), (2.0 ** -10, 0x00), (3 * 2.0 ** -10, 0x02),
        (7 * 2.0 ** -9, 0x07), (7.5 * 2.0 ** -9, 0x08), (2.0 ** -6, 0x08), (1.0, 0x38),
        (1.0625, 0x38), (1.1875, 0x3A), (1.9375, 0x40), (-1.125, 0xB9), (240.0, 0x77),
        (440.0, 0x7E), (448.0, 0x7E), (464.0, 0x7E), (465.0, 0x7E), (1e30, 0x7E), (-500.0, 0xFE),
        (float("inf"), 0x7E), (float("-inf"), 0xFE), (float("nan"), 0x7F), (-float("nan"), 0x7F),
        (1e-40, 0x00),
    ]
    v = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    got = ref.float_to_e4m3(v)
    assert got.dtype == torch.float8_e4m3fn
    assert got.view(torch.uint8).tolist() == [c[1] for c in cases]
    # Where torch's own cast is defined the same way (finite, |v| < 464) the two agree.
    g = torch.Generator().manual_seed(0)
    exp = torch.randint(-14, 9, (1 << 16,), generator=g).float()
    r = torch.randn(1 << 16, generator=g) * torch.exp2(exp)
    r = r[r.abs() < 464]
    assert torch.equal(ref.float_to_e4m3(r).view(torch.uint8),
                       r.to(torch.float8_e4m3fn).view(torch.uint8))


def test_reference_quantize_fp8_divides_once():
    """inv = 448 / a is one correctly rounded f32 division (torch's `448.0 / a` is
    a.reciprocal() * 448, two roundings), and q = e4m3(x * inv)."""
    torch = pytest.importorskip("torch")
    import torch_reference as ref

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 256, generator=g) * 3).bfloat16()
    x[0, :128] = 0  # an all-zero group: the amax floor
    q, scale = ref.quantize_fp8(x)
    xf = x.float().view(64, 2, 128)
    a = xf.abs().amax(dim=-1).clamp(min=1e-4)
    a64 = a.double()
    assert torch.equal(scale, (a64 / 448).float())  # f32 division == the double quotient rounded
    inv = (448 / a64).float()
    want = ref.float_to_e4m3(xf * inv[..., None]).view(64, 256)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert scale[0, 0].item() == pytest.approx(1e-4 / 448)
