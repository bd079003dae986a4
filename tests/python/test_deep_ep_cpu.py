"""CPU tests of moecomm.deep_ep (no GPU, no torch needed): DeepEP V1's names, argument names and
defaults, the install switch, Config and the size hints, EventOverlap, the arguments a Buffer
refuses before touching a tensor, and shrink mode's mask bookkeeping (over a fake backend)."""

import dataclasses
import inspect
import subprocess
import sys

import pytest

import moecomm
import moecomm.deep_ep as deep_ep
from moecomm.deep_ep import Buffer, Config, EventOverlap
from moecomm.deep_ep._backends import config_key

_ = inspect.Parameter.empty
# DeepEP V1's public signatures (deep_ep/buffer.py), parameter by parameter with defaults.
DEEP_EP_SIGNATURES = {
    "__init__": [("group", _), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0),
                 ("low_latency_mode", False), ("num_qps_per_rank", 24),
                 ("allow_nvlink_for_low_latency_mode", True), ("allow_mnnvl", False),
                 ("use_fabric", False), ("explicitly_destroy", False), ("enable_shrink", False),
                 ("comm", None)],
    "get_dispatch_layout": [("topk_idx", _), ("num_experts", _), ("previous_event", None),
                            ("async_finish", False), ("allocate_on_comm_stream", False)],
    "dispatch": [("x", _), ("handle", None), ("num_tokens_per_rank", None),
                 ("num_tokens_per_rdma_rank", None), ("is_token_in_rank", None),
                 ("num_tokens_per_expert", None), ("topk_idx", None), ("topk_weights", None),
                 ("expert_alignment", 1), ("num_worst_tokens", 0), ("config", None),
                 ("previous_event", None), ("async_finish", False),
                 ("allocate_on_comm_stream", False)],
    "combine": [("x", _), ("handle", _), ("topk_weights", None), ("bias", None),
                ("config", None), ("previous_event", None), ("async_finish", False),
                ("allocate_on_comm_stream", False)],
    "low_latency_dispatch": [("x", _), ("topk_idx", _), ("num_max_dispatch_tokens_per_rank", _),
                             ("num_experts", _), ("cumulative_local_expert_recv_stats", None),
                             ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True),
                             ("round_scale", False), ("use_ue8m0", False),
                             ("async_finish", False), ("return_recv_hook", False)],
    "low_latency_combine": [("x", _), ("topk_idx", _), ("topk_weights", _), ("handle", _),
                            ("use_logfmt", False), ("zero_copy", False), ("async_finish", False),
                            ("return_recv_hook", False), ("out", None),
                            ("combine_wait_recv_cost_stats", None)],
    "clean_low_latency_buffer": [("num_max_dispatch_tokens_per_rank", _), ("hidden", _),
                                 ("num_experts", _)],
    "get_next_low_latency_combine_buffer": [("handle", _)],
    "low_latency_update_mask_buffer": [("rank_to_mask", _), ("mask", False)],
    "low_latency_query_mask_buffer": [("mask_status", _)],
    "low_latency_clean_mask_buffer": [],
    "get_local_buffer_tensor": [("dtype", _), ("size", None), ("offset", 0),
                                ("use_rdma_buffer", False)],
    "destroy": [],
    "get_comm_stream": [],
}
DEEP_EP_STATIC = {
    "get_low_latency_rdma_size_hint": [("num_max_dispatch_tokens_per_rank", _), ("hidden", _),
                                       ("num_ranks", _), ("num_experts", _)],
    "get_dispatch_config": [("num_ranks", _)],
    "get_combine_config": [("num_ranks", _)],
    "set_num_sms": [("new_num_sms", _)],
    "capture": [],
    "is_sm90_compiled": [],
}


def _params(fn, skip_self):
    ps = list(inspect.signature(fn).parameters.values())
    if skip_self:
        ps = ps[1:]
    # moecomm's own additions are keyword-only, after DeepEP's parameters.
    return [(p.name, p.default) for p in ps if p.kind is not inspect.Parameter.KEYWORD_ONLY]


