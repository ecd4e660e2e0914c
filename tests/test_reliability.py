"""Reliability: memory guard, determinism (repeated runs, across processes, thread counts),
non-finite inputs, concurrency, and misuse of the aclnn two-stage API.

Hostile argument combinations are fuzzed in test_fuzz.py; this file holds the targeted checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fascore
from fascore import FlashAttentionError, aclnn

OK, NULLPTR, INVALID, RUNTIME = 0, 161001, 161002, 361001
I32MAX = 2**31 - 1
MiB, GiB = 2**20, 2**30
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
try:
    from fascore.engines.flash import config as _kernels
    KCONFIG = getattr(_kernels, "config", {})
except Exception:  # pragma: no cover
    KCONFIG = {}


def big(shape, dtype=torch.float32):
    """A tensor of any size that allocates one element (zero strides)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def rnd(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def estimate_gib(msg: str) -> float:
    m = re.search(r"needs about ([0-9.]+) GiB", msg)
    assert m, f"no estimate in the message: {msg!r}"
    return float(m.group(1))


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# Memory guard: 361001 with the estimate before any work starts
# ----------------------------------------------------------------------------------------------
def test_memory_guard_reference_engine_at_1m():
    s, d = 1 << 20, 8
    q = big((1, s, 1, d))
    rss = max_rss_bytes()
    with fascore.use_engine("reference"), pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, q, q, 1, "BSND")
    assert ei.value.status == RUNTIME
    msg = str(ei.value)
    assert "memory" in msg and "available" in msg, msg
    # the reference materialises [B, N1, Sq, Skv] float32 matrices: at least 4 * S^2 bytes
    assert estimate_gib(msg) >= 4 * s * s / GiB
    assert max_rss_bytes() - rss < 512 * MiB, "the guard must fire before anything big is allocated"


def test_memory_guard_reference_engine_tnd_1m():
    t = 1 << 20
    q = big((t, 1, 8))
    with fascore.use_engine("reference"), pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, q, q, 1, "TND", actual_seq_qlen=[t], actual_seq_kvlen=[t])
    assert ei.value.status == RUNTIME and estimate_gib(str(ei.value)) >= 4 * t * t / GiB


@pytest.mark.parametrize("tiled", ["native", "flash"])
def test_memory_guard_tiled_engine_enormous_batch(tiled):
    if tiled not in fascore.available_engines():
        pytest.skip(f"engine {tiled!r} unavailable here")
    b, n, s, d = 2 * 1024 * 1024, 8, 1024, 128  # B at its limit (2M)
    q = big((b, n, s, d), torch.float16)
    rss = max_rss_bytes()
    with fascore.use_engine(tiled), pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, q, q, n, "BNSD", atten_mask=CAUSAL, sparse_mode=2)
    assert ei.value.status == RUNTIME
    assert estimate_gib(str(ei.value)) >= b * n * s * d * 2 / GiB  # the output alone
    assert max_rss_bytes() - rss < 512 * MiB


def test_memory_guard_grad_op():
    b, n, s, d = 1 << 20, 8, 1024, 64
    q = big((b, s, n * d))
    stats = big((b, n, s, 8))
    with pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention_grad(q, q, q, q, n, "BSH", softmax_max=stats, softmax_sum=stats,
                                          attention_in=q)
    assert ei.value.status == RUNTIME and estimate_gib(str(ei.value)) >= b * s * n * d * 4 * 3 / GiB


def test_memory_guard_autograd_forward():
    b, n, s, d = 1 << 20, 8, 1024, 64
    q = torch.zeros((), requires_grad=True).expand(b, s, n * d)  # differentiable, one element
    with pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, q, q, n, "BSH")
    assert ei.value.status == RUNTIME


def test_memory_guard_aclnn_returns_status():
    s = 1 << 20
    q = big((1, s, 1))  # BSH, one head of D = 1: the outputs are small, the reference's scratch is not
    out, smax, ssum = torch.empty(1, s, 1), torch.empty(1, 1, s, 8), torch.empty(1, 1, s, 8)
    with fascore.use_engine("reference"):
        st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
            q, q, q, None, None, None, None, None, None, None, 1.0, 1.0, I32MAX, I32MAX, 1, "BSH", 0, 0, 1,
            smax, ssum, None, out)
    assert (st, ws, ex) == (RUNTIME, 0, None)
    assert estimate_gib(aclnn.get_recent_err_msg()) >= 4 * s * s / GiB


