"""Issue 11's acceptance: unmodified torch_npu code on fascore's stand-in (docs/torch_npu.md).

* torch_npu-style operator tests (tests/dropin_scripts/npu_fusion_attention_cases.py: .npu(),
  torch.npu.manual_seed, assertRtolEqual, NPU device strings, torch.ops.npu.*, FakeTensorMode,
  v1/v2/v3/grad/grad_v2/grad_v3, dropout via _npu_dropout_gen_mask, TND with tensor lengths)
  run unchanged under ``fascore run`` and under ``install_torch_npu_shim(device="cpu")``;
* an unmodified torch_npu GPT training script (tests/dropin_scripts/train_gpt_npu.py) runs via
  ``fascore run`` on the CPU and its losses match the same model on the reference engine;
* torch.compile(fullgraph=True) through ``torch.ops.npu.npu_fusion_attention``, forward and backward.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
import torch

import fascore
from fascore import compat

SCRIPTS = Path(__file__).parent / "dropin_scripts"
CASES = SCRIPTS / "npu_fusion_attention_cases.py"
GPT = SCRIPTS / "train_gpt_npu.py"
N_CASES = 15


def fascore_run(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fascore.tools.cli", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def shim_cpu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    compat.uninstall_torch_npu_shim()
    mod = compat.install_torch_npu_shim(device="cpu")
    yield mod
    compat.uninstall_torch_npu_shim()


# ----------------------------------------------------------------------------------------------
# torch_npu-style operator tests
# ----------------------------------------------------------------------------------------------
def test_npu_style_cases_run_unmodified_under_fascore_run(tmp_path):
    r = fascore_run("--device", "cpu", CASES, "-v", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Ran {N_CASES} tests" in r.stderr and "\nOK" in r.stderr, r.stderr


def test_npu_style_cases_run_unmodified_under_install_shim(shim_cpu):
    spec = importlib.util.spec_from_file_location("npu_fusion_attention_cases", CASES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    assert suite.countTestCases() == N_CASES
    stream = io.StringIO()
    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    assert result.wasSuccessful(), stream.getvalue()
    assert not result.skipped


def test_npu_style_cases_fail_when_an_operator_is_wrong(shim_cpu, monkeypatch):
    """The cases can fail: grad_v2 in fascore's old order (dsink, dq_rope, dk_rope after dpse) is caught."""
    real = shim_cpu.npu_fusion_attention_grad_v2

    def old_order(*a, **k):
        dq, dk, dv, dpse, dqr, dkr, dsink = real(*a, **k)
        return dq, dk, dv, dpse, dsink, dqr, dkr
    monkeypatch.setattr(shim_cpu, "npu_fusion_attention_grad_v2", old_order)
    spec = importlib.util.spec_from_file_location("npu_fusion_attention_cases_bad", CASES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    suite = unittest.defaultTestLoader.loadTestsFromName(
        "TestNPUFusionAttention.test_npu_fusion_attention_v2_rope_pse_grad_v2", mod)
    result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
    assert not result.wasSuccessful()


# ----------------------------------------------------------------------------------------------
# an unmodified training script
# ----------------------------------------------------------------------------------------------
def _run_gpt_in_process(out: Path, calls: list) -> dict:
    torch_npu = sys.modules["torch_npu"]
    real = torch_npu.npu_fusion_attention

    def spy(*a, **k):
        res = real(*a, **k)
        calls.append((k.get("keep_prob"), k.get("sparse_mode"), tuple(k["atten_mask"].shape), res[4]))
        return res
    torch_npu.npu_fusion_attention = spy
    old_argv = sys.argv
    sys.argv = [str(GPT), "--steps", "4", "--out", str(out)]
    try:
        with fascore.use_engine("reference"):
            runpy.run_path(str(GPT), run_name="__main__")
    finally:
        sys.argv = old_argv
        torch_npu.npu_fusion_attention = real
    return json.loads(out.read_text())


def test_gpt_training_script_via_fascore_run_matches_the_reference_engine(tmp_path, shim_cpu):
    r = fascore_run("--device", "cpu", GPT, "--steps", "4", "--out", tmp_path / "run.json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max_memory_allocated" in r.stdout and "step 3 loss" in r.stdout, r.stdout
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["device"] == "cpu" and run["max_memory_allocated"] > 0
    calls: list = []
    ref = _run_gpt_in_process(tmp_path / "ref.json", calls)
    # the script's attention: compressed causal mask, sparse_mode 2, dropout with drawn seeds
    assert len(calls) == 2 * 4 and all(c[:3] == (0.9, 2, (2048, 2048)) and c[3] != 0 for c in calls)
    assert len({c[3] for c in calls}) == 1  # one seed, advancing offsets (torch.npu.manual_seed)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    assert run["losses"][-1] < run["losses"][0]


# ----------------------------------------------------------------------------------------------
# torch.compile through torch.ops.npu
# ----------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_through_torch_ops_npu_forward_and_backward(shim_cpu):
    torch._dynamo.reset()
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1).npu()
    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(2, 32, 64, generator=g).npu().requires_grad_(True) for _ in range(3)]

    def loss_fn(q, k, v):
        out = torch.ops.npu.npu_fusion_attention(q, k, v, 4, "BSH", atten_mask=mask, scale=0.25, sparse_mode=2)[0]
        return (out * out).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(*leaves)
    loss.backward()
    got = [t.grad.clone() for t in leaves]
    eager_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    want = loss_fn(*eager_leaves)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, (t.grad for t in eager_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_with_npu_device_strings_in_the_graph(shim_cpu):
    torch._dynamo.reset()

    def f(x):
        bias = torch.ones(x.shape[-1], device="npu:0")
        return x.to(torch.device("npu")) + bias.npu() + torch.zeros(1).to("npu")

    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1)
    torch._dynamo.reset()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_max_memory_allocated_on_cpu_sees_a_large_allocation(shim_cpu):
    import gc

    gc.collect()  # earlier tests' garbage freed now, not between the reset and the allocation
    gc.disable()  # (the CPU peak is resident memory: a collection in between lowers it)
    try:
        torch.npu.reset_peak_memory_stats()
        before = torch.npu.max_memory_allocated()
        x = torch.ones(64 * 2**20 // 4, device="npu")  # 64 MiB, touched
        assert torch.npu.max_memory_allocated() >= before + 48 * 2**20
        del x
    finally:
        gc.enable()