@pytest.mark.parametrize("name", sorted(DEEP_EP_SIGNATURES))
def test_method_signatures_match_deep_ep(name):
    assert _params(getattr(Buffer, name), skip_self=True) == DEEP_EP_SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(DEEP_EP_STATIC))
def test_static_signatures_match_deep_ep(name):
    assert isinstance(inspect.getattr_static(Buffer, name), staticmethod)
    assert _params(getattr(Buffer, name), skip_self=False) == DEEP_EP_STATIC[name]


def test_extensions_are_keyword_only():
    ps = inspect.signature(Buffer.__init__).parameters
    for name in ("max_tokens_per_rank", "timeout_seconds"):
        assert ps[name].kind is inspect.Parameter.KEYWORD_ONLY and ps[name].default is None


def test_class_attributes():
    assert Buffer.num_sms == 20
    assert deep_ep.utils.EventOverlap is EventOverlap
    assert callable(deep_ep.EventHandle)


def test_import_does_not_need_torch():
    code = ("import sys, moecomm; moecomm.deep_ep.Buffer; import moecomm.deep_ep; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the install switch -----------------------------------------------------------------------
@pytest.fixture
def clean_modules():
    saved = {k: sys.modules.get(k) for k in ("deep_ep", "deep_ep.utils", "deep_ep.buffer")}
    for k in saved:
        sys.modules.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def test_install_serves_import_deep_ep(clean_modules):
    assert not deep_ep.installed()
    assert deep_ep.install() is deep_ep
    assert deep_ep.installed()
    import deep_ep as de
    from deep_ep import Buffer as B, Config as C, EventOverlap as EO
    from deep_ep.utils import EventHandle, EventOverlap as EO2

    assert de is deep_ep and B is Buffer and C is Config and EO is EO2 is EventOverlap
    assert EventHandle is deep_ep.EventHandle
    assert deep_ep.install() is deep_ep  # idempotent
    deep_ep.uninstall()
    assert "deep_ep" not in sys.modules and "deep_ep.utils" not in sys.modules


def test_install_sets_buffer_defaults(clean_modules):
    saved = (Buffer.default_max_tokens_per_rank, Buffer.default_timeout_seconds)
    try:
        deep_ep.install(max_tokens_per_rank=4096, timeout_seconds=30)
        b, backend = make_buffer()
        assert b._max_tokens == 4096 and b._timeout == 30.0
        assert b._ht_capacity(100) == 4096 and backend.agreements == []
        b, _ = make_buffer(max_tokens_per_rank=64, timeout_seconds=5.0)  # explicit wins
        assert b._max_tokens == 64 and b._timeout == 5.0
        with pytest.raises(moecomm.InvalidArgument, match="^max_tokens_per_rank"):
            deep_ep.install(max_tokens_per_rank=0)
    finally:
        Buffer.default_max_tokens_per_rank, Buffer.default_timeout_seconds = saved
    b, _ = make_buffer()
    assert b._max_tokens is None and b._timeout == 10.0


def test_install_keeps_a_real_deep_ep_unless_forced(clean_modules):
    import types

    other = types.ModuleType("deep_ep")
    sys.modules["deep_ep"] = other
    with pytest.raises(moecomm.InvalidArgument, match="already imported"):
        deep_ep.install()
    assert sys.modules["deep_ep"] is other
    deep_ep.uninstall()  # not ours: left alone
    assert sys.modules["deep_ep"] is other
    deep_ep.install(force=True)
    assert sys.modules["deep_ep"] is deep_ep


# --- Config and hints -------------------------------------------------------------------------
def test_config_defaults_and_checks():
    c = Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens) == (20, 6, 256, 6)
    assert c.num_max_rdma_chunked_recv_tokens == 258  # rounded up to a multiple of the send chunk
    c = Config(24, 8, 288, 16, 128)
    assert c.num_max_rdma_chunked_recv_tokens == 128
    c = Config(num_sms=10, num_max_nvl_chunked_send_tokens=4)  # keywords, as from a JSON file
    assert c.num_sms == 10 and c.num_max_nvl_chunked_send_tokens == 4
    with pytest.raises(moecomm.InvalidArgument, match="^Config.num_max_nvl_chunked_send_tokens"):
        Config(20, 256, 256)
    with pytest.raises(moecomm.InvalidArgument, match="^Config.num_max_rdma_chunked_send_tokens"):
        Config(20, 6, 256, 100, 100)
    with pytest.raises(moecomm.InvalidArgument, match="^Config.num_sms"):
        Config(-2)
    with pytest.raises(moecomm.InvalidArgument, match="^Config.num_sms: expected an integer"):
        Config(2.5)