def test_memory_guard_uses_available_memory(monkeypatch):
    """The guard compares the estimate with what the device has left (patched here to 1 MiB)."""
    from fascore.api import memory
    q = rnd((1, 64, 4 * 16), 0)
    fascore.npu_fusion_attention(q, q, q, 4, "BSH")  # fits
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 * MiB)
    with pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(rnd((1, 512, 4 * 64), 0), rnd((1, 512, 4 * 64), 1), rnd((1, 512, 4 * 64), 2),
                                     4, "BSH")
    assert ei.value.status == RUNTIME and "1 MiB" not in str(ei.value)
    assert "0.00 GiB is available" in str(ei.value)


def test_available_memory_is_positive():
    from fascore.api import memory
    assert memory.available_memory(torch.device("cpu")) > 0


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
def _configs():
    """(name, builder) pairs; each builder returns (args, kwargs, differentiable names)."""
    def bsh_causal():
        return (rnd((2, 70, 4 * 32), 1), rnd((2, 70, 2 * 32), 2), rnd((2, 70, 2 * 32), 3), 4, "BSH"), \
            dict(atten_mask=CAUSAL, sparse_mode=3, scale=32 ** -0.5), (0, 1, 2)

    def bnsd_pse_dropout():
        return (rnd((2, 4, 50, 16), 4), rnd((2, 4, 60, 16), 5), rnd((2, 4, 60, 16), 6), 4, "BNSD"), \
            dict(pse=rnd((1, 4, 50, 60), 7), keep_prob=0.8, seed=99, offset=16), (0, 1, 2, "pse")

    def tnd_band():
        return (rnd((40, 2, 16), 8), rnd((45, 1, 16), 9), rnd((45, 1, 16), 10), 2, "TND"), \
            dict(actual_seq_qlen=[10, 25, 40], actual_seq_kvlen=[15, 30, 45], atten_mask=CAUSAL,
                 sparse_mode=4, pre_tockens=6, next_tockens=2), (0, 1, 2)

    def bf16_sink():
        return (rnd((1, 33, 2, 32), 11, torch.bfloat16), rnd((1, 33, 2, 32), 12, torch.bfloat16),
                rnd((1, 33, 2, 32), 13, torch.bfloat16), 2, "BSND"), dict(sink=rnd((2,), 14)), (0, 1, 2, "sink")

    return {"bsh_causal": bsh_causal, "bnsd_pse_dropout": bnsd_pse_dropout, "tnd_band": tnd_band,
            "bf16_sink": bf16_sink}


def run_config(name: str) -> list[torch.Tensor]:
    """Forward outputs and autograd gradients of one configuration."""
    args, kw, wrt = _configs()[name]()
    args = list(args)
    leaves = []
    for w in wrt:
        if isinstance(w, int):
            args[w] = args[w].clone().requires_grad_(True)
            leaves.append(args[w])
        else:
            kw[w] = kw[w].clone().requires_grad_(True)
            leaves.append(kw[w])
    res = fascore.npu_fusion_attention(*args, **kw)
    dy = rnd(tuple(res[0].shape), 1234, res[0].dtype)
    grads = torch.autograd.grad(res[0], leaves, dy)
    return [res[0], res[1], res[2], *grads]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(_configs()))
def test_repeated_runs_are_bitwise_identical(name):
    first = run_config(name)
    for _ in range(2):
        again = run_config(name)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{name}: results differ between runs"


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    sys.path.insert(0, sys.argv[2])
    import test_reliability as t
    from fascore.canonical import dropout
    out = {name: t.digest(t.run_config(name)) for name in sorted(t._configs())}
    d = dropout.Dropout(0.7, (0, 5008), 33, 48, seed=2**40 + 7, offset=12)
    out["philox bits"] = t.digest([d.keep(4, 0, 33, 0, 47, torch.device("cpu"))])
    print(json.dumps(out))
