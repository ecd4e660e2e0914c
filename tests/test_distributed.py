"""fascore.distributed on gloo: ring, Ulysses and hybrid context parallelism against single-process
fascore on the full sequence.

Multi-process tests spawn 2 and 4 processes once each (``_spawn``: a free port, a bounded
deadline; a rank that fails makes the whole run fail at once, with its traceback) and run every
case of ``CASES`` inside those workers; each test then compares one case's unsharded results
(outputs, statistics, dq/dk/dv, and dpse/dsink/rope gradients summed over the ranks) with
single-process ``npu_fusion_attention_v2`` on the full sequence:

- float64 inputs: float32 level (the statistics that carry partial results are float32,
  semantics §2): max |cp - single| <= 1e-5 * max(1, max |single|), invalid-row sentinels exactly;
- float32 / float16 / bfloat16 inputs: semantics §7's rule against the float64 oracle (2x
  outputs/statistics, 3x gradients);
- dropout: every strategy uses the single-process op's mask (same seed, offset, numbering), so
  dropout cases are compared with the single-process op directly (and with keep_prob = 1, which
  must differ).

The matrix covers every strategy x layout x mask kind x GQA x dropout x uneven shards without
the full product (each case names what it covers); the module stays within a few minutes on
two cores.
"""
from __future__ import annotations

import datetime
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

