"""fascore.distributed: shard/unshard, ring attention over torch.distributed (gloo, CPU).

Multi-process tests spawn 2 and 4 processes once each (``_spawn``: a free port, a bounded
deadline; a rank that fails makes the whole run fail at once, with its traceback) and run every
case inside those workers; the per-case tests compare each case's unsharded results with
single-process fascore on the full sequence, or with the float64 oracle:

- float64 inputs: ring and single-process fascore agree to float32 level (SPEC §2's statistics
  are float32, and they are what carries partial results between ring steps and P into backward):
  max |ring - single| <= 1e-5 * max(1, max |single|), invalid-row sentinels exactly;
- float32 / float16 / bfloat16 inputs: SPEC §7's rule against the oracle (2x outputs/statistics, 3x grads);
- dropout: the ring's per-pair masks differ from the single-process op's (documented), so the
  ring's forward and gradients are checked against the oracle's forward and autograd gradients
  computed with the ring's own global keep mask rebuilt from (seed, offset) by the independent
  Philox of tests/oracle.py, plus the kept fraction.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fascore
from fascore import FlashAttentionError
from fascore import distributed as fd

SPAWN_TIMEOUT_S = float(os.environ.get("FASCORE_DIST_TIMEOUT", "240"))
INT32_MAX = 2147483647


# ----------------------------------------------------------------------------------------------
# process harness
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, outdir, args):
    """Process body: join the gloo group, run fn, save its result; on failure write the traceback."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        res = fn(rank, world_size, *args)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt.tmp"))
        os.replace(os.path.join(outdir, f"rank{rank}.pt.tmp"), os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _spawn(fn, world_size, args=(), timeout=SPAWN_TIMEOUT_S):
    """Run fn(rank, world_size, *args) in world_size spawned processes; returns the per-rank results.

    Raises RuntimeError as soon as any rank exits with an error (the others are terminated), or
    when the deadline passes; never hangs.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, outdir, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while True:
                codes = [p.exitcode for p in procs]
                if all(c == 0 for c in codes):
                    break
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    msgs = []
                    for r in bad:
                        path = os.path.join(outdir, f"rank{r}.err")
                        text = open(path).read() if os.path.exists(path) else f"exit code {codes[r]}"
                        msgs.append(f"--- rank {r} ---\n{text}")
                    failure = f"{len(bad)} of {world_size} ranks failed:\n" + "\n".join(msgs)
                    break
                if time.monotonic() > deadline:
                    failure = f"timeout after {timeout:.0f}s; exit codes {codes}"
                    break
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        if failure:
            raise RuntimeError(failure)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------------------------
# cases (built identically in workers and in the parent)
# ----------------------------------------------------------------------------------------------
CASES = {
    # name: geometry + npu_fusion_attention_v2 keywords ("causal" = the compressed mask, "slopes")
    "full_bsh": dict(layout="BSH", n1=2, n2=2),
    "causal3_sbh_gqa": dict(layout="SBH", n1=4, n2=2, kw=dict(atten_mask="causal", sparse_mode=3)),
    "causal2_bsnd_contiguous": dict(layout="BSND", lb="contiguous", kw=dict(atten_mask="causal", sparse_mode=2)),
    "band_bnsd_mqa": dict(layout="BNSD", n1=2, n2=1,
                          kw=dict(atten_mask="causal", sparse_mode=4, pre_tokens=6, next_tokens=2)),
    "band_below_diag_bsh": dict(layout="BSH",  # rows 0-1 see nothing: invalid rows
                                kw=dict(atten_mask="causal", sparse_mode=4, pre_tokens=9, next_tokens=-2)),
    "causal3_cross_bsnd": dict(layout="BSND", skv=+8, kw=dict(atten_mask="causal", sparse_mode=3)),  # Skv > Sq
    "band_contiguous_sbh": dict(layout="SBH", lb="contiguous",
                                kw=dict(atten_mask="causal", sparse_mode=4, pre_tokens=3, next_tokens=11)),
    "alibi2_causal_bsh": dict(layout="BSH", n1=4, n2=2,
                              kw=dict(atten_mask="causal", sparse_mode=3, pse="slopes", pse_type=2)),
    "alibi3_full_bnsd": dict(layout="BNSD", kw=dict(pse="slopes_bn", pse_type=3, q_start_idx=[3],
                                                    kv_start_idx=[1])),
    "causal_bsh_f32": dict(layout="BSH", dtype=torch.float32, n1=4, n2=2,
                           kw=dict(atten_mask="causal", sparse_mode=3)),
    "causal_sbh_bf16": dict(layout="SBH", dtype=torch.bfloat16, kw=dict(atten_mask="causal", sparse_mode=2)),
    "band_bsnd_f16": dict(layout="BSND", dtype=torch.float16, n1=4, n2=1,
                          kw=dict(atten_mask="causal", sparse_mode=4, pre_tokens=10, next_tokens=3)),
    "dropout_causal_bsh": dict(layout="BSH", n1=4, n2=2,
                               kw=dict(atten_mask="causal", sparse_mode=3, keep_prob=0.8, seed=1234, offset=7)),
    "dropout_drawn_seed_bnsd": dict(layout="BNSD", kw=dict(keep_prob=0.7)),
}
DRAW_SEED_RANK0 = 4321  # fascore.manual_seed on rank 0 before a call with seed=0


def _geometry(case, world_size):
    c = dict(dict(dtype=torch.float64, b=2, n1=2, n2=2, s=8 * world_size * 2, d=8, dv=6, lb="zigzag",
                  scale=0.35, kw={}, skv=0), **case)
    c["skv"] = c["s"] + c["skv"] * world_size * 2  # key rows: s plus skv per chunk
    return c


def _inputs(name, world_size):
    """Full-sequence q, k, v, dy and keywords of a case (deterministic)."""
    c = _geometry(CASES[name], world_size)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    b, n1, n2, s, d, dv, lay = c["b"], c["n1"], c["n2"], c["s"], c["d"], c["dv"], c["layout"]

    def make(n, dd, s=s):
        x = torch.randn(b, n, s, dd, generator=g, dtype=torch.float64)
        if lay == "BSH":
            x = x.permute(0, 2, 1, 3).reshape(b, s, n * dd)
        elif lay == "SBH":
            x = x.permute(2, 0, 1, 3).reshape(s, b, n * dd)
        elif lay == "BSND":
            x = x.permute(0, 2, 1, 3)
        return x.contiguous().to(c["dtype"])
    q, k, v, dy = make(n1, d), make(n2, d, c["skv"]), make(n2, dv, c["skv"]), make(n1, dv)
    kw = dict(c["kw"], scale=c["scale"])
    if kw.get("atten_mask") == "causal":
        kw["atten_mask"] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    if kw.get("pse") == "slopes":
        kw["pse"] = torch.rand(n1, generator=g).float() * 0.5 + 0.1
    elif kw.get("pse") == "slopes_bn":
        kw["pse"] = torch.rand(b, n1, generator=g).float() * 0.5 + 0.1
    return c, q, k, v, dy, kw


def _run_ring(name, rank, world_size):
    c, q, k, v, dy, kw = _inputs(name, world_size)
    lay, lb = c["layout"], c["lb"]
    qs, ks, vs = (fd.shard(t, lay, rank, world_size, lb).requires_grad_(True) for t in (q, k, v))
    if kw.get("keep_prob", 1.0) < 1.0 and "seed" not in kw:
        fascore.manual_seed(DRAW_SEED_RANK0 if rank == 0 else 1000 + rank)  # rank 0's draw must win
    out, smax, ssum = fd.ring_attention(qs, ks, vs, c["n1"], lay, load_balance=lb, **kw)
    out.backward(fd.shard(dy, lay, rank, world_size, lb))
    return dict(out=out.detach(), smax=smax, ssum=ssum, dq=qs.grad, dk=ks.grad, dv=vs.grad)


def _cases_worker(rank, world_size, names):
    res = {name: _run_ring(name, rank, world_size) for name in names}
    # ranks that disagree on the arguments: every rank raises, nobody hangs
    c, q, k, v, _, kw = _inputs("causal3_sbh_gqa", world_size)
    if rank == world_size - 1:
        kw = dict(kw, atten_mask=None, sparse_mode=0)
    try:
        fd.ring_attention(*(fd.shard(t, "SBH", rank, world_size) for t in (q, k, v)), c["n1"], "SBH", **kw)
        res["__mismatch__"] = "no error"
    except FlashAttentionError as e:
        res["__mismatch__"] = f"{e.status}: {e}"
    return res


_RUNS: dict = {}


def _ring_results(world_size):
    if world_size not in _RUNS:
        try:
            _RUNS[world_size] = _spawn(_cases_worker, world_size, (list(CASES),))
        except Exception as e:  # noqa: BLE001 - reported by every test of this world size
            _RUNS[world_size] = e
    r = _RUNS[world_size]
    if isinstance(r, Exception):
        raise r
    return r


def _gathered(results, name, key, c):
    lay = "BNSD" if key in ("smax", "ssum") else c["layout"]
    return fd.unshard([r[name][key] for r in results], lay, c["lb"])


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------
FLT_MAX = 3.4028234663852886e38


def _assert_close32(what, got, want):
    """float32-level agreement for float64 inputs; sentinels exactly."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: inf/NaN"
    sent = want.abs() == FLT_MAX
    assert torch.equal(got[sent], want[sent]), f"{what}: invalid-row sentinels differ"
    rest = ~sent
    if rest.any():
        err = (got - want)[rest].abs().max().item()
        tol = 1e-5 * max(1.0, want[rest].abs().max().item())
        assert err <= tol, f"{what}: max|ring - reference| = {err:.3e} > {tol:.1e}"


def _single(c, q, k, v, dy, kw):
    """Single-process fascore on the full sequence: outputs, statistics, gradients."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, smax, ssum = fascore.npu_fusion_attention_v2(q, k, v, c["n1"], c["layout"], **kw)[:3]
    out.backward(dy)
    return dict(out=out.detach(), smax=smax, ssum=ssum, dq=q.grad, dk=k.grad, dv=v.grad)


def _ring_dropout_keep(c, kw, seed, world_size):
    """The global [B, N1, Sq, Skv] keep mask of the ring's per-pair Philox streams (tests/oracle.py)."""
    from oracle import ascend_keep_bits
    b, n1, s = c["b"], c["n1"], c["s"]
    nch = 2 * world_size if c["lb"] == "zigzag" else world_size
    cs = s // nch
    keep = torch.zeros(b, n1, s, s, dtype=torch.bool)
    for a in range(nch):
        for bb in range(nch):
            off = fd.pair_dropout_offset(kw.get("offset", 0), a, bb, nch, b, n1, cs, cs)
            assert off == kw.get("offset", 0) + (a * nch + bb) * b * n1 * cs * (16 * math.ceil(cs / 16))
            bits = ascend_keep_bits(seed, off, kw["keep_prob"], [(cs, cs)] * b, n1).view(b, n1, cs, cs)
            keep[:, :, a * cs:(a + 1) * cs, bb * cs:(bb + 1) * cs] = bits
    return keep


def _oracle_with_grads(c, q, k, v, dy, kw, dtype):
    from oracle import attention_oracle
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, smax, ssum = attention_oracle(*leaves, c["n1"], c["layout"], dtype=dtype, **kw)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return dict(out=out.detach(), smax=smax, ssum=ssum, dq=grads[0], dk=grads[1], dv=grads[2])


# ----------------------------------------------------------------------------------------------
# multi-process tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_matches_full_sequence(world_size, name):
    results = _ring_results(world_size)
    c, q, k, v, dy, kw = _inputs(name, world_size)
    ring = {key: _gathered(results, name, key, c) for key in ("out", "smax", "ssum", "dq", "dk", "dv")}
    assert ring["out"].dtype == c["dtype"] and ring["dq"].dtype == c["dtype"] and ring["dk"].dtype == c["dtype"]
    assert ring["smax"].dtype == torch.float32 and tuple(ring["smax"].shape) == (c["b"], c["n1"], c["s"], 8)
    if kw.get("keep_prob", 1.0) < 1.0:
        seed = kw.get("seed")
        if seed is None:  # rank 0's generator (seed, offset 0) broadcast
            seed = DRAW_SEED_RANK0
        keep = _ring_dropout_keep(c, kw, seed, world_size)
        frac = keep.double().mean().item()
        sigma = math.sqrt(kw["keep_prob"] * (1 - kw["keep_prob"]) / keep.numel())
        assert abs(frac - kw["keep_prob"]) < 5 * sigma, f"kept fraction {frac:.4f} vs keep_prob {kw['keep_prob']}"
        from oracle import pack_bits
        okw = {k_: v_ for k_, v_ in kw.items() if k_ not in ("seed", "offset")}
        ref = _oracle_with_grads(c, q, k, v, dy, dict(okw, dropout_mask=pack_bits(keep)), torch.float64)
        # the ring's result is not the single-process op's (different bits) ...
        single = _single(c, q, k, v, dy, dict(okw, seed=seed, offset=kw.get("offset", 0)))
        assert (single["out"] - ring["out"]).abs().max() > 1e-3
        for key in ring:  # ... but it is exact dropout attention with the ring's mask
            _assert_close32(f"{name} W={world_size} {key}", ring[key], ref[key])
        return
    if c["dtype"] == torch.float64:
        single = _single(c, q, k, v, dy, kw)
        for key in ring:
            _assert_close32(f"{name} W={world_size} {key}", ring[key], single[key])
        if name == "band_below_diag_bsh":  # global rows 0, 1 are invalid
            assert (ring["smax"][:, :, :2] == -FLT_MAX).all() and (ring["ssum"][:, :, :2] == FLT_MAX).all()
            assert (ring["smax"][:, :, 2:] > -FLT_MAX).all()
            assert (ring["out"][:, :2] == 0).all() and (ring["dq"][:, :2] == 0).all()
        return
    from conftest import assert_within_rule
    ref = _oracle_with_grads(c, q, k, v, dy, kw, torch.float64)
    naive = _oracle_with_grads(c, q, k, v, dy, kw, c["dtype"])
    for key in ring:
        nv = naive[key].float() if key in ("smax", "ssum") else naive[key]
        assert_within_rule(f"{name} W={world_size} {key}", ring[key], ref[key], nv, c["dtype"],
                           2.0 if key in ("out", "smax", "ssum") else 3.0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_with_different_arguments_all_raise(world_size):
    for r in _ring_results(world_size):
        assert r["__mismatch__"].startswith("161002") and "other shapes or arguments" in r["__mismatch__"]


def _fail_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        raise ValueError("deliberate failure on the last rank")
    dist.barrier()  # the others would wait here for gloo's 60 s timeout
    return rank


def test_failing_rank_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="deliberate failure on the last rank"):
        _spawn(_fail_on_last_rank, 2, timeout=120)
    assert time.monotonic() - t0 < 50


# ----------------------------------------------------------------------------------------------
# single process: sharding, a group of one, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,shape,dim", [("BSH", (2, 24, 6), 1), ("SBH", (24, 2, 6), 0),
                                              ("BSND", (2, 24, 3, 2), 1), ("BNSD", (2, 3, 24, 2), 2)])
