"""The stand-in's device mapping, torch.npu, the torch_npu module itself and torch.ops.npu
(fascore.compat; docs/torch_npu.md)."""
from __future__ import annotations

import importlib.util
import io
import sys
import types
import unittest
import warnings

import numpy as np
import pytest
import torch

import fascore
from fascore import compat
from fascore.compat import npu_ops

# torch_npu's schemas, as op-plugin's op_plugin_functions.yaml declares them
TORCH_NPU_SCHEMAS = {
    "npu_fusion_attention": "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, str softmax_layout=\"\", Tensor? sink=None, Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)",  # noqa: E501
    "npu_fusion_attention_v2": "npu_fusion_attention_v2(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? query_rope=None, Tensor? key_rope=None, float scale=1., float keep_prob=1., int pre_tokens=2147483647, int next_tokens=2147483647, int inner_precise=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, int pse_type=1, int[]? q_start_idx=None, int[]? kv_start_idx=None, str softmax_layout=\"\", Tensor? sink=None, Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)",  # noqa: E501
    "npu_fusion_attention_v3": "npu_fusion_attention_v3(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, SymInt[]? prefix=None, Tensor? actual_seq_qlen=None, Tensor? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, str softmax_layout=\"\", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",  # noqa: E501
    "npu_fusion_attention_grad": "npu_fusion_attention_grad(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? softmax_max=None, Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None, float scale_value=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int seed=0, int offset=0, int numels=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, str softmax_layout=\"\", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",  # noqa: E501
    "npu_fusion_attention_grad_v2": "npu_fusion_attention_grad_v2(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? softmax_max=None, Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None, Tensor? query_rope=None, Tensor? key_rope=None, float scale_value=1., float keep_prob=1., int pre_tokens=2147483647, int next_tokens=2147483647, int inner_precise=0, int seed=0, int offset=0, int numels=0, int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, int pse_type=1, int[]? q_start_idx=None, int[]? kv_start_idx=None, str softmax_layout=\"\", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",  # noqa: E501
    "npu_fusion_attention_grad_v3": "npu_fusion_attention_grad_v3(Tensor query, Tensor key, Tensor value, Tensor dy, int head_num, str input_layout, *, Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, Tensor? softmax_max=None, Tensor? softmax_sum=None, Tensor? softmax_in=None, Tensor? attention_in=None, float scale_value=1., float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, Tensor? seed=None, Tensor? offset=None, SymInt[]? prefix=None, Tensor? actual_seq_qlen=None, Tensor? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, bool sync=False, str softmax_layout=\"\", Tensor? sink=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",  # noqa: E501
}


@pytest.fixture
def shim(clean):
    return compat.install_torch_npu_shim(device="cpu")


def _originals():
    return {"device": torch.device, "Generator": torch.Generator, "zeros": torch.zeros, "tensor": torch.tensor,
            "load": torch.load, "manual_seed": torch.manual_seed, "Tensor.to": torch.Tensor.__dict__.get("to"),
            "Module.to": torch.nn.Module.to, "autocast.__init__": torch.amp.autocast_mode.autocast.__init__,
            "GradScaler.__init__": torch.amp.GradScaler.__init__, "set_default_device": torch.set_default_device}


# ----------------------------------------------------------------------------------------------
# opt-in, restore, refuse
# ----------------------------------------------------------------------------------------------
def test_nothing_is_patched_unless_asked(clean):
    before = _originals()
    import fascore.compat  # noqa: F401  (importing patches nothing)
    assert _originals() == before and not hasattr(torch, "npu") and not hasattr(torch.Tensor, "npu")
    mod = compat.install_torch_npu_shim()  # operators only: no device mapping
    assert _originals() == before and not hasattr(torch, "npu")
    with pytest.raises(AttributeError, match="without device mapping"):
        mod.npu
    with pytest.raises(RuntimeError, match="npu"):
        torch.zeros(1, device="npu")
    assert hasattr(torch.ops.npu, "npu_fusion_attention")


