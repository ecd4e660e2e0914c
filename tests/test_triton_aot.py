"""Ahead-of-time compiles of every kernel configuration in the Triton engine's table for sm_80
and sm_90 (``triton.compile`` with ``GPUTarget("cuda", cap, 32)``: no GPU needed), failing on
register spills or any compile error, for the feature-free kernels (the fast path; pse and
dpse kernels with a dense pse); ptxas reports registers, spills and shared memory.
``FASCORE_AOT_FULL=1`` also compiles each kernel with every feature at once (pse, explicit mask,
prefix, Philox dropout, sink) and requires those to compile (their spills are reported).

Runs in a subprocess with ``TRITON_INTERPRET`` unset (the interpreter suite sets it in this
process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def test_every_table_config_compiles_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fascore.engines.triton.aot", "--out", str(out), "-j", "2"]
    if os.environ.get("FASCORE_AOT_FULL") == "1":
        cmd.append("--full")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    from fascore.engines.triton import configs
    n_gpu = sum(1 for (arch, _c, _b) in configs.TABLE if arch in ("sm80", "sm90"))
    assert len(results) >= n_gpu * 5
    errors = [r for r in results if "error" in r]
    assert not errors, "\n".join(json.dumps(r) for r in errors)
    spills = [r for r in results if (r["spill_stores"] or r["spill_loads"]) and r["variant"] == "plain"]
    table = "\n".join(f"{r['kernel']:4s} {r['arch']} {r['dtype']} BD={r['bd']:3d} {r['variant']:5s} "
                      f"{r['bm']}x{r['bn']} w{r['warps']} s{r['stages']}: regs {r['regs']} "
                      f"spill {r['spill_stores']}/{r['spill_loads']} smem {r['shared']}" for r in spills)
    assert not spills, "register spills:\n" + table
    for r in results:  # shared memory within the sm_80 / sm_90 limits
        assert r["shared"] <= (163 if r["arch"] == "sm80" else 227) * 1024, r