SPAWN_TIMEOUT_S = float(os.environ.get("FASCORE_DIST_TIMEOUT", "420"))
FLT_MAX = 3.4028234663852886e38
SEQ_DIM = {"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2, "TND": 0}
DRAW_SEED_RANK0 = 4321


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
C = "causal"  # the compressed [2048, 2048] mask
DOCS = [11, 0, 17, 6, 13]  # TND documents (an empty one; lengths no chunk count divides), 3 tail rows
KV_DOCS = [7, 4, 20, 6, 16]  # key documents of the kv_docs cases: shorter, keys without queries, longer, equal
CASES = {
    # --- ring, dense layouts
    "ring_bsh_full": dict(layout="BSH"),
    "ring_sbh_causal3_gqa": dict(layout="SBH", n2=2, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_bsnd_causal2_contiguous": dict(layout="BSND", lb="contiguous", kw=dict(atten_mask=C, sparse_mode=2)),
    "ring_bnsd_band_mqa": dict(layout="BNSD", n2=1, kw=dict(atten_mask=C, sparse_mode=4, pre_tokens=6,
                                                              next_tokens=2)),
    "ring_bsh_band_invalid_rows": dict(layout="BSH", kw=dict(atten_mask=C, sparse_mode=4, pre_tokens=9,
                                                             next_tokens=-2)),
    "ring_bsnd_cross_causal3": dict(layout="BSND", skv_extra=8, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_bsh_general_b1_uneven": dict(layout="BSH", uneven=True, kw=dict(atten_mask="mask_b1", sparse_mode=1)),
    "ring_sbh_general_ss_band": dict(layout="SBH", n2=2, kw=dict(atten_mask="mask_ss", sparse_mode=0,
                                                                 pre_tokens=7, next_tokens=3)),
    "ring_bnsd_steps": dict(layout="BNSD", kw=dict(atten_mask="steps:mask_b1", sparse_mode=1)),
    "ring_bsh_causal3_uneven_zigzag": dict(layout="BSH", n2=2, uneven=True, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_bsnd_lengths_dropout": dict(layout="BSND", lb="contiguous", lengths=True,
                                      kw=dict(atten_mask=C, sparse_mode=3, keep_prob=0.8, seed=1234, offset=7)),
    "ring_sbh_dropout_drawn_seed": dict(layout="SBH", n2=1, seed_mode="draw", kw=dict(keep_prob=0.7)),
    "ring_bsh_dropout_seed0_generator": dict(layout="BSH", seed_mode="zero", kw=dict(atten_mask=C, sparse_mode=2,
                                                                                   keep_prob=0.75)),
    "ring_bsh_alibi2_causal": dict(layout="BSH", n2=2, kw=dict(atten_mask=C, sparse_mode=3, pse="slopes",
                                                               pse_type=2)),
    "ring_bnsd_alibi3_start_idx": dict(layout="BNSD", kw=dict(pse="slopes_bn", pse_type=3, q_start_idx=[3],
                                                              kv_start_idx=[1])),
    "ring_bsh_pse_dense_sink": dict(layout="BSH", kw=dict(atten_mask=C, sparse_mode=3, pse="pse_dense",
                                                          sink="sink")),
    "ring_sbh_pse_rows_type0": dict(layout="SBH", kw=dict(pse="pse_rows", pse_type=0)),
    "ring_bsnd_prefix6_rope": dict(layout="BSND", kw=dict(atten_mask="prefix_mask", sparse_mode=6, prefix="prefix",
                                                          query_rope="rope", key_rope="rope")),
    "ring_bnsd_prefix5": dict(layout="BNSD", kw=dict(atten_mask="mask_b1", sparse_mode=5, prefix="prefix")),
    "ring_bsh_causal_f32": dict(layout="BSH", dtype=torch.float32, n2=2, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_sbh_causal_bf16": dict(layout="SBH", dtype=torch.bfloat16, kw=dict(atten_mask=C, sparse_mode=2)),
    "ring_bsnd_band_f16": dict(layout="BSND", dtype=torch.float16, n2=1, kw=dict(atten_mask=C, sparse_mode=4,
                                                                                 pre_tokens=10, next_tokens=3)),
    # --- ring, TND (per-document zigzag, or token ranges)
    "ring_tnd_doc_causal_gqa": dict(layout="TND", n2=2, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_tnd_contiguous_full_tndstats": dict(layout="TND", lb="contiguous", kw=dict(softmax_layout="TND")),
    "ring_tnd_band_dropout": dict(layout="TND", kw=dict(atten_mask=C, sparse_mode=4, pre_tokens=4, next_tokens=1,
                                                        keep_prob=0.8, seed=99, offset=32)),
    "ring_tnd_lengths_causal2_sink": dict(layout="TND", lb="contiguous", lengths=True,
                                          kw=dict(atten_mask=C, sparse_mode=2, sink="sink")),
    "ring_tnd_general_mqa": dict(layout="TND", n2=1, kw=dict(atten_mask="mask_tt", sparse_mode=1)),
    "ring_tnd_steps_tndstats": dict(layout="TND", kw=dict(atten_mask="steps:mask_tt", sparse_mode=1,
                                                          softmax_layout="TND")),
    "ring_tnd_mode7": dict(layout="TND", lb="contiguous", kw=dict(atten_mask=C, sparse_mode=7, pre_tokens=3,
                                                                  next_tokens=0)),
    "ring_tnd_mode8_bf16": dict(layout="TND", dtype=torch.bfloat16, kw=dict(atten_mask=C, sparse_mode=8,
                                                                            pre_tokens=3, next_tokens=0)),
    # --- ring: Sq != Skv under both causal alignments, TND documents with Sq_b != Skv_b, dropout in
    # BNSD, uneven SBH shards, a per-step list with a None entry and a fully masked one
    "ring_bsh_cross_causal2": dict(layout="BSH", skv_extra=8, kw=dict(atten_mask=C, sparse_mode=2)),
    "ring_bnsd_cross_short_causal3": dict(layout="BNSD", skv_extra=-5, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_tnd_cross_docs_causal3_gqa": dict(layout="TND", n2=2, kv_docs=KV_DOCS, kw=dict(atten_mask=C, sparse_mode=3)),
    "ring_tnd_cross_docs_causal2_contiguous": dict(layout="TND", lb="contiguous", kv_docs=KV_DOCS,
                                                   kw=dict(atten_mask=C, sparse_mode=2)),
    "ring_bnsd_dropout_causal2_gqa": dict(layout="BNSD", n2=2, kw=dict(atten_mask=C, sparse_mode=2, keep_prob=0.8,
                                                                       seed=4242, offset=5)),
    "ring_sbh_band_uneven": dict(layout="SBH", uneven=True, kw=dict(atten_mask=C, sparse_mode=4, pre_tokens=7,
                                                                    next_tokens=1)),
    "ring_bsh_steps_none_full": dict(layout="BSH", kw=dict(atten_mask="steps_nf:mask_ss", sparse_mode=0)),
    # --- Ulysses
    "uly_bsh_causal3_gqa": dict(strategy="ulysses", layout="BSH", n2=2, kw=dict(atten_mask=C, sparse_mode=3)),
    "uly_sbh_dropout_b1": dict(strategy="ulysses", layout="SBH", b=1, n2=1,
                               kw=dict(atten_mask=C, sparse_mode=3, keep_prob=0.8, seed=5, offset=3)),
    "uly_bsnd_general_lengths": dict(strategy="ulysses", layout="BSND", lb="contiguous", lengths=True,
                                     kw=dict(atten_mask="mask_b1", sparse_mode=0, pre_tokens=5, next_tokens=5)),
    "uly_bnsd_prefix6_alibi_uneven": dict(strategy="ulysses", layout="BNSD", lb="contiguous", uneven=True,
                                          kw=dict(atten_mask="prefix_mask", sparse_mode=6, prefix="prefix",
                                                  pse="slopes", pse_type=2)),
    "uly_tnd_doc_causal_dropout": dict(strategy="ulysses", layout="TND", lb="contiguous", n2=2,
                                       kw=dict(atten_mask=C, sparse_mode=3, keep_prob=0.85, seed=77)),
    "uly_bsh_sink_rope_pse": dict(strategy="ulysses", layout="BSH", kw=dict(sink="sink", query_rope="rope",
                                                                            key_rope="rope", pse="pse_dense")),
    "uly_tnd_mode8_f32": dict(strategy="ulysses", layout="TND", lb="contiguous", dtype=torch.float32,
                              kw=dict(atten_mask=C, sparse_mode=8, pre_tokens=3, next_tokens=0)),
    # --- hybrid (Ulysses groups of 2 inside ring groups)
    "hyb_bsh_causal3_dropout": dict(strategy="hybrid", layout="BSH", n2=2,
                                    kw=dict(atten_mask=C, sparse_mode=3, keep_prob=0.8, seed=21)),
    "hyb_tnd_doc_causal": dict(strategy="hybrid", layout="TND", kw=dict(atten_mask=C, sparse_mode=3)),
    "hyb_sbh_general_mqa": dict(strategy="hybrid", layout="SBH", n2=1, kw=dict(atten_mask="mask_ss", sparse_mode=1)),
    "hyb_bnsd_steps_uneven": dict(strategy="hybrid", layout="BNSD", uneven=True,
                                  kw=dict(atten_mask="steps:mask_b1", sparse_mode=1)),
    "hyb_bsnd_band_contiguous_drawn": dict(strategy="hybrid", layout="BSND", lb="contiguous", seed_mode="draw",
                                           kw=dict(atten_mask=C, sparse_mode=4, pre_tokens=5, next_tokens=1,
                                                   keep_prob=0.9)),
    # --- Ulysses: band, causal 2 with Sq != Skv, a per-head mask, dropout with B > 1 and a drawn seed
    "uly_sbh_band4_mqa": dict(strategy="ulysses", layout="SBH", n2=1, kw=dict(atten_mask=C, sparse_mode=4,
                                                                            pre_tokens=6, next_tokens=2)),
    "uly_bnsd_cross_short_causal2": dict(strategy="ulysses", layout="BNSD", skv_extra=-5,
                                         kw=dict(atten_mask=C, sparse_mode=2)),
    "uly_bsh_mask_per_head_gqa": dict(strategy="ulysses", layout="BSH", n2=2, kw=dict(atten_mask="mask_bn",
                                                                                    sparse_mode=1)),
    "uly_bsnd_dropout_drawn_b2": dict(strategy="ulysses", layout="BSND", seed_mode="draw",
                                      kw=dict(atten_mask=C, sparse_mode=3, keep_prob=0.8)),
    # --- hybrid with a ring of 2 (4 processes only: at 2 the ring groups have one rank)
    "hyb_bsh_full": dict(strategy="hybrid", layout="BSH", worlds=(4,)),
    "hyb_sbh_cross_causal2_gqa": dict(strategy="hybrid", layout="SBH", n2=2, skv_extra=8, worlds=(4,),
                                      kw=dict(atten_mask=C, sparse_mode=2)),
    "hyb_bsnd_prefix6": dict(strategy="hybrid", layout="BSND", worlds=(4,),
                             kw=dict(atten_mask="prefix_mask", sparse_mode=6, prefix="prefix")),
    "hyb_bnsd_pse_dense_causal3": dict(strategy="hybrid", layout="BNSD", worlds=(4,),
                                       kw=dict(atten_mask=C, sparse_mode=3, pse="pse_dense")),
    "hyb_bsh_mask_per_head_contiguous": dict(strategy="hybrid", layout="BSH", lb="contiguous", worlds=(4,),
                                             kw=dict(atten_mask="mask_bn", sparse_mode=0)),
}
U_SIZE = 2  # Ulysses group size of the hybrid cases


def _geometry(name, world_size):
    c = dict(dict(strategy="ring", dtype=torch.float64, b=2, n1=4, n2=4, d=8, dv=6, dr=4, lb="zigzag", kw={},
                  skv_extra=0, uneven=False, lengths=False, seed_mode=None, worlds=(2, 4), kv_docs=None),
             **CASES[name])
    if c["layout"] == "TND":
        kv_docs = c["kv_docs"] or DOCS
        c["b"], c["s"], c["skv"] = 1, sum(DOCS) + 3, sum(kv_docs) + 3
        from conftest import cumsum
        c["cum"], c["cum_kv"] = cumsum(DOCS), cumsum(kv_docs)
    else:
        c["s"] = 4 * 2 * world_size + (3 if c["uneven"] else 0)
        c["skv"] = c["s"] + c["skv_extra"]
        c["cum"] = c["cum_kv"] = None
    return c


def _cum(c, lay, kv):
    """The TND cumulative lengths of the query-like (kv=False) or key-like tensors (None: dense)."""
    return (c["cum_kv"] if kv else c["cum"]) if lay == "TND" else None


def _rank_lengths(total, world_size):
    """Arbitrary per-rank lengths (contiguous shards): rank r gets about (r + 1) shares."""
    w = [r + 1 for r in range(world_size)]
    out = [total * x // sum(w) for x in w]
    out[-1] += total - sum(out)
    return out


def _make(c, g, n, dd, s):
    b, lay = c["b"], c["layout"]
    x = torch.randn(b, n, s, dd, generator=g, dtype=torch.float64)
    if lay == "BSH":
        x = x.permute(0, 2, 1, 3).reshape(b, s, n * dd)
    elif lay == "SBH":
        x = x.permute(2, 0, 1, 3).reshape(s, b, n * dd)
    elif lay == "BSND":
        x = x.permute(0, 2, 1, 3)
    elif lay == "TND":
        x = x[0].permute(1, 0, 2)
    return x.contiguous().to(c["dtype"])


def _inputs(name, world_size):
    """Full-sequence tensors and keywords of a case (deterministic; symbolic keywords resolved)."""
    c = _geometry(name, world_size)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    b, n1, n2, s, skv = c["b"], c["n1"], c["n2"], c["s"], c["skv"]
    t = dict(q=_make(c, g, n1, c["d"], s), k=_make(c, g, n2, c["d"], skv), v=_make(c, g, n2, c["dv"], skv),
             dy=_make(c, g, n1, c["dv"], s))
    kw = {}
    for key, val in c["kw"].items():
        if val == C:
            val = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        elif val in ("mask_b1", "mask_bn", "mask_ss", "mask_tt") or (isinstance(val, str) and val.startswith("steps")):
            shape = {"mask_b1": (b, 1, s, skv), "mask_bn": (b, n1, s, skv)}.get(val.split(":")[-1], (s, skv))
            m = torch.rand(*shape, generator=g) < 0.3
            m[..., 1, :] = True  # a row nothing takes part in
            if val.startswith("steps_nf:"):  # in every rank's list: its own keys' block fully masked, the next
                qi, ki = _step_index(c, world_size)  # rank's block unmasked (a None entry)
                for r in range(len(qi)):
                    m[..., qi[r][:, None], ki[r]] = True
                    m[..., qi[r][:, None], ki[(r + 1) % len(qi)]] = False
            val = ("steps", m, val.startswith("steps_nf:")) if val.startswith("steps") else m
        elif val == "prefix_mask":
            tri = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
            val = torch.cat([tri, torch.cat([torch.zeros(1024, 1024, dtype=torch.bool),
                                             torch.ones(1024, 1024, dtype=torch.bool)], 1)])
        elif val == "prefix":
            val = [min(skv, 5 + 3 * i) for i in range(b)]
            if c["kw"].get("sparse_mode") == 6:
                val = [max(x, skv - s) for x in val]
        elif val == "slopes":
            val = torch.rand(n1, generator=g).float() * 0.5 + 0.1
        elif val == "slopes_bn":
            val = torch.rand(b, n1, generator=g).float() * 0.5 + 0.1
        elif val == "pse_dense":
            val = torch.randn(1, n1, s, skv, generator=g, dtype=torch.float64).to(c["dtype"])
        elif val == "pse_rows":
            val = torch.randn(b, n1, 1, skv, generator=g, dtype=torch.float64).to(c["dtype"])
        elif val == "sink":
            val = torch.randn(n1, generator=g).float()
        elif val == "rope":
            val = _make(c, g, n1 if key == "query_rope" else n2, c["dr"], s if key == "query_rope" else skv)
        kw[key] = val
    kw["scale"] = 0.35
    if c["layout"] == "TND":
        kw.update(actual_seq_qlen=c["cum"], actual_seq_kvlen=c["cum_kv"])
    return c, t, kw


# ----------------------------------------------------------------------------------------------
# sharding as each strategy expects it
# ----------------------------------------------------------------------------------------------
def _hybrid_ranks(rank):
    return rank // U_SIZE, rank % U_SIZE  # (ring rank, Ulysses rank): hybrid_groups' convention


def _split(c, x, rank, world_size, lay=None, kv=False):
    """This rank's part of a full-sequence tensor (``lay``: another layout for the same cut, e.g.
    "BNSD" for statistics; ``kv``: a key-like tensor, cut by the key documents)."""
    lay = lay or c["layout"]
    cum = _cum(c, lay, kv)
    seq = SEQ_DIM[lay]
    if c["strategy"] == "hybrid":
        rr, ur = _hybrid_ranks(rank)
        rw = world_size // U_SIZE
        part = fd.shard(x, lay, rr, rw, c["lb"], actual_seq_len=cum)
        pcum = fd.shard_seq_lens(cum, rr, rw, c["lb"], total=x.shape[seq]) if cum else None
        return fd.shard(part, lay, ur, U_SIZE, "contiguous", actual_seq_len=pcum)
    if c["lengths"]:
        lens = _rank_lengths(x.shape[seq], world_size)
        return x.narrow(seq, sum(lens[:rank]), lens[rank]).clone()
    lb = "contiguous" if c["strategy"] == "ulysses" else c["lb"]
    return fd.shard(x, lay, rank, world_size, lb, actual_seq_len=cum)


def _unsplit(c, parts, world_size, lay=None, kv=False):
    lay = lay or c["layout"]
    cum = _cum(c, lay, kv)
    if c["strategy"] == "hybrid":
        rw = world_size // U_SIZE
        ring_parts = [fd.unshard(parts[r * U_SIZE:(r + 1) * U_SIZE], lay, "contiguous") for r in range(rw)]
        return fd.unshard(ring_parts, lay, c["lb"], actual_seq_len=cum)
    lb = "contiguous" if c["strategy"] == "ulysses" or c["lengths"] else c["lb"]
    return fd.unshard(parts, lay, lb, actual_seq_len=cum)


def _local_cum(c, rank, world_size):
    """The TND lengths of this rank's rows (those of its statistics' blocks)."""
    cum, total = c["cum"], c["s"]
    if c["strategy"] == "hybrid":
        rr, ur = _hybrid_ranks(rank)
        rw = world_size // U_SIZE
        part_cum = fd.shard_seq_lens(cum, rr, rw, c["lb"], total=total)
        lens = [len(fd.shard(torch.zeros(total, 1, 1), "TND", r, rw, c["lb"], actual_seq_len=cum))
                for r in range(rw)]
        return fd.shard_seq_lens(part_cum, ur, U_SIZE, "contiguous", total=lens[rr])
    if c["lengths"]:
        return fd.shard_seq_lens(cum, rank, world_size, "contiguous", total=total,
                                 lengths=_rank_lengths(total, world_size))
    lb = "contiguous" if c["strategy"] == "ulysses" else c["lb"]
    return fd.shard_seq_lens(cum, rank, world_size, lb, total=total)


def _stats_rows(x, cum, softmax_layout):
    """A TND statistic [T, N, 8] in ``softmax_layout`` over ``cum`` -> row-major [T, N]."""
    if softmax_layout == "TND":
        return x[..., 0]
    t, n, _ = x.shape
    out = x[..., 0].clone()
    flat, prev = x.reshape(-1), 0
    for e in cum:
        out[prev:e] = flat[n * 8 * prev:n * 8 * e].view(n, e - prev, 8)[..., 0].t()
        prev = e
    return out


def _step_index(c, world_size):
    """Global query / key rows of every ring rank's shard, in local order (the per-step masks' order)."""
    lay = "TND" if c["layout"] == "TND" else "BSH"

    def idx(n, r, w, cum):
        x = torch.arange(n, dtype=torch.float64).view(n, 1, 1) if lay == "TND" else torch.arange(
            n, dtype=torch.float64).view(1, n, 1)
        return fd.shard(x, lay, r, w, c["lb"], actual_seq_len=cum).reshape(-1).long()
    w = world_size // U_SIZE if c["strategy"] == "hybrid" else world_size
    return ([idx(c["s"], r, w, c["cum"]) for r in range(w)], [idx(c["skv"], r, w, c["cum_kv"]) for r in range(w)])


def _step_masks(c, steps, rank, world_size):
    """Per-step masks from a global mask: entry j = this rank's query rows x rank j's key rows
    (``steps[2]``: blocks with nothing masked become None entries)."""
    m, none_empty = steps[1], steps[2]
    qi, ki = _step_index(c, world_size)
    me = _hybrid_ranks(rank)[0] if c["strategy"] == "hybrid" else rank
    out = [m[..., qi[me], :][..., ki[j]] for j in range(len(ki))]
    if none_empty:
        out = [None if not bool(e.any()) else e for e in out]
        assert any(e is None for e in out) and any(e is not None and bool(e.all()) for e in out), \
            "no None / fully masked entry"
    return out


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------
def _call(c, q, k, v, kw, groups):
    lay, n1 = c["layout"], c["n1"]
    if c["strategy"] == "ring":
        return fd.ring_attention(q, k, v, n1, lay, load_balance=c["lb"], **kw)
    if c["strategy"] == "ulysses":
        return fd.ulysses_attention(q, k, v, n1, lay, **kw)
    return fd.context_parallel_attention(q, k, v, n1, lay, strategy="hybrid", ulysses_group=groups[0],
                                         ring_group=groups[1], load_balance=c["lb"], **kw)


def _run_case(name, rank, world_size, groups):
    c, t, kw = _inputs(name, world_size)
    qs, ks, vs = (_split(c, t[n], rank, world_size, kv=n != "q").requires_grad_(True) for n in ("q", "k", "v"))
    leaves = {}
    if isinstance(kw.get("pse"), torch.Tensor) and kw.get("pse_type", 1) in (0, 1):
        leaves["pse"] = kw["pse"] = kw["pse"].clone().requires_grad_(True)
    if "sink" in kw:
        leaves["sink"] = kw["sink"] = kw["sink"].clone().requires_grad_(True)
    for key in ("query_rope", "key_rope"):
        if key in kw:
            leaves[key] = kw[key] = _split(c, kw[key], rank, world_size, kv=key == "key_rope").requires_grad_(True)
    if isinstance(kw.get("atten_mask"), tuple):
        kw["atten_mask"] = _step_masks(c, kw["atten_mask"], rank, world_size)
    if c["seed_mode"] == "draw":
        fascore.manual_seed(DRAW_SEED_RANK0 if rank == 0 else 1000 + rank)  # rank 0's draw must win
    elif c["seed_mode"] == "zero":
        fascore.manual_seed(0)  # the generator's seed is 0: resolved once, never drawn again
    out, smax, ssum = _call(c, qs, ks, vs, kw, groups)
    out.backward(_split(c, t["dy"], rank, world_size))
    res = dict(out=out.detach(), smax=smax, ssum=ssum, dq=qs.grad, dk=ks.grad, dv=vs.grad,
               gen_state=fascore.rng.get_rng_state().clone())
    for key, leaf in leaves.items():
        res["d" + key] = leaf.grad
    if c["layout"] == "TND":
        res["cum"] = _local_cum(c, rank, world_size)
    return res


def _errors(rank, world_size, groups):
    """Calls that must raise on every rank (never hang): disagreeing arguments, a shard length
    zigzag does not produce, a bad per-step mask on one rank, heads Ulysses cannot split, a
    per-step mask list whose length is not the ring's (ring, and the hybrid's ring of W / 2)."""
    out = {}
    c, t, kw = _inputs("ring_sbh_causal3_gqa", world_size)
    q, k, v = (_split(c, t[n], rank, world_size) for n in ("q", "k", "v"))
    bad = dict(kw, atten_mask=None, sparse_mode=0) if rank == world_size - 1 else kw
    tries = {
        "mismatch": lambda: fd.ring_attention(q, k, v, 4, "SBH", **bad),
        "zigzag_length": lambda: fd.ring_attention(q[:-3] if rank == 0 else q, k, v, 4, "SBH", **kw),
        "bad_step_mask": lambda: fd.ring_attention(q, k, v, 4, "SBH", sparse_mode=1, atten_mask=[
            torch.zeros(q.shape[0] + (rank == 0), k.shape[0], dtype=torch.bool)] * world_size),
        "ulysses_heads": lambda: fd.ulysses_attention(q[..., :16], k, v, 2, "SBH") if world_size == 4 else
        fd.ulysses_attention(q[..., :24], k[..., :8], v[..., :6], 3, "SBH"),
        "step_list_length": lambda: fd.ring_attention(q, k, v, 4, "SBH", sparse_mode=1,
                                                      atten_mask=[None] * (world_size + 1)),
        "hybrid_step_list_length": lambda: fd.context_parallel_attention(
            q, k, v, 4, "SBH", strategy="hybrid", ulysses_group=groups[0], ring_group=groups[1], sparse_mode=1,
            atten_mask=[None] * world_size),
    }
    for key, fn in tries.items():
        try:
            fn()
            out[key] = "no error"
        except FlashAttentionError as e:
            out[key] = f"{e.status}: {e}"
    return out


def _cases_worker(rank, world_size, names):
    groups = fd.hybrid_groups(U_SIZE) if world_size % U_SIZE == 0 else (None, None)
    res = {name: _run_case(name, rank, world_size, groups) for name in names}
    res["__errors__"] = _errors(rank, world_size, groups)
    return res


_RUNS: dict = {}
CASE_RUNS = [(w, name) for w in (2, 4) for name in CASES if w in _geometry(name, w)["worlds"]]


def _results(world_size):
    if world_size not in _RUNS:
        try:
            _RUNS[world_size] = _spawn(_cases_worker, world_size, ([n for w, n in CASE_RUNS if w == world_size],))
        except Exception as e:  # noqa: BLE001 - reported by every test of this world size
            _RUNS[world_size] = e
    r = _RUNS[world_size]
    if isinstance(r, Exception):
        raise r
    return r


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------
def _assert_close32(what, got, want):
    """float32-level agreement for float64 inputs; sentinels exactly."""
    assert got is not None, f"{what}: no gradient"
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: inf/NaN"
    sent = want.abs() == FLT_MAX
    assert torch.equal(got[sent], want[sent]), f"{what}: invalid-row sentinels differ"
    rest = ~sent
    if rest.any():
        err = (got - want)[rest].abs().max().item()
        tol = 1e-5 * max(1.0, want[rest].abs().max().item())
        assert err <= tol, f"{what}: max|cp - single process| = {err:.3e} > {tol:.1e}"


GRAD_OF = {"dq": "q", "dk": "k", "dv": "v", "dpse": "pse", "dsink": "sink", "dquery_rope": "query_rope",
           "dkey_rope": "key_rope"}


def _leaves(t, kw):
    """Fresh leaf tensors of q, k, v and of kw's differentiable tensors (put back into kw)."""
    leaves = dict(q=t["q"], k=t["k"], v=t["v"])
    for key in ("pse", "sink", "query_rope", "key_rope"):
        if isinstance(kw.get(key), torch.Tensor) and not (key == "pse" and kw.get("pse_type", 1) in (2, 3)):
            leaves[key] = kw[key]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    kw.update({k: v for k, v in leaves.items() if k not in "qkv"})
    return leaves


def _single(c, t, kw, dropout=True):
    """Single-process fascore on the full sequence: outputs, statistics, gradients."""
    kw = dict(kw)
    if isinstance(kw.get("atten_mask"), tuple):
        kw["atten_mask"] = kw["atten_mask"][1]
    if not dropout:
        kw = {k: v for k, v in kw.items() if k not in ("keep_prob", "seed", "offset")}
    leaves = _leaves(t, kw)
    if c["seed_mode"] == "draw":
        fascore.manual_seed(DRAW_SEED_RANK0)
    elif c["seed_mode"] == "zero":
        fascore.manual_seed(0)
    out, smax, ssum = fascore.npu_fusion_attention_v2(leaves["q"], leaves["k"], leaves["v"], c["n1"], c["layout"],
                                                      **kw)[:3]
    out.backward(t["dy"])
    res = dict(out=out.detach(), smax=smax, ssum=ssum)
    for g, name in GRAD_OF.items():
        if name in leaves:
            res[g] = leaves[name].grad
    return res


def _oracle(c, t, kw, dtype):
    from oracle import attention_oracle
    kw = {k: v for k, v in kw.items()}
    leaves = [t[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")]
    out, smax, ssum = attention_oracle(*leaves, c["n1"], c["layout"], dtype=dtype, **kw)
    grads = torch.autograd.grad(out, leaves, t["dy"].to(out.dtype))
    return dict(out=out.detach(), smax=smax, ssum=ssum, dq=grads[0], dk=grads[1], dv=grads[2])


def _gathered(c, results, name, world_size):
    """Every rank's results of a case unsharded (statistics as [B, N, S, 8] or TND rows [T, N])."""
    got = {}
    for key in results[0][name]:
        if key in ("cum", "gen_state"):
            continue
        parts = [r[name][key] for r in results]
        if key in ("dpse", "dsink"):
            got[key] = sum(parts)  # each rank's share (its rows / heads)
        elif key in ("smax", "ssum") and c["layout"] == "TND":
            lay = (c["kw"].get("softmax_layout") or "")
            got[key] = _unsplit(c, [_stats_rows(p, r[name]["cum"], lay) for p, r in zip(parts, results)],
                                world_size)
        elif key in ("smax", "ssum"):
            got[key] = _unsplit(c, parts, world_size, "BNSD")
        else:
            got[key] = _unsplit(c, parts, world_size, kv=key in ("dk", "dv", "dkey_rope"))
    return got


def _want_rows(c, ref):
    if c["layout"] == "TND":
        lay = c["kw"].get("softmax_layout") or ""
        ref = dict(ref, smax=_stats_rows(ref["smax"], c["cum"], lay), ssum=_stats_rows(ref["ssum"], c["cum"], lay))
    return ref


@pytest.mark.parametrize("world_size,name", [pytest.param(w, n, id=f"{n}-{w}") for w, n in CASE_RUNS])
def test_matches_single_process(world_size, name):
    results = _results(world_size)
    c, t, kw = _inputs(name, world_size)
    got = _gathered(c, results, name, world_size)
    assert got["out"].dtype == c["dtype"] and got["dq"].dtype == c["dtype"] and got["dk"].dtype == c["dtype"]
    assert results[0][name]["smax"].dtype == torch.float32 and results[0][name]["smax"].shape[-1] == 8
    if c["seed_mode"] is not None:  # every rank's generator moved as the single-process op's does
        for r in results:
            assert int.from_bytes(bytes(r[name]["gen_state"][8:].tolist()), "little") == 12
    if c["dtype"] == torch.float64:
        want = _want_rows(c, _single(c, t, kw))
        assert set(got) == set(want), f"{name}: gradients {sorted(got)} vs {sorted(want)}"
        for key in want:
            _assert_close32(f"{name} W={world_size} {key}", got[key], want[key])
        if kw.get("keep_prob", 1.0) < 1.0:  # dropout really happened
            assert (_single(c, t, kw, dropout=False)["out"] - got["out"]).abs().max() > 1e-3
        if kw.get("sparse_mode") in (2, 3) and (c["skv"] != c["s"] or c["kv_docs"]):  # the alignment matters
            other = _single(c, t, dict(kw, sparse_mode=5 - kw["sparse_mode"]))["out"]
            assert (other - got["out"]).abs().max() > 1e-3, "top-left and bottom-right causal agree here"
        if name == "ring_bsh_band_invalid_rows":  # global rows 0, 1 see no key
            assert (got["smax"][:, :, :2] == -FLT_MAX).all() and (got["out"][:, :2] == 0).all()
        return
    from conftest import assert_within_rule
    ref = _want_rows(c, _oracle(c, t, kw, torch.float64))
    naive = _want_rows(c, _oracle(c, t, kw, c["dtype"]))
    for key in ("out", "smax", "ssum", "dq", "dk", "dv"):
        nv = naive[key].float() if key in ("smax", "ssum") else naive[key]
        assert_within_rule(f"{name} W={world_size} {key}", got[key], ref[key], nv, c["dtype"],
                           2.0 if key in ("out", "smax", "ssum") else 3.0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_invalid_calls_raise_on_every_rank(world_size):
    want = {"mismatch": "other shapes or arguments", "zigzag_length": "zigzag over",
            "bad_step_mask": "atten_mask", "ulysses_heads": "head_num",
            "step_list_length": f"one entry per rank of the ring ({world_size}), got {world_size + 1}",
            "hybrid_step_list_length": f"one entry per rank of the ring ({world_size // U_SIZE}), got {world_size}"}
    for r in _results(world_size):
        for key, text in want.items():
            msg = r["__errors__"][key]
            assert msg.startswith("161002") and text in msg, f"{key}: {msg}"


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
# single process: sharding, a group of one, the call partition, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,shape,dim", [("BSH", (2, 27, 6), 1), ("SBH", (27, 2, 6), 0),
                                              ("BSND", (2, 27, 3, 2), 1), ("BNSD", (2, 3, 27, 2), 2),
                                              ("TND", (27, 3, 2), 0)])
@pytest.mark.parametrize("lb", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(layout, shape, dim, lb, world_size):
    """Any length (chunks differ by at most one row); TND zigzag cuts every document."""
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    cum = [5, 5, 12, 20] if layout == "TND" else None  # an empty document and 7 tail rows
    shards = [fd.shard(x, layout, r, world_size, lb, actual_seq_len=cum) for r in range(world_size)]
    assert torch.equal(fd.unshard(shards, layout, lb, actual_seq_len=cum), x)
    pos = torch.arange(27).view([-1 if i == dim else 1 for i in range(len(shape))]).expand(shape)
    rows = [fd.shard(pos, layout, r, world_size, lb, actual_seq_len=cum).movedim(dim, 0).reshape(
        s_.shape[dim], -1)[:, 0].tolist() for r, s_ in enumerate(shards)]
    assert sorted(i for r in rows for i in r) == list(range(27))
    if layout != "TND":
        c = 2 * world_size if lb == "zigzag" else world_size
        b = [k * 27 // c for k in range(c + 1)]
        for r, got in enumerate(rows):
            chunks = [r, c - 1 - r] if lb == "zigzag" else [r]
            assert got == [i for ch in chunks for i in range(b[ch], b[ch + 1])]
    else:
        lens = [fd.shard_seq_lens(cum, r, world_size, lb, total=27) for r in range(world_size)]
        for r, got in enumerate(rows):
            assert lens[r][-1] == sum(1 for i in got if i < 20)
            doc_of = [0] * 5 + [2] * 7 + [3] * 8
            assert [sum(1 for i in got if i < 20 and doc_of[i] <= d) for d in range(4)] == lens[r]


def test_shard_errors():
    x = torch.zeros(2, 10, 4)
    with pytest.raises(FlashAttentionError, match="rank=2"):
        fd.shard(x, "BSH", 2, 2, "contiguous")
    with pytest.raises(FlashAttentionError, match="load_balance"):
        fd.shard(x, "BSH", 0, 2, "striped")
    with pytest.raises(FlashAttentionError, match="actual_seq_len"):
        fd.shard(x[0], "TND", 0, 2)
    with pytest.raises(FlashAttentionError, match="exceeds"):
        fd.shard(x[0], "TND", 0, 2, actual_seq_len=[4, 12])
    with pytest.raises(FlashAttentionError, match="sequence axis"):
        fd.unshard([torch.zeros(2, 4, 4), torch.zeros(3, 6, 4)], "BSH")
    with pytest.raises(FlashAttentionError, match="zigzag over"):
        fd.unshard([torch.zeros(2, 2, 4), torch.zeros(2, 6, 4)], "BSH")


@pytest.mark.parametrize("name", ["ring_bsh_full", "ring_sbh_causal3_gqa", "ring_bnsd_band_mqa",
                                  "ring_bsh_general_b1_uneven", "ring_bsh_pse_dense_sink", "ring_bsnd_prefix6_rope",
                                  "ring_tnd_band_dropout", "ring_tnd_lengths_causal2_sink", "uly_bsh_sink_rope_pse",
                                  "uly_tnd_doc_causal_dropout"])
def test_group_of_one_matches_single_process(name):
    """Without torch.distributed initialised every strategy runs as a group of one."""
    c, t, kw = _inputs(name, 1)
    c = dict(c, lengths=False)
    res = _run_case_one(c, t, dict(kw))
    want = _want_rows(c, _single(c, t, kw))
    if c["layout"] == "TND":
        lay = c["kw"].get("softmax_layout") or ""
        res["smax"], res["ssum"] = (_stats_rows(res[k], c["cum"], lay) for k in ("smax", "ssum"))
    for key in want:
        _assert_close32(f"{name} {key}", res[key], want[key])


def _run_case_one(c, t, kw):
    leaves = _leaves(t, kw)
    out, smax, ssum = _call(c, leaves["q"], leaves["k"], leaves["v"], kw, (None, None))
    out.backward(t["dy"])
    res = dict(out=out.detach(), smax=smax, ssum=ssum)
    for g, n in GRAD_OF.items():
        if n in leaves:
            res[g] = leaves[n].grad
    return res


def test_one_call_per_step_when_the_mask_allows(monkeypatch):
    """Zigzag causal in a group of one: both chunks in one call (the whole shard is causal in local
    order); a pure off-diagonal step of W=2 is one column strip; fully masked blocks are skipped."""
    from fascore.distributed import blocks, context, ring as ring_module
    from fascore.distributed.shards import rank_pieces
    calls = []
    real = context.local_forward

    def spy(q, k, v, n, layout, kw):
        calls.append((q.shape[1], k.shape[1], kw.get("sparse_mode", 0), kw.get("pre_tokens"), kw.get("next_tokens")))
        return real(q, k, v, n, layout, kw)
    monkeypatch.setattr(ring_module, "local_forward", spy)
    c, t, kw = _inputs("ring_sbh_causal3_gqa", 1)
    q = t["q"].permute(1, 0, 2)
    fd.ring_attention(q, q[..., :16], q[..., :12], 4, "BSH", atten_mask=kw["atten_mask"], sparse_mode=3)
    assert calls == [(8, 8, 4, 2147483647, 0)]
    spec = fascore.spec.build_problem(torch.zeros(1, 16, 2), torch.zeros(1, 16, 2), torch.zeros(1, 16, 2), 1, "BSH",
                                      atten_mask=kw["atten_mask"], sparse_mode=2).segments[0].mask
    mine, src = rank_pieces([16], 0, 1, 2, "zigzag"), rank_pieces([16], 0, 0, 2, "zigzag")
    rects = blocks.partition(spec, 0, mine, src, False, torch.device("cpu"))  # rank 1 at step 1: keys of rank 0
    assert [(r.kind, r.rq, r.rk, r.c0) for r in rects] == [("full", 8, 4, 0)]  # chunk 3 x chunk 0; chunk 3 is masked
    rects = blocks.partition(spec, 0, src, mine, False, torch.device("cpu"))  # rank 0, keys of rank 1
    assert [(r.kind, r.rq, r.rk, r.a0) for r in rects] == [("full", 4, 8, 4)]  # only chunk 3 of the queries


CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _qkv(s=16, layout="BSH"):
    g = torch.Generator().manual_seed(3)
    shape = (2, s, 8) if layout == "BSH" else (s, 2, 4)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("fn,kw,match", [
    ("ring", dict(pse=torch.zeros(1, 2, 1024, 1040, dtype=torch.float64), atten_mask=CAUSAL, sparse_mode=3, s=1040),
     "compressed"),
    ("ring", dict(pse=torch.ones(2), pse_type=2, s=15), "ALiBi"),
    ("ring", dict(atten_mask=[None, None]), "one entry per rank"),
    ("ring", dict(atten_mask=[None], sparse_mode=4), "per-step list"),
    ("ring", dict(warp_speed=True), "warp_speed"),
    ("ring", dict(load_balance="striped"), "load_balance"),
    ("ring", dict(sparse_mode=4, atten_mask=CAUSAL, pre_tokens=-3, next_tokens=1), "band"),
    ("ring", dict(actual_seq_qlen=[16], actual_seq_kvlen=[16]), "only for layout TND"),
    ("ulysses", dict(atten_mask=[None]), "per-step masks with strategy 'ulysses'"),
    ("cp", dict(strategy="tree"), "strategy='tree'"),
    ("cp", dict(strategy="hybrid"), "ulysses_group and ring_group"),
    ("cp", dict(strategy="ring", ulysses_group=object()), "ulysses_group is only"),
    ("cp", dict(strategy="ulysses", ring_group=object()), "ring_group is only"),
])
def test_unsupported_or_invalid_arguments_raise(fn, kw, match):
    kw = dict(kw)
    q, k, v = _qkv(kw.pop("s", 16))
    call = {"ring": fd.ring_attention, "ulysses": fd.ulysses_attention, "cp": fd.context_parallel_attention}[fn]
    with pytest.raises(FlashAttentionError, match=match) as ei:
        call(q, k, v, 2, "BSH", **kw)
    assert ei.value.status == 161002


def test_sparse_mode_without_mask_is_full_and_warns(monkeypatch):
    from fascore.spec import masks

    monkeypatch.setattr(masks, "_warned_no_mask", False)  # the warning is once per process
    q, k, v = _qkv()
    full = fd.ring_attention(q, k, v, 2, "BSH")[0]
    with pytest.warns(UserWarning, match="nothing is masked"):
        out = fd.ring_attention(q, k, v, 2, "BSH", sparse_mode=3)[0]
    assert torch.equal(out, full)