def test_uninstall_restores_everything(clean):
    before = _originals()
    modules = set(sys.modules)
    meta_path = list(sys.meta_path)
    compat.install_torch_npu_shim(device="cpu")
    assert torch.device is not before["device"] and torch.zeros is not before["zeros"]
    assert compat.install_torch_npu_shim(device="cpu") is sys.modules["torch_npu"]
    with pytest.raises(RuntimeError, match="uninstall" if torch.cuda.is_available() else "CUDA is not available"):
        compat.install_torch_npu_shim(device="cuda")  # another target while installed / no CUDA here
    assert compat.uninstall_torch_npu_shim()
    assert _originals() == before
    assert not hasattr(torch, "npu") and not hasattr(torch.Tensor, "npu") and not hasattr(torch.Tensor, "is_npu")
    assert not hasattr(torch.nn.Module, "npu") and not hasattr(torch.ops.npu, "npu_fusion_attention")
    assert not {m for m in set(sys.modules) - modules if m.startswith(("torch_npu", "torch.npu"))}
    assert sys.meta_path == meta_path
    assert not compat.uninstall_torch_npu_shim()
    compat.install_torch_npu_shim(device="cpu")  # and again
    assert torch.zeros(1, device="npu").device.type == "cpu"


def test_refuses_to_run_beside_a_real_torch_npu(clean, tmp_path, monkeypatch):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = _originals()
    with pytest.raises(RuntimeError, match="will not shadow"):
        compat.install_torch_npu_shim(device="cpu")
    assert _originals() == before and "torch_npu" not in sys.modules


# ----------------------------------------------------------------------------------------------
# a well-behaved module
# ----------------------------------------------------------------------------------------------
def test_module_spec_version_and_submodules(shim):
    import torch_npu

    assert importlib.util.find_spec("torch_npu") is torch_npu.__spec__ and torch_npu.__spec__.name == "torch_npu"
    assert "fascore" in torch_npu.__version__ and torch_npu.__version__.startswith(torch.__version__.split("+")[0])
    assert torch_npu.npu is torch.npu and sys.modules["torch.npu"] is torch.npu
    assert torch_npu.npu_fusion_attention is fascore.npu_fusion_attention
    assert torch_npu.npu_fusion_attention_v3 is fascore.npu_fusion_attention_v3
    assert torch_npu._npu_dropout_gen_mask is fascore._npu_dropout_gen_mask
    with pytest.warns(UserWarning, match="no-op"):
        from torch_npu.contrib import transfer_to_npu  # noqa: F401
    from torch_npu.testing.testcase import TestCase, run_tests  # noqa: F401
    from torch_npu.npu.amp import autocast  # noqa: F401
    assert importlib.util.find_spec("torch_npu.testing.testcase") is not None


def test_missing_attributes_and_submodules_say_what_is_covered(shim):
    import torch_npu

    with pytest.raises(AttributeError, match=r"torch_npu\.npu_rms_norm: .*FlashAttentionScore.*'npu_rms_norm'"):
        torch_npu.npu_rms_norm
    with pytest.raises(AttributeError, match=r"torch\.npu\.NPUGraph|NPUGraph"):
        torch.npu.NPUGraph
    with pytest.raises(ModuleNotFoundError, match="torch_npu.utils.*stand-in"):
        import torch_npu.utils  # noqa: F401
    assert not hasattr(torch_npu, "__wrapped__")  # dunder lookups stay plain


# ----------------------------------------------------------------------------------------------
# device mapping
# ----------------------------------------------------------------------------------------------
def test_npu_devices_map_wherever_pytorch_takes_one(shim):
    cpu = torch.device("cpu")
    assert torch.device("npu:3") == cpu and torch.device("npu", 1) == cpu and torch.device(type="npu") == cpu
    assert isinstance(torch.device("npu"), torch.device) and torch.device("cuda:1").type == "cuda"
    assert torch.device == type(cpu) and hash(torch.device) == hash(type(cpu))
    for t in (torch.zeros(2, device="npu"), torch.randn(2, device="npu:0"), torch.arange(3, device="npu"),
              torch.tensor([1.0], device="npu"), torch.full((2,), 3.0, device=torch.device("npu", 0)),
              torch.ones(2).to("npu"), torch.ones(2).to("npu:0", torch.float16), torch.ones(2).to(device="npu"),
              torch.ones(2).new_zeros(3, device="npu"), torch.empty_like(torch.ones(2), device="npu"),
              torch.ones(2).npu(), torch.ones(2).npu(0), torch.zeros(2, device=0)):
        assert t.device == cpu and t.is_npu
    m = torch.nn.Linear(2, 2).to("npu:0")
    assert m.npu() is m and next(m.parameters()).device == cpu
    assert torch.Generator(device="npu").device == cpu and isinstance(torch.Generator(), torch.Generator)
    torch.set_default_device("npu")
    try:
        assert torch.zeros(1).device == cpu
    finally:
        torch.set_default_device(None)