def test_buffer_size_hints():
    c = Config()
    small, big = c.get_nvl_buffer_size_hint(256, 8), c.get_nvl_buffer_size_hint(14336, 8)
    assert 0 < small < big and small % 128 == 0 and big % 128 == 0
    assert c.get_rdma_buffer_size_hint(14336, 8) == 0  # one NVLink domain
    assert c.get_rdma_buffer_size_hint(14336, 16) > 0
    with pytest.raises(moecomm.InvalidArgument, match="get_nvl_buffer_size_hint"):
        c.get_nvl_buffer_size_hint(0, 8)
    hint = Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert hint % (128 << 20) == 0
    # at least moecomm's two LL buffers of bf16 dispatch and combine slots
    assert hint >= 2 * 256 * 128 * 7168 * 2 * 2
    assert Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 256) > hint
    with pytest.raises(moecomm.InvalidArgument, match="^num_experts: expected a multiple"):
        Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 100)


def test_recommended_configs_and_num_sms():
    saved = Buffer.num_sms
    try:
        for n in (2, 4, 8, 16, 3):
            assert isinstance(Buffer.get_dispatch_config(n), Config)
            assert Buffer.get_combine_config(n).num_sms == saved
        Buffer.set_num_sms(24)
        assert Buffer.num_sms == 24 and Buffer.get_dispatch_config(8).num_sms == 24
        with pytest.raises(moecomm.InvalidArgument, match="must be even"):
            Buffer.set_num_sms(23)
        with pytest.raises(moecomm.InvalidArgument, match="^num_ranks"):
            Buffer.get_dispatch_config(0)
    finally:
        Buffer.num_sms = saved
    assert Buffer.is_sm90_compiled() is True


# --- EventOverlap -----------------------------------------------------------------------------
class FakeEvent:
    def __init__(self):
        self.waits = 0

    def current_stream_wait(self):
        self.waits += 1


def test_event_overlap():
    e = EventOverlap()
    assert e.event is None and e.extra_tensors is None
    with e as inside:  # nothing to wait for
        assert inside is e
    with pytest.raises(moecomm.InvalidArgument, match="holds no event"):
        e.current_stream_wait()
    ev = FakeEvent()
    e = EventOverlap(ev, extra_tensors=("kept",))
    with e:
        assert ev.waits == 0
    assert ev.waits == 1 and e.extra_tensors is None
    e = EventOverlap(ev, ("kept",))
    e.current_stream_wait()
    assert ev.waits == 2 and e.extra_tensors is None