@pytest.mark.parametrize("lb", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(layout, shape, dim, lb, world_size):
    x = torch.arange(math.prod(shape), dtype=torch.float32).view(shape)
    shards = [fd.shard(x, layout, r, world_size, lb) for r in range(world_size)]
    assert torch.equal(fd.unshard(shards, layout, lb), x)
    pos = torch.arange(24).view([-1 if i == dim else 1 for i in range(len(shape))]).expand(shape)
    for r, s_ in enumerate(shards):
        got = fd.shard(pos, layout, r, world_size, lb).movedim(dim, 0).reshape(s_.shape[dim], -1)[:, 0].tolist()
        c = 24 // (2 * world_size) if lb == "zigzag" else 24 // world_size
        chunks = [r, 2 * world_size - 1 - r] if lb == "zigzag" else [r]
        assert got == [i for ch in chunks for i in range(ch * c, (ch + 1) * c)]


def test_shard_errors():
    x = torch.zeros(2, 10, 4)
    with pytest.raises(FlashAttentionError, match="multiple of 4"):
        fd.shard(x, "BSH", 0, 2)  # zigzag over 2 ranks: 4 chunks
    with pytest.raises(FlashAttentionError, match="rank=2"):
        fd.shard(x, "BSH", 2, 2, "contiguous")
    with pytest.raises(FlashAttentionError, match="load_balance"):
        fd.shard(x, "BSH", 0, 2, "striped")
    with pytest.raises(FlashAttentionError, match="TND"):
        fd.shard(x, "TND", 0, 2)
    with pytest.raises(FlashAttentionError, match="one shape"):
        fd.unshard([torch.zeros(2, 4, 4), torch.zeros(2, 6, 4)], "BSH")


@pytest.mark.parametrize("name", ["full_bsh", "causal3_sbh_gqa", "band_bnsd_mqa", "band_below_diag_bsh",
                                  "causal3_cross_bsnd",
                                  "alibi2_causal_bsh", "alibi3_full_bnsd", "band_contiguous_sbh"])
def test_group_of_one_matches_single_process(name):
    """Without torch.distributed initialised the ring is one rank: the pair decomposition alone."""
    c, q, k, v, dy, kw = _inputs(name, 1)
    lay, lb = c["layout"], c["lb"]
    qs, ks, vs = (fd.shard(t, lay, 0, 1, lb).requires_grad_(True) for t in (q, k, v))
    out, smax, ssum = fd.ring_attention(qs, ks, vs, c["n1"], lay, load_balance=lb, **kw)
    out.backward(fd.shard(dy, lay, 0, 1, lb))
    ring = dict(out=out, smax=smax, ssum=ssum, dq=qs.grad, dk=ks.grad, dv=vs.grad)
    single = _single(c, q, k, v, dy, kw)
    for key, t in ring.items():
        _assert_close32(f"{name} {key}", fd.unshard([t], "BNSD" if key in ("smax", "ssum") else lay, lb), single[key])


def _qkv(layout="BSH", s=16):
    c, q, k, v, dy, kw = _inputs("full_bsh", 1)
    return q[:, :s], k[:, :s], v[:, :s]


CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


@pytest.mark.parametrize("kw,match", [
    (dict(sparse_mode=1, atten_mask=torch.zeros(16, 16, dtype=torch.bool)), "sparse_mode=1"),
    (dict(sparse_mode=0, atten_mask=torch.zeros(16, 16, dtype=torch.bool)), "cannot be split"),
    (dict(sparse_mode=6, atten_mask=CAUSAL, prefix=[4, 4]), "prefix"),
    (dict(sparse_mode=8, atten_mask=CAUSAL), "sparse_mode=8"),
    (dict(pse=torch.zeros(2, 2, 16, 16, dtype=torch.float64)), "pse"),
    (dict(pse=torch.zeros(2, 2, 16, 16, dtype=torch.float64), pse_type=0), "pse"),
    (dict(sink=torch.zeros(2)), "sink"),
    (dict(query_rope=torch.zeros(2, 16, 4, dtype=torch.float64)), "rope"),
    (dict(dropout_mask=torch.zeros(100, dtype=torch.uint8), keep_prob=0.5), "dropout_mask"),
    (dict(actual_seq_qlen=[16], actual_seq_kvlen=[16]), "TND"),
    (dict(sparse_mode=4, atten_mask=CAUSAL, pre_tokens=-3, next_tokens=1), "band empty"),
    (dict(sparse_mode=3, atten_mask=torch.ones(2048, 2048, dtype=torch.bool)), "atten_mask"),
    (dict(sparse_mode=4, atten_mask=torch.ones(2048, 2048, dtype=torch.bool), pre_tokens=99, next_tokens=99),
     "atten_mask"),  # no pair needs the mask, it is still checked
    (dict(scale=float("nan")), "scale"),
    (dict(keep_prob=0.0), "keep_prob"),
    (dict(softmax_layout="TND"), "softmax_layout"),
    (dict(pse_type=7), "pse_type"),
    (dict(pre_tokens=2**40), "pre_tokens"),
    (dict(warp_speed=True), "warp_speed"),
])
def test_unsplittable_or_invalid_arguments_raise(kw, match):
    q, k, v = _qkv()
    with pytest.raises(FlashAttentionError, match=match) as ei:
        fd.ring_attention(q, k, v, 2, "BSH", **kw)
    assert ei.value.status == 161002


def test_layout_and_length_errors():
    q, k, v = _qkv()
    with pytest.raises(FlashAttentionError, match="TND"):
        fd.ring_attention(q[0], k[0], v[0], 2, "TND")
    with pytest.raises(FlashAttentionError, match="multiple of 2"):
        fd.ring_attention(q[:, :15], k[:, :15], v[:, :15], 2, "BSH")  # zigzag: two chunks per rank
    with pytest.raises(FlashAttentionError, match="load_balance"):
        fd.ring_attention(q, k, v, 2, "BSH", load_balance="random")
    with pytest.raises(FlashAttentionError, match="head_num"):
        fd.ring_attention(q, k, v, 3, "BSH")
    with pytest.raises(FlashAttentionError, match="Sq == Skv"):
        fd.ring_attention(q, k[:, :8], v[:, :8], 2, "BSH", pse=torch.ones(2), pse_type=2)
    with pytest.raises(FlashAttentionError, match="group"):
        fd.ring_attention(q, k, v, 2, "BSH", group=object())


def test_sparse_mode_without_mask_is_full_and_warns():
    q, k, v = _qkv()
    full = fd.ring_attention(q, k, v, 2, "BSH")[0]
    with pytest.warns(UserWarning, match="nothing is masked"):
        out = fd.ring_attention(q, k, v, 2, "BSH", sparse_mode=3)[0]
    assert torch.equal(out, full)


def test_cross_lengths_causal_group_of_one():
    """Sq != Skv (bottom-right causal, mode 3) through the pair decomposition."""
    q, k, v = _qkv()
    c, _, k2, v2, _, _ = _inputs("full_bsh", 1)
    k2, v2 = k2[:, :24], v2[:, :24]
    for mode in (2, 3):
        ring = fd.ring_attention(q, k2, v2, 2, "BSH", atten_mask=CAUSAL, sparse_mode=mode, scale=0.3)
        single = fascore.npu_fusion_attention_v2(q, k2, v2, 2, "BSH", atten_mask=CAUSAL, sparse_mode=mode,
                                                 scale=0.3)
        lb_out = fd.unshard([ring[0]], "BSH")
        _assert_close32(f"mode {mode} out", lb_out, single[0])
        _assert_close32(f"mode {mode} max", fd.unshard([ring[1]], "BNSD"), single[1])


def test_pairs_skip_fully_masked_and_unmask_fully_visible(monkeypatch):
    """Zigzag causal in a group of one: chunk pairs (0,0) and (1,1) are diagonal (band through
    sparse_mode 4), (1,0) fully visible (no mask), (0,1) fully masked (never computed)."""
    from fascore.distributed import ring as ring_module
    calls = []
    real = ring_module.npu_fusion_attention_v2

    def spy(q, k, v, n, layout, **kw):
        calls.append((kw.get("sparse_mode", 0), kw.get("atten_mask") is not None, kw.get("pre_tokens"),
                      kw.get("next_tokens")))
        return real(q, k, v, n, layout, **kw)
    monkeypatch.setattr(ring_module, "npu_fusion_attention_v2", spy)
    q, k, v = _qkv()
    fd.ring_attention(q, k, v, 2, "BSH", atten_mask=CAUSAL, sparse_mode=3)
    assert calls == [(4, True, 8, 0), (0, False, None, None), (4, True, 8, 0)]