def test_torch_load_maps_npu_locations(shim, tmp_path):
    saved = {"w": torch.arange(4.0)}
    buf = io.BytesIO()
    torch.save(saved, buf)
    for loc in ("npu", "npu:0", torch.device("npu:1"), {"cpu": "npu:0"}, lambda s, loc: None, None):
        buf.seek(0)
        assert torch.equal(torch.load(buf, map_location=loc)["w"], saved["w"])
    # a checkpoint whose storages are tagged "npu:0", as torch_npu writes them
    registry = torch.serialization._package_registry
    entry = (-1000, lambda obj: "npu:0" if getattr(obj, "device", None) is not None else None,
             lambda obj, location: None)
    registry.insert(0, entry)
    try:
        npu_ckpt = io.BytesIO()
        torch.save(saved, npu_ckpt)
    finally:
        registry.remove(entry)
    npu_ckpt.seek(0)
    assert b"npu:0" in npu_ckpt.getvalue()
    assert torch.equal(torch.load(npu_ckpt)["w"], saved["w"])
    compat.uninstall_torch_npu_shim()
    npu_ckpt.seek(0)
    with pytest.raises(Exception):
        torch.load(npu_ckpt)


def test_autocast_and_grad_scaler_take_npu(shim):
    a = torch.randn(4, 4, device="npu")
    with torch.autocast(device_type="npu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        assert torch.is_autocast_enabled("npu")
    with torch.amp.autocast("npu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with torch.npu.amp.autocast(dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16 and torch.npu.is_autocast_enabled()
    assert (a @ a).dtype == torch.float32
    scaler = torch.amp.GradScaler("npu")
    w = torch.ones(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler.scale((w * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.allclose(w, torch.full((2,), 0.8))
    assert isinstance(torch.npu.amp.GradScaler(), torch.amp.GradScaler)


def test_torch_npu_device_api_on_cpu(shim, monkeypatch):
    npu = torch.npu
    assert npu.is_available() and npu.device_count() == 1 and npu.current_device() == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert npu.device_count() == 4
    npu.set_device("npu:2")
    assert npu.current_device() == 2
    npu.set_device(torch.device("npu:0"))  # a CPU device carries no index: unchanged
    assert npu.current_device() == 2
    with npu.device(3):
        assert npu.current_device() == 3
    assert npu.current_device() == 2
    with pytest.raises(ValueError):
        npu.set_device(-1)
    npu.synchronize()
    assert "CPU" in npu.get_device_name() and npu.get_device_properties().total_memory > 0
    s = npu.Stream()
    with npu.stream(s):
        assert npu.current_stream() is s
    assert npu.current_stream() is npu.default_stream()
    e1, e2 = npu.Event(enable_timing=True), npu.Event(enable_timing=True)
    e1.record()
    e2.record(s)
    assert e1.elapsed_time(e2) >= 0 and e2.query()
    with pytest.raises(RuntimeError):
        npu.Event().elapsed_time(npu.Event())
    assert npu.memory_allocated() > 0 and npu.max_memory_allocated() >= npu.memory_allocated() // 2
    npu.reset_peak_memory_stats()
    npu.empty_cache()
    assert set(npu.memory_stats()) >= {"allocated_bytes.all.current", "allocated_bytes.all.peak"}
    npu.set_compile_mode(jit_compile=False)
    assert npu.is_bf16_supported() and npu.config.allow_internal_format is False


def test_npu_random_state(shim):
    q = torch.randn(1, 2, 32, 16)
    torch.npu.manual_seed(11)
    a = fascore.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.8)
    r1 = torch.randn(3, device="npu")
    state = torch.npu.get_rng_state()
    assert state.dtype == torch.uint8 and state.numel() > 16
    b = fascore.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.8)
    r2 = torch.randn(3, device="npu")
    torch.npu.set_rng_state(state)
    c = fascore.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.8)
    assert c[4:6] == b[4:6] and torch.equal(c[0], b[0]) and torch.equal(torch.randn(3, device="npu"), r2)
    assert a[4] == 11 and a[5] != b[5]
    torch.manual_seed(5)  # torch.manual_seed seeds the emulated NPU generator too, as torch_npu's does
    assert fascore.npu_fusion_attention(q, q, q, 2, "BNSD", keep_prob=0.8)[4:6] == (5, 0)
    assert r1.shape == (3,)


def test_hccl_backend_maps_to_gloo(shim, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    dist.init_process_group("hccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo"
        t = torch.ones(2, device="npu")
        dist.all_reduce(t)
        assert torch.equal(t, torch.ones(2))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# torch.ops.npu
# ----------------------------------------------------------------------------------------------
def test_torch_ops_npu_schemas_are_torch_npus(shim):
    for name, want in TORCH_NPU_SCHEMAS.items():
        got = str(getattr(torch.ops.npu, name).default._schema)
        assert got == str(torch._C.parse_schema("npu::" + want)), name
    for name, want in npu_ops.OTHER_SCHEMAS.items():
        base, _, overload = name.partition(".")
        packet = getattr(torch.ops.npu, base)
        assert str(getattr(packet, overload or "default")._schema) == str(torch._C.parse_schema("npu::" + want))


def test_torch_ops_npu_meta_tensors_and_mask_generators(shim):
    q = torch.empty(2, 4, 16, 8, device="meta")
    out = torch.ops.npu.npu_fusion_attention(q, q, q, 4, "BNSD", scale=0.5)
    assert out[0].device.type == "meta" and tuple(out[1].shape) == (2, 4, 16, 8) and out[6] == 2 * 4 * 16 * 16
    g = torch.ops.npu.npu_fusion_attention_grad(q, q, q, out[0], 4, "BNSD", softmax_max=out[1], softmax_sum=out[2],
                                                attention_in=out[0], scale_value=0.5)
    assert g[0].device.type == "meta" and g[3] is None
    x = torch.ones(3)
    m = torch.ops.npu._npu_dropout_gen_mask.Tensor(x, [4, 64], 0.25, 7, 0, parallel=True)
    assert torch.equal(m, fascore._npu_dropout_gen_mask(x, [4, 64], 0.25, 7, 0))
    m2 = torch.ops.npu.npu_dropout_gen_mask([4, 64], 0.25, device=torch.device("npu"))
    assert m2.dtype == torch.uint8 and m2.numel() == 32
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fm = torch.ops.npu._npu_dropout_gen_mask(mode.from_tensor(x), [300], 0.5, 1, 0)
        assert tuple(fm.shape) == (48,)


def test_ring_update_keywords(shim):
    g = torch.Generator().manual_seed(3)
    s, b, n, d = 8, 1, 2, 4
    o1, o2 = torch.randn(s, b, n * d, generator=g), torch.randn(s, b, n * d, generator=g)
    m1, m2 = (torch.randn(b, n, s, 1, generator=g).expand(b, n, s, 8).contiguous() for _ in range(2))
    l1, l2 = (torch.rand(b, n, s, 1, generator=g).add(0.5).expand(b, n, s, 8).contiguous() for _ in range(2))
    want = fascore.npu_ring_attention_update(o1, m1, l1, o2, m2, l2, input_layout="SBH")
    import torch_npu
    assert torch_npu.npu_ring_attention_update is fascore.npu_ring_attention_update
    got = torch_npu.npu_ring_attention_update(o1, m1, l1, o2, m2, l2, input_layout="SBH", input_softmax_layout="")
    op = torch.ops.npu.npu_ring_attention_update(o1, m1, l1, o2, m2, l2, input_layout="SBH")
    with pytest.warns(DeprecationWarning, match="input_layout"):  # fascore's old name and spelling
        old = fascore.ring_attention_update(o1, m1, l1, o2, m2, l2, None, "SBH")
    for res in (got, op, old):
        for a, w in zip(res, want):
            assert torch.equal(a, w)
    with pytest.raises(TypeError):
        torch_npu.npu_ring_attention_update(o1, m1, l1, o2, m2, l2, None, "SBH")  # keyword-only, as torch_npu


# ----------------------------------------------------------------------------------------------
# torch_npu.testing.testcase semantics
# ----------------------------------------------------------------------------------------------
def test_assert_rtol_equal_semantics(shim):
    from torch_npu.testing.testcase import TestCase

    class T(TestCase):
        def runTest(self):
            pass

    t = T()
    x = np.ones(1000, dtype=np.float32)
    t.assertRtolEqual(x, x + 5e-5)  # within prec (1e-4)
    y = x.copy()
    y[0] = 3.0  # 1 element off of 1000 <= numel * prec? 1 > 0.1 -> fails
    with pytest.raises(AssertionError):
        t.assertRtolEqual(x, y)
    big = np.ones(100000, dtype=np.float32)
    yb = big.copy()
    yb[:5] = 2.0  # 5 of 1e5 elements off: not more than numel * prec = 10 -> passes
    t.assertRtolEqual(big, yb)
    h = torch.ones(100, dtype=torch.float16)
    t.assertRtolEqual(h, h + 2.0**-10)  # one fp16 ulp: within prec16 = 1e-3
    with pytest.raises(AssertionError):
        t.assertRtolEqual(h, h * 1.01)
    with pytest.raises(AssertionError, match="dtype"):
        t.assertRtolEqual(torch.ones(2), torch.ones(2, dtype=torch.float64))
    with pytest.raises(AssertionError, match="shape"):
        t.assertRtolEqual(torch.ones(2), torch.ones(3))
    with pytest.raises(AssertionError):
        t.assertRtolEqual(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    with pytest.raises(AssertionError):  # bfloat16: allclose(rtol=atol=prec16)
        t.assertRtolEqual(torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16) * 1.1)
    t.assertRtolEqual([torch.ones(2), 1.0], [torch.ones(2), 1.0])
    t.assertRtolEqual(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    t.assertEqual(torch.ones(2), torch.ones(2) + 1e-6)
    with pytest.raises(AssertionError):
        t.assertEqual(torch.ones(2), torch.ones(2) + 1e-3)
    t.assertEqual([1, 2], (1, 2))


def test_testcase_setup_seeds_and_runs(shim, monkeypatch):
    from torch_npu.testing.testcase import TestCase

    seen = []

    class T(TestCase):
        def test_a(self):
            seen.append(torch.rand(1).item())

    monkeypatch.setenv("SEED", "123")
    result = unittest.TextTestRunner(stream=io.StringIO()).run(unittest.defaultTestLoader.loadTestsFromTestCase(T))
    assert result.wasSuccessful()
    torch.manual_seed(123)
    assert seen == [torch.rand(1).item()]


def test_mapping_rules_for_both_targets():
    from fascore.compat.devices import DeviceMapping

    cpu = DeviceMapping("cpu")
    assert [cpu.map(v) for v in ("npu", "npu:3", "cpu", "cuda:1", 2, True)] == ["cpu", "cpu", "cpu", "cuda:1", "cpu",
                                                                               True]
    assert [cpu.map_backend(b) for b in ("hccl", "cpu:gloo,npu:hccl", "npu:hccl", "nccl")] == \
        ["gloo", "cpu:gloo", "cpu:gloo", "nccl"]
    cuda = object.__new__(DeviceMapping)  # the rules alone, without needing a GPU here
    cuda.type, cuda.real_device = "cuda", type(torch.device("cpu"))
    assert [cuda.map(v) for v in ("npu", "npu:3", 2)] == ["cuda", "cuda:3", 2]
    assert [cuda.map_backend(b) for b in ("hccl", "cpu:gloo,npu:hccl")] == ["nccl", "cpu:gloo,cuda:nccl"]
    assert cuda.map_device_type("npu") == "cuda" and cuda.map_device_type("cpu") == "cpu"


def test_torch_ops_npu_autograd_follows_derivatives_yaml(shim):
    """v2: query, key, value, pse, query_rope, key_rope and sink get gradients (derivatives.yaml)."""
    g = torch.Generator().manual_seed(9)
    b, s, n, d, dr = 1, 8, 2, 4, 2
    base = dict(q=(b, s, n, d), k=(b, s, n, d), v=(b, s, n, d), qr=(b, s, n, dr), kr=(b, s, n, dr), pse=(b, n, s, s))
    t = {k: torch.randn(*shape, generator=g) for k, shape in base.items()}
    t["sink"] = torch.randn(n, generator=g)

    def run(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        out = fn(leaves["q"], leaves["k"], leaves["v"], n, "BSND", pse=leaves["pse"], query_rope=leaves["qr"],
                 key_rope=leaves["kr"], sink=leaves["sink"], scale=0.5)
        out[0].pow(2).sum().backward()
        return {k: v.grad for k, v in leaves.items()}

    via_op, via_fn = run(torch.ops.npu.npu_fusion_attention_v2), run(fascore.npu_fusion_attention_v2)
    for k in t:
        assert via_op[k] is not None and torch.equal(via_op[k], via_fn[k]), k
