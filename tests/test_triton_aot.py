"""Ahead-of-time compiles of every kernel configuration in the Triton engine's table for sm_80
and sm_90 (``triton.compile`` with ``GPUTarget("cuda", cap, 32)``: no GPU needed), failing on
register spills or any compile error, for the feature-free kernels (the fast path; pse and
dpse kernels with a dense pse). Registers and spills come from the log of the ptxas run that
produced each cubin, shared memory from the kernel's metadata.
``FASCORE_AOT_FULL=1`` also compiles each kernel with every feature at once (pse, explicit mask,
prefix, Philox dropout, sink) and requires those to compile (their spills are reported).

Results are cached per compile key (Triton and ptxas versions, kernel source hash, signature,
options; ``fascore.engines.triton.aot``) under ``$FASCORE_CACHE_DIR`` (default
``~/.cache/fascore``): a run after an unchanged one reads them back, any change to a kernel or a
table entry recompiles what it touches. ``FASCORE_AOT_CACHE=0`` compiles everything afresh.

Everything runs in subprocesses with ``TRITON_INTERPRET`` unset: importing triton's JIT kernels
here would make the interpreter suite (``test_triton_engine.py``) unable to run in this process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args: list[str], env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env or _ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_every_table_config_compiles_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    cmd = ["-m", "fascore.engines.triton.aot", "--out", str(out), "-j", "2"]
    if os.environ.get("FASCORE_AOT_FULL") == "1":
        cmd.append("--full")
    proc = _run(cmd)
    print(proc.stdout + proc.stderr)  # the table (pytest shows it with -s or on failure)
    results = json.loads(out.read_text())
    listing = _run(["-c", "from fascore.engines.triton import configs; import json; "
                          "print(json.dumps([list(k) for k in configs.TABLE if k[0] in ('sm80', 'sm90')]))"])
    entries = json.loads(listing.stdout)
    variants = 2 if "--full" in cmd else 1
    assert len(entries) == 2 * 2 * 4  # (sm80, sm90) x (half, f32) x BD 32..256
    assert len(results) == len(entries) * 5 * variants
    seen = {(r["arch"], "f32" if r["dtype"] == "fp32" else "half", r["bd"], r["kernel"]) for r in results}
    assert seen == {(a, c, bd, k) for a, c, bd in entries for k in ("fwd", "pre", "kv", "q", "pse")}
    errors = [r for r in results if "error" in r]
    assert not errors, "\n".join(json.dumps(r) for r in errors)
    assert all(r["regs"] > 0 and r["usage_from"] == "triton ptxas log" for r in results), \
        [r for r in results if r["regs"] <= 0 or r["usage_from"] != "triton ptxas log"][:3]
    spills = [r for r in results if (r["spill_stores"] or r["spill_loads"]) and r["variant"] == "plain"]
    assert not spills, "register spills:\n" + "\n".join(json.dumps(r) for r in spills)
    for r in results:  # shared memory within the sm_80 / sm_90 limits
        assert r["shared"] <= (163 if r["arch"] == "sm80" else 227) * 1024, r


_CACHE_PROBE = textwrap.dedent("""
    import json, os, sys
    from fascore.engines.triton import aot, configs

    if __name__ == "__main__":
        cfg = configs.TABLE[("sm80", "f32", 32)]
        other = configs.Config(cfg.fwd, cfg.kv, cfg.q, cfg.pse, configs.Tile(16, 0, 2, 1))
        jobs = [("pre", 80, "fp32", 32, cfg, "plain"), ("pre", 80, "fp32", 32, cfg, "plain"),
                ("pre", 80, "fp32", 32, other, "plain"), ("pre", 90, "fp32", 32, cfg, "plain")]
        res = aot.compile_all(jobs, processes=1)
        fresh = []
        if "--also-uncached" in sys.argv:
            fresh = aot.compile_all(jobs[:1], processes=1, cache=False)
            os.environ["FASCORE_AOT_CACHE"] = "0"
            assert aot.cache_dir() is None
        print(json.dumps([res, fresh]))
""")


def test_compile_cache_hits_and_keys(tmp_path):
    """A second process reads the first one's results back (same key, same numbers); jobs that
    differ in a tile or the target get their own key; identical jobs compile once."""
    script = tmp_path / "probe.py"
    script.write_text(_CACHE_PROBE)
    env = dict(_ENV, FASCORE_CACHE_DIR=str(tmp_path / "cache"), FASCORE_AOT_CACHE="1")
    first, _ = json.loads(_run([str(script)], env=env).stdout.strip().splitlines()[-1])
    second, fresh = json.loads(_run([str(script), "--also-uncached"], env=env).stdout.strip().splitlines()[-1])
    assert [r["cached"] for r in first] == [False, False, False, False]
    assert [r["cached"] for r in second] == [True, True, True, True]
    keys = [r["key"] for r in first]
    assert keys[0] == keys[1] and len(set(keys)) == 3 and keys == [r["key"] for r in second]
    assert [r["warps"] for r in first] == [4, 4, 2, 4] and [r["arch"] for r in first] == ["sm80"] * 3 + ["sm90"]
    for a, b in zip(first, second):
        assert {k: a[k] for k in ("regs", "spill_stores", "spill_loads", "shared")} == \
               {k: b[k] for k in ("regs", "spill_stores", "spill_loads", "shared")}
    files = [f for _d, _s, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".json")]
    assert len(files) == 3
    assert [r["cached"] for r in fresh] == [False] and fresh[0]["regs"] == first[0]["regs"]  # cache=False compiles
