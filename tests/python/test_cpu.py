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