# --- Buffer refusals over a fake backend --------------------------------------------------------
class FakeComm:
    """A communicator's rank masks as moecomm keeps them: explicit ones (mask_rank) and ones a
    time-out set (``timed_out``, as under Config.mask_unresponsive_ranks); unmasking a rank
    clears both. ``calls`` records every mask call."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.explicit, self.timed_out, self.calls = set(), set(), []

    def mask_rank(self, rank, masked=True):
        self.calls.append((rank, masked))
        if masked:
            self.explicit.add(rank)
        else:
            self.explicit.discard(rank)
            self.timed_out.discard(rank)

    def masked_ranks(self):
        return sorted(self.explicit | self.timed_out)

    def clear_rank_masks(self):
        self.calls.append("clear")
        self.explicit.clear()
        self.timed_out.clear()


class FakeBackend:
    virtual = False

    def __init__(self, rank=0, num_ranks=2, num_nodes=1, peer_tokens=0):
        self.rank, self.num_ranks, self.device, self.num_nodes = rank, num_ranks, 0, num_nodes
        self.peer_tokens = peer_tokens
        self.made, self.forgotten, self.agreements, self.released = [], [], [], False
        self.comms = {}

    def communicator(self, cfg):
        """One communicator per config, as the real backends cache them."""
        self.made.append(cfg)
        key = config_key(cfg)
        if key not in self.comms:
            self.comms[key] = FakeComm(cfg)
        return self.comms[key]

    def forget(self, cfg):
        self.forgotten.append(cfg)

    def agree_max(self, value):
        self.agreements.append(value)
        return max(value, self.peer_tokens)

    def release(self):
        self.released = True


def make_buffer(**kw):
    backend = kw.pop("backend", None) or FakeBackend()
    return Buffer._on_backend(backend, **kw), backend


def test_constructor_refusals():
    with pytest.raises(moecomm.InvalidArgument, match="either 'group' or 'comm'"):
        Buffer(None)
    with pytest.raises(ValueError):  # DeepEP raises ValueError; InvalidArgument is one
        Buffer(group=None)
    with pytest.raises(TypeError):  # group has no default, as in DeepEP
        Buffer()
    with pytest.raises(moecomm.Unsupported, match="^comm: moecomm bootstraps over torch"):
        Buffer(None, comm=object())
    with pytest.raises(moecomm.InvalidArgument, match="^num_nvl_bytes: expected an integer >= 0"):
        Buffer(object(), num_nvl_bytes=-1)
    with pytest.raises(moecomm.InvalidArgument, match="^max_tokens_per_rank"):
        Buffer(object(), max_tokens_per_rank=0)
    with pytest.raises(moecomm.InvalidArgument, match="^num_rdma_bytes: the group spans 2 nodes"):
        make_buffer(backend=FakeBackend(num_nodes=2))


def test_attributes_and_accessors():
    b, _ = make_buffer(num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 21, low_latency_mode=True)
    assert (b.rank, b.group_size, b.num_nvl_bytes, b.num_rdma_bytes) == (0, 2, 1 << 20, 1 << 21)
    assert b.low_latency_mode and not b.explicitly_destroy and not b.enable_shrink
    assert b.is_available() and not b.is_internode_available()
    assert b.get_num_rdma_ranks() == 1 and b.get_rdma_rank() == 0 and b.get_local_device_id() == 0
    assert "Buffer(rank=0" in repr(b)
    s, _ = make_buffer(low_latency_mode=True, enable_shrink=True)
    assert s.enable_shrink


def test_internode_buffer_maps_nodes_and_sizes_the_window():
    b, backend = make_buffer(backend=FakeBackend(rank=5, num_ranks=8, num_nodes=2),
                             num_rdma_bytes=1 << 30)
    assert b.is_internode_available() and b.get_num_rdma_ranks() == 2
    assert b.get_rdma_rank() == 1 and b.get_root_rdma_rank(True) == 1
    assert b.get_root_rdma_rank(False) == 0
    for mode in ("ht", "ll"):
        cfg = b._cfg(mode, 64, 256, 4, 128)
        assert cfg.rdma_bytes == moecomm.required_rdma_bytes(
            dataclasses.replace(cfg, rdma_bytes=0), 8, 2) > 0
    one, _ = make_buffer(num_rdma_bytes=1 << 30)
    assert one._cfg("ll", 64, 256, 4, 128).rdma_bytes == 0  # one node: no window


def test_refused_features_name_what_is_missing():
    b, _ = make_buffer(low_latency_mode=True)
    with pytest.raises(moecomm.Unsupported, match="^get_local_buffer_tensor"):
        b.get_local_buffer_tensor(None)
    with pytest.raises(moecomm.Unsupported, match="^dispatch_wait_recv_cost_stats"):
        b.low_latency_dispatch(None, None, 128, 16, dispatch_wait_recv_cost_stats=object())
    with pytest.raises(moecomm.Unsupported, match="^combine_wait_recv_cost_stats"):
        b.low_latency_combine(None, None, None, None, combine_wait_recv_cost_stats=object())


def test_argument_refusals():
    b, _ = make_buffer()
    with pytest.raises(moecomm.InvalidArgument, match="low_latency_mode=False"):
        b.low_latency_dispatch(None, None, 128, 16)
    with pytest.raises(moecomm.InvalidArgument, match="low_latency_mode=False"):
        b.low_latency_combine(None, None, None, None)
    ll, _ = make_buffer(low_latency_mode=True)
    with pytest.raises(moecomm.InvalidArgument, match="^async_finish, return_recv_hook"):
        ll.low_latency_dispatch(None, None, 128, 16, async_finish=True, return_recv_hook=True)
    with pytest.raises(moecomm.InvalidArgument, match="^use_ue8m0: UE8M0 scales need round_scale"):
        ll.low_latency_dispatch(None, None, 128, 16, use_ue8m0=True)
    with pytest.raises(moecomm.InvalidArgument, match="^handle: expected the LowLatencyHandle"):
        ll.low_latency_combine(None, None, None, ("a", "tuple"))
    with pytest.raises(moecomm.InvalidArgument, match="^handle: expected the LowLatencyHandle"):
        ll.get_next_low_latency_combine_buffer(None)
    with pytest.raises(moecomm.InvalidArgument, match="^allocate_on_comm_stream: needs"):
        b.dispatch(None, allocate_on_comm_stream=True)
    with pytest.raises(moecomm.InvalidArgument, match="^allocate_on_comm_stream: needs"):
        b.get_dispatch_layout(None, 16, allocate_on_comm_stream=True, async_finish=True)
    with pytest.raises(moecomm.InvalidArgument, match="^config: expected a moecomm.deep_ep.Config"):
        b.dispatch(None, config={"num_sms": 20})
    with pytest.raises(moecomm.InvalidArgument, match="^expert_alignment: expected an integer >= 1"):
        b.dispatch(None, expert_alignment=0)
    with pytest.raises(moecomm.InvalidArgument, match="^num_worst_tokens: expected an integer >= 0"):
        b.dispatch(None, num_worst_tokens=-1)
    with pytest.raises(moecomm.InvalidArgument, match="^handle: expected the DispatchHandle"):
        b.dispatch(None, handle=("a", "tuple"))
    with pytest.raises(moecomm.InvalidArgument, match="^handle: expected the DispatchHandle"):
        b.combine(None, None)
    mine = deep_ep.DispatchHandle(b, None, None, None, 4, 4, False, 16, 128, 2)
    with pytest.raises(moecomm.InvalidArgument, match="^topk_idx, topk_weights: expected None"):
        b.dispatch(None, handle=mine, topk_idx=object())
    other, _ = make_buffer()
    with pytest.raises(moecomm.InvalidArgument, match="of another Buffer"):
        other.dispatch(None, handle=mine)
    with pytest.raises(moecomm.InvalidArgument, match="^num_experts: expected a multiple"):
        b.clean_low_latency_buffer(128, 7168, 15)
    b.clean_low_latency_buffer(128, 7168, 16)  # nothing to clean in moecomm


def test_destroy():
    b, backend = make_buffer()
    with pytest.raises(moecomm.InvalidArgument, match="explicitly_destroy=False"):
        b.destroy()
    b, backend = make_buffer(explicitly_destroy=True)
    b.destroy()
    assert backend.released and not b.is_available()
    with pytest.raises(moecomm.InvalidArgument, match="^dispatch: the Buffer was destroyed"):
        b.dispatch(None)
    with pytest.raises(moecomm.InvalidArgument, match="^destroy: the Buffer was destroyed"):
        b.destroy()


def test_communicator_configs_follow_the_calls():
    saved = Buffer.num_sms
    try:
        b, _ = make_buffer(timeout_seconds=3.0)
        cfg = b._cfg("ht", 16, 7168, 8, 256, max_recv_tokens=1024)
        assert (cfg.num_experts, cfg.hidden, cfg.topk, cfg.max_tokens_per_rank) == (16, 7168, 8, 256)
        assert cfg.mode == "ht" and cfg.max_recv_tokens == 1024 and cfg.low_latency_max_tokens == 0
        assert cfg.num_sms == 20 and cfg.timeout_seconds == 3.0 and cfg.enable_fp8
        Buffer.set_num_sms(12)
        cfg = b._cfg("ll", 16, 2056, 8, 128, pow2=True)
        assert cfg.mode == "ll" and cfg.low_latency_max_tokens == 128 and cfg.num_sms == 12
        assert cfg.scale_format == "pow2" and not cfg.enable_fp8  # 2056 is no multiple of 128
        v, _ = make_buffer(num_sms=6)  # virtual ranks fix their SMs
        assert v._cfg("ht", 16, 256, 2, 64).num_sms == 6
    finally:
        Buffer.num_sms = saved


def test_ht_capacity_grows_by_agreement():
    b, backend = make_buffer(backend=FakeBackend(peer_tokens=300))
    assert b._ht_capacity(10) == 512  # the peer's 300, rounded up to a power of two
    assert backend.agreements == [10]
    b._ht_cap_cfgs = ["old"]
    backend.peer_tokens = 0
    assert b._ht_capacity(100) == 512  # no growth
    assert b._ht_capacity(513) == 1024 and backend.forgotten == ["old"]
    b, backend = make_buffer(backend=FakeBackend(peer_tokens=3))
    assert b._ht_capacity(5) == 128  # at least 128
    fixed, backend = make_buffer(max_tokens_per_rank=64)
    assert fixed._ht_capacity(64) == 64 and backend.agreements == []
    with pytest.raises(moecomm.InvalidArgument, match="^x: 65 tokens, expected at most "
                                                      "max_tokens_per_rank = 64"):
        fixed._ht_capacity(65)


def test_virtual_buffers_need_a_gpu():
    if moecomm.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    pytest.importorskip("torch")
    with pytest.raises(moecomm.Error):
        deep_ep.virtual_buffers(2)


# --- shrink mode (masked ranks) -----------------------------------------------------------------
def test_mask_buffer_needs_shrink_mode():
    """Without enable_shrink DeepEP asserts (a RuntimeError); moecomm raises InvalidArgument,
    which is one too."""
    b, backend = make_buffer(low_latency_mode=True)
    for what, call in (("low_latency_update_mask_buffer",
                        lambda: b.low_latency_update_mask_buffer(1, True)),
                       ("low_latency_query_mask_buffer",
                        lambda: b.low_latency_query_mask_buffer(None)),
                       ("low_latency_clean_mask_buffer", b.low_latency_clean_mask_buffer)):
        with pytest.raises(moecomm.InvalidArgument, match=f"^{what}: .*enable_shrink=False"):
            call()
        with pytest.raises(RuntimeError):
            call()
    comm = backend.communicator(b._cfg("ll", 16, 256, 2, 64))
    b._masks_for(comm)  # not in shrink mode: communicators are left alone
    assert comm.calls == []


def test_shrink_mode_communicator_configs():
    b, _ = make_buffer(low_latency_mode=True, enable_shrink=True)
    assert b._cfg("ll", 16, 256, 2, 64).mask_unresponsive_ranks  # a silent peer gets masked
    assert not b._cfg("ht", 16, 256, 2, 64).mask_unresponsive_ranks  # HT never masks
    plain, _ = make_buffer(low_latency_mode=True)
    assert not plain._cfg("ll", 16, 256, 2, 64).mask_unresponsive_ranks


def test_masks_reach_every_low_latency_communicator():
    b, backend = make_buffer(backend=FakeBackend(rank=1, num_ranks=4), low_latency_mode=True,
                             enable_shrink=True)
    assert b._mask_status() == [0, 0, 0, 0]
    b.low_latency_update_mask_buffer(2, True)
    b.low_latency_update_mask_buffer(2, True)  # idempotent
    assert b._mask_status() == [0, 0, 1, 0]
    a = backend.communicator(b._cfg("ll", 16, 256, 2, 64))
    b._masks_for(a)  # a first call of a shape: the current masks are applied first
    assert a.calls == [(2, True)] and a.masked_ranks() == [2]
    b._masks_for(a)  # nothing changed: no mask call
    assert a.calls == [(2, True)]

    # An update reaches a communicator at its next call; a new one gets the whole set.
    b.low_latency_update_mask_buffer(1, mask=True)  # the rank itself, as DeepEP allows
    assert a.calls == [(2, True)] and b._mask_status() == [0, 1, 1, 0]
    c = backend.communicator(b._cfg("ll", 16, 256, 2, 32, pow2=True))
    b._masks_for(c)
    assert c.calls == [(1, True), (2, True)]
    b._masks_for(a)
    assert a.calls == [(2, True), (1, True)] and a.masked_ranks() == [1, 2]
    b.low_latency_update_mask_buffer(2)  # mask=False: unmask
    assert b._mask_status() == [0, 1, 0, 0]
    b._masks_for(a)
    assert a.calls[-1] == (2, False) and a.masked_ranks() == [1]

    # A time-out mask of one communicator is reported and spreads to the others.
    a.timed_out.add(3)
    assert b._mask_status() == [0, 1, 0, 1]
    b._masks_for(c)
    assert c.masked_ranks() == [1, 3] and c.calls[-2:] == [(2, False), (3, True)]
    b._masks_for(a)
    assert a.masked_ranks() == [1, 3]
    # Unmasking it lifts the time-out mask too, at each communicator's next call.
    b.low_latency_update_mask_buffer(3, False)
    assert b._mask_status() == [0, 1, 0, 0]  # not re-read from `a`'s time-out flag
    b._masks_for(a)
    assert a.masked_ranks() == [1] and a.calls[-1] == (3, False) and not a.timed_out
    b._masks_for(c)
    assert c.masked_ranks() == [1]
    # A time-out mask unmasked before any call saw it: gone from the status at once.
    c.timed_out.add(2)
    b.low_latency_update_mask_buffer(2, False)
    assert b._mask_status() == [0, 1, 0, 0]
    b._masks_for(a)
    assert a.masked_ranks() == [1]
    b._masks_for(c)
    assert c.masked_ranks() == [1] and c.calls[-1] == (2, False)

    # clean: every mask goes, time-out ones included.
    c.timed_out.add(0)
    b.low_latency_clean_mask_buffer()
    assert b._mask_status() == [0, 0, 0, 0]
    b._masks_for(a)
    b._masks_for(c)
    assert a.masked_ranks() == [] and c.masked_ranks() == []
    assert b._mask_status() == [0, 0, 0, 0]
    c.timed_out.add(0)  # a later time-out counts again
    assert b._mask_status() == [1, 0, 0, 0]

    with pytest.raises(moecomm.InvalidArgument, match=r"^rank_to_mask: expected 0\.\.3, got 4"):
        b.low_latency_update_mask_buffer(4, True)
    with pytest.raises(moecomm.InvalidArgument, match="^rank_to_mask: expected an integer >= 0"):
        b.low_latency_update_mask_buffer(-1, True)


def test_mask_buffer_after_destroy():
    b, backend = make_buffer(low_latency_mode=True, enable_shrink=True, explicitly_destroy=True)
    b._masks_for(backend.communicator(b._cfg("ll", 16, 256, 2, 64)))
    b.destroy()
    assert b._mask_comms == {}
    with pytest.raises(moecomm.InvalidArgument, match="^low_latency_clean_mask_buffer: the Buffer "
                                                      "was destroyed"):
        b.low_latency_clean_mask_buffer()


def test_query_mask_buffer_fills_a_tensor():
    torch = pytest.importorskip("torch")
    b, backend = make_buffer(backend=FakeBackend(num_ranks=4), low_latency_mode=True,
                             enable_shrink=True)
    status = torch.full((4,), 7, dtype=torch.int32)
    b.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 0, 0]
    b.low_latency_update_mask_buffer(3, True)
    a = backend.communicator(b._cfg("ll", 16, 256, 2, 64))
    b._masks_for(a)
    a.timed_out.add(1)
    b.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 1, 0, 1]
    wide = torch.zeros(1, 4, dtype=torch.int32)  # DeepEP checks the element count only
    b.low_latency_query_mask_buffer(wide)
    assert wide.tolist() == [[0, 1, 0, 1]]
    with pytest.raises(moecomm.InvalidArgument, match="^mask_status: expected a torch.int32"):
        b.low_latency_query_mask_buffer(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(moecomm.InvalidArgument, match="^mask_status: expected a torch.int32"):
        b.low_latency_query_mask_buffer(torch.zeros(3, dtype=torch.int32))