""")


def _children(threads: list[int]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(n), os.path.dirname(__file__)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in threads]
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se[-3000:]
        outs.append(json.loads(so.strip().splitlines()[-1]))
    return outs


def test_bitwise_identical_across_processes_same_thread_count():
    a1, b1, a2, b2 = _children([1, 1, 2, 2])
    assert a1 == b1, "1 thread: processes disagree"
    assert a2 == b2, "2 threads: processes disagree"
    # generated dropout bits never depend on the thread count
    assert a1["philox bits"] == a2["philox bits"]


# ----------------------------------------------------------------------------------------------
# Non-finite inputs: propagate as in the reference, never hang or crash
# ----------------------------------------------------------------------------------------------
def _both_engines(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fn()
        with fascore.use_engine("reference"):
            b = fn()
    return a, b


def assert_same_nonfinite(name, x, y, rtol=1e-4):
    x, y = x.detach().double(), y.detach().double()
    assert torch.equal(x.isnan(), y.isnan()), f"{name}: NaN positions differ"
    inf = x.isinf() | y.isinf()
    assert torch.equal(x[inf], y[inf]), f"{name}: Inf positions differ"
    fin = torch.isfinite(x)
    if fin.any():
        assert torch.allclose(x[fin], y[fin], rtol=rtol, atol=rtol), f"{name}: finite values differ"


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("where", ["query", "key", "value", "pse"])
@pytest.mark.parametrize("val", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "causal"])
@pytest.mark.parametrize("with_pse", [True, False], ids=["pse", "nopse"])
def test_nonfinite_forward_and_backward_propagate_as_reference(where, val, masked, with_pse):
    if where == "pse" and not with_pse:
        pytest.skip("no pse")
    b, n, s, d = 1, 2, 12, 8
    t = {"query": rnd((b, n, s, d), 1), "key": rnd((b, n, s, d), 2), "value": rnd((b, n, s, d), 3)}
    if with_pse:  # a pse gradient: the flash engine's own tiled backward; without: PyTorch's fused kernel
        t["pse"] = rnd((b, n, s, s), 4)
    t[where][0, 1, 5, 3 if where != "pse" else 2] = val  # row/key 5 of head 1: visible to rows >= 5
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    kw = dict(atten_mask=CAUSAL, sparse_mode=2) if masked else {}

    def fn():
        r = fascore.npu_fusion_attention(leaves["query"], leaves["key"], leaves["value"], n, "BNSD",
                                         pse=leaves.get("pse"), **kw)
        g = torch.autograd.grad(r[0], list(leaves.values()), torch.ones_like(r[0]))
        return [r[0], r[1], r[2], *g]

    got, want = _both_engines(fn)
    for name, x, y in zip(["attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dpse"], got, want):
        assert_same_nonfinite(name, x, y)
    for k, v in t.items():  # inputs untouched
        assert torch.equal(leaves[k].detach().isnan(), v.isnan())


def test_all_neg_inf_logit_row_agrees():
    q, k, v = rnd((1, 1, 4, 8), 1), rnd((1, 1, 4, 8), 2), rnd((1, 1, 4, 8), 3)
    pse = torch.zeros(1, 1, 4, 4)
    pse[0, 0, 1, :] = float("-inf")
    got, want = _both_engines(lambda: fascore.npu_fusion_attention(q, k, v, 1, "BNSD", pse=pse)[:3])
    for name, x, y in zip(["attention_out", "softmax_max", "softmax_sum"], got, want):
        assert_same_nonfinite(name, x, y)


def test_nonfinite_value_reaches_the_rows_that_see_it():
    """A NaN in value row j reaches every output row i for which (i, j) takes part, in both
    engines. (Rows that cannot see j may also turn NaN through 0 * NaN in P @ V: always in the
    dense reference, in the flash engine only inside tiles it computes; README, Reliability.)"""
    s = 64
    q, k, v = rnd((1, 1, s, 8), 1), rnd((1, 1, s, 8), 2), rnd((1, 1, s, 8), 3)
    v[0, 0, 60, 0] = float("nan")
    old = KCONFIG.get("tiles")
    try:
        for tiles in (None, (16, 16)):
            if "tiles" in KCONFIG:
                KCONFIG["tiles"] = tiles
            got, want = _both_engines(lambda: fascore.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=CAUSAL,
                                                                           sparse_mode=2)[0])
            assert got[0, 0, 60:].isnan().any(-1).all() and want[0, 0, 60:].isnan().any(-1).all()
            fin = torch.isfinite(got) & torch.isfinite(want)
            assert torch.allclose(got[fin], want[fin], rtol=1e-4, atol=1e-5)
    finally:
        if "tiles" in KCONFIG:
            KCONFIG["tiles"] = old


def test_nonfinite_never_hangs_large_logits():
    """Huge logits overflow to inf in float32: NaN/Inf results, no exception, no hang."""
    q = rnd((1, 300, 2, 16), 1) * 1e19
    k = rnd((1, 300, 2, 16), 2) * 1e19
    v = rnd((1, 300, 2, 16), 3)
    got, want = _both_engines(lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSND", scale=1e10)[:3])
    for name, x, y in zip(["attention_out", "softmax_max", "softmax_sum"], got, want):
        assert_same_nonfinite(name, x, y)


# ----------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------
def _task(i: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(i % 4)
    q = torch.randn(2, 96, 4 * 16, generator=g).requires_grad_(True)
    k = torch.randn(2, 96, 2 * 16, generator=g).requires_grad_(True)
    v = torch.randn(2, 96, 2 * 16, generator=g).requires_grad_(True)
    kw = dict(atten_mask=CAUSAL, sparse_mode=2) if i % 2 else {}
    if i % 5 == 0:
        kw.update(keep_prob=0.8, seed=7)
    with fascore.use_engine("reference" if i % 3 == 0 else "flash"):  # thread-local
        r = fascore.npu_fusion_attention(q, k, v, 4, "BSH", **kw)
        grads = torch.autograd.grad(r[0], [q, k, v], torch.ones_like(r[0]))
    return [r[0], r[1], r[2], *grads]


def test_concurrent_calls_equal_serial_calls():
    serial = [_task(i) for i in range(16)]
    with ThreadPoolExecutor(8) as ex:
        parallel = list(ex.map(_task, range(16)))
    for i, (s_, p_) in enumerate(zip(serial, parallel)):
        for a, b in zip(s_, p_):
            assert torch.equal(a, b), f"task {i}: a concurrent call differs from the serial one"


def test_concurrent_errors_and_messages_are_per_thread():
    q = rnd((1, 8, 16), 0)
    barrier = threading.Barrier(4)

    def bad(i):
        barrier.wait()
        out = torch.empty(1, 8, 16)
        stats = torch.empty(1, 2, 8, 8)
        st, _, _ = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
            q, q, q, None, None, None, None, None, None, None, 1.0, 1.0, I32MAX, I32MAX, 2, "BSH", 0, i + 10, 1,
            stats, stats.clone(), None, out)
        return st, aclnn.get_recent_err_msg()

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(bad, range(4)))
    for i, (st, msg) in enumerate(results):
        assert st == INVALID and f"sparseMode (sparse_mode)={i + 10}" in msg, msg


def test_one_executor_run_from_many_threads_runs_once():
    st, ws, ex, outs = _forward_stage1()
    barrier = threading.Barrier(6)

    def run(_):
        barrier.wait()
        return aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None)

    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(run, range(6)))
    assert codes == [OK] + [RUNTIME] * 5


# ----------------------------------------------------------------------------------------------
# aclnn misuse: status codes and a message, never an exception or a crash
# ----------------------------------------------------------------------------------------------
B, N1, S, D = 1, 2, 8, 8
_Q, _K, _V = rnd((B, S, N1 * D), 1), rnd((B, S, N1 * D), 2), rnd((B, S, N1 * D), 3)


def _ws(n):
    return torch.empty(n, dtype=torch.uint8) if n else None


def _forward_stage1(out=None, smax=None, ssum=None, **over):
    outs = dict(out=torch.full((B, S, N1 * D), float("nan")) if out is None else out,
                smax=torch.full((B, N1, S, 8), float("nan")) if smax is None else smax,
                ssum=torch.full((B, N1, S, 8), float("nan")) if ssum is None else ssum)
    a = dict(query=_Q, key=_K, value=_V, pse=None, drop=None, pad=None, mask=None, prefix=None, qs=None, ks=None,
             scale=1.0, keep=1.0, pre=I32MAX, nxt=I32MAX, heads=N1, layout="BSH", inner=0, mode=0, ptype=1)
    a.update(over)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(*a.values(), outs["smax"], outs["ssum"], None,
                                                                  outs["out"])
    return st, ws, ex, outs


def _grad_stage1(dq=None, dk=None, dv=None, dpse=None, **over):
    out, smax, ssum = fascore.npu_fusion_attention(_Q, _K, _V, N1, "BSH")[:3]
    grads = dict(dq=torch.empty_like(_Q) if dq is None else dq, dk=torch.empty_like(_K) if dk is None else dk,
                 dv=torch.empty_like(_V) if dv is None else dv)
    a = dict(query=_Q, key=_K, value=_V, dy=torch.ones_like(out), pse=None, drop=None, pad=None, mask=None,
             smax=smax, ssum=ssum, sin=None, ain=out, prefix=None, qs=None, ks=None, scale=1.0, keep=1.0,
             pre=I32MAX, nxt=I32MAX, heads=N1, layout="BSH", inner=0, mode=0, ptype=1)
    a.update(over)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradV2GetWorkspaceSize(*a.values(), grads["dq"], grads["dk"],
                                                                      grads["dv"], dpse)
    return st, ws, ex, grads


def _msg():
    m = aclnn.get_recent_err_msg()
    assert isinstance(m, str) and m
    return m


def test_executor_reused_forward_and_grad():
    st, ws, ex, outs = _forward_stage1()
    assert st == OK and aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None) == OK
    assert aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None) == RUNTIME and "runs once" in _msg()
    st, ws, ex, grads = _grad_stage1()
    assert st == OK and aclnn.aclnnFlashAttentionScoreGradV2(_ws(ws), ws, ex, None) == OK
    assert aclnn.aclnnFlashAttentionScoreGradV2(_ws(ws), ws, ex, None) == RUNTIME and "runs once" in _msg()


def test_run_after_failed_first_stage():
    st, ws, ex, outs = _forward_stage1(mode=42)
    assert st == INVALID and ex is None and ws == 0 and "sparse_mode" in _msg()
    assert aclnn.aclnnFlashAttentionScoreV2(None, ws, ex, None) == NULLPTR and "executor" in _msg()
    assert torch.isnan(outs["out"]).all(), "a failed first stage wrote outputs"
    st, ws, ex, _ = _grad_stage1(heads=3)
    assert st == INVALID and ex is None
    assert aclnn.aclnnFlashAttentionScoreGradV2(None, 0, ex, None) == NULLPTR


@pytest.mark.parametrize("executor", ["string", 0, "grad-for-forward"])
def test_wrong_executor_object(executor):
    if executor == "grad-for-forward":  # executors are interchangeable between the two second stages
        st, ws, ex, _ = _grad_stage1()
        assert aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None) == OK
        return
    assert aclnn.aclnnFlashAttentionScoreV2(None, 0, executor, None) == INVALID and "executor" in _msg()


@pytest.mark.parametrize("kind", ["none", "small", "not-a-tensor", "meta", "expanded"])
def test_bad_workspace(kind):
    st, ws, ex, outs = _forward_stage1()
    assert st == OK
    if ws == 0 and kind in ("none", "small"):
        pytest.skip("workspace_size is 0")
    workspace = {"none": None, "small": _ws(ws - 1) if ws else None, "not-a-tensor": [0] * max(ws, 1),
                 "meta": torch.empty(max(ws, 1), dtype=torch.uint8, device="meta"),
                 "expanded": torch.zeros((), dtype=torch.uint8).expand(max(ws, 1))}[kind]
    want = RUNTIME if kind in ("none", "small") else INVALID
    assert aclnn.aclnnFlashAttentionScoreV2(workspace, ws, ex, None) == want
    assert "workspace" in _msg()
    assert torch.isnan(outs["out"]).all(), "outputs written despite the failure"


@pytest.mark.parametrize("size", [None, 1.5, True, "0", -1])
def test_bad_workspace_size(size):
    st, ws, ex, _ = _forward_stage1()
    code = aclnn.aclnnFlashAttentionScoreV2(_ws(ws), size, ex, None)
    assert code == (RUNTIME if size == -1 else INVALID)  # -1: smaller than the run needs
    assert "workspace" in _msg()


@pytest.mark.parametrize("which", ["out", "smax", "ssum"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "meta", "expanded", "int", "none", "sparse"])
def test_bad_forward_outputs(which, bad):
    ref = {"out": torch.empty(B, S, N1 * D), "smax": torch.empty(B, N1, S, 8), "ssum": torch.empty(B, N1, S, 8)}[which]
    t = {"shape": torch.empty(tuple(ref.shape[:-1]) + (ref.shape[-1] + 1,)), "dtype": ref.double(),
         "meta": torch.empty(ref.shape, device="meta"), "expanded": torch.zeros(()).expand(ref.shape),
         "int": 3, "none": None, "sparse": torch.zeros(ref.shape).to_sparse()}[bad]
    st, ws, ex, _ = _forward_stage1(**{which: t}) if bad != "none" else _forward_none(which)
    assert st == (NULLPTR if bad == "none" else INVALID) and ex is None
    name = {"out": "attentionOutOut", "smax": "softmaxMaxOut", "ssum": "softmaxSumOut"}[which]
    assert name in _msg()


def _forward_none(which):
    outs = dict(out=torch.empty(B, S, N1 * D), smax=torch.empty(B, N1, S, 8), ssum=torch.empty(B, N1, S, 8))
    outs[which] = None
    st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
        _Q, _K, _V, None, None, None, None, None, None, None, 1.0, 1.0, I32MAX, I32MAX, N1, "BSH", 0, 0, 1,
        outs["smax"], outs["ssum"], None, outs["out"])
    return st, ws, ex, outs


@pytest.mark.parametrize("which", ["dq", "dk", "dv"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "meta", "expanded", "int"])
def test_bad_grad_outputs(which, bad):
    ref = torch.empty(B, S, N1 * D)
    t = {"shape": torch.empty(B, S + 1, N1 * D), "dtype": ref.half(), "meta": torch.empty(ref.shape, device="meta"),
         "expanded": torch.zeros(()).expand(ref.shape), "int": 3}[bad]
    st, ws, ex, _ = _grad_stage1(**{which: t})
    assert st == INVALID and ex is None and f"{which}Out" in _msg()


def test_noncontiguous_outputs_are_written():
    out = torch.full((B, S, 2 * N1 * D), float("nan"))[..., ::2]
    st, ws, ex, outs = _forward_stage1(out=out)
    assert st == OK and aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None) == OK
    assert torch.equal(out, fascore.npu_fusion_attention(_Q, _K, _V, N1, "BSH")[0])


def test_garbage_inputs_never_raise():
    """Whatever the arguments, the first stage returns a status (no exception)."""
    garbage = [None, 0, -1, 1.5, "x", [], [None], object(), torch.zeros(()), torch.zeros(0),
               torch.zeros(2, 2, dtype=torch.complex64), torch.empty(3, device="meta")]
    count = 0
    for i in range(23):
        for g in garbage:
            args = [_Q, _K, _V, None, None, None, None, None, None, None, 1.0, 1.0, I32MAX, I32MAX, N1, "BSH",
                    0, 0, 1, torch.empty(B, N1, S, 8), torch.empty(B, N1, S, 8), None, torch.empty(B, S, N1 * D)]
            args[i] = g
            st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(*args)
            assert isinstance(st, int) and st in (OK, NULLPTR, INVALID, RUNTIME)
            assert (ex is None) == (st != OK)
            if st == OK:
                assert aclnn.aclnnFlashAttentionScoreV2(_ws(ws), ws, ex, None) == OK
            count += 1
    assert count == 23 * len(garbage)


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): mixed devices, memory guard on the device
# ----------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("which", ["key", "value", "pse", "atten_mask", "sink", "dropout_mask"])
def test_cuda_and_cpu_tensors_mixed(which):
    dev = torch.device("cuda")
    q, k, v = (rnd((1, 8, 32), i).to(dev) for i in range(3))
    kw = dict(pse=torch.zeros(1, 2, 8, 8, device=dev), atten_mask=torch.zeros(8, 8, dtype=torch.bool, device=dev),
              sink=torch.zeros(2, device=dev), dropout_mask=torch.full((16,), 255, dtype=torch.uint8, device=dev),
              keep_prob=0.5)
    args = dict(key=k, value=v)
    if which in args:
        args[which] = args[which].cpu()
    else:
        kw[which] = kw[which].cpu()
    with pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, args["key"], args["value"], 2, "BSH", **kw)
    assert ei.value.status == INVALID and which in str(ei.value)


@cuda
def test_cuda_memory_guard():
    dev = torch.device("cuda")
    b, n, s, d = 2 * 1024 * 1024, 8, 1024, 128
    q = torch.zeros((), dtype=torch.float16, device=dev).expand(b, n, s, d)
    with pytest.raises(FlashAttentionError) as ei:
        fascore.npu_fusion_attention(q, q, q, n, "BNSD")
    assert ei.value.status == RUNTIME and "cuda" in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Regressions for bugs the fuzzer found (fixed in the flash engine, dropout, the reference)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["strided", "expanded", "permuted"])
def test_gradients_of_non_unit_stride_inputs(style):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 6, 2 * 16, generator=g) for _ in range(3)]
    if style == "strided":
        ins = [t[..., ::2] for t in base]
    elif style == "expanded":
        ins = [t[..., :1].expand(1, 6, 16) for t in base]
    else:
        ins = [t[..., :16].transpose(0, 2).contiguous().transpose(0, 2) for t in base]
    dy = torch.randn(1, 6, 16, generator=g)
    grads = []
    for eng in ("flash", "reference"):
        leaves = [t.detach().requires_grad_(True) for t in ins]
        with fascore.use_engine(eng):
            out = fascore.npu_fusion_attention(*leaves, 2, "BSH", atten_mask=CAUSAL, sparse_mode=2)[0]
            grads.append(torch.autograd.grad(out, leaves, dy))
    for name, a, b in zip(["dq", "dk", "dv"], *grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("offset", [2**63 - 5, 2**63 - 1])
def test_generated_dropout_bits_near_the_top_of_offset(offset):
    sys.path.insert(0, os.path.dirname(__file__))
    from oracle import ascend_keep_bits
    from fascore.canonical.dropout import Dropout

    got = Dropout(0.5, (0,), 4, 16, seed=123, offset=offset).keep(1, 0, 4, 0, 16, torch.device("cpu")).reshape(-1)
    assert torch.equal(got, ascend_keep_bits(123, offset, 0.5, [(4, 16)], 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("style", ["expanded", "permuted"])
def test_half_grad_op_with_non_unit_stride_inputs(dtype, style):
    g = torch.Generator().manual_seed(0)
    if style == "expanded":
        q, k, v = (torch.randn(1, 17, 1, generator=g).to(dtype).expand(1, 17, 16) for _ in range(3))
    else:
        q, k, v = (torch.randn(16, 17, 1, generator=g).to(dtype).permute(2, 1, 0) for _ in range(3))
    out, m, l = fascore.npu_fusion_attention(q, k, v, 1, "BSH")[:3]
    dq, dk, dv, _, _ = fascore.npu_fusion_attention_grad(q, k, v, torch.ones_like(out), 1, "BSH", softmax_max=m,
                                                         softmax_sum=l, attention_in=out)
    with fascore.use_engine("reference"):
        want = fascore.npu_fusion_attention_grad(q, k, v, torch.ones_like(out), 1, "BSH", softmax_max=m,
                                                 softmax_sum=l, attention_in=out)
    for a, b in zip((dq, dk, dv), want[:3]):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
