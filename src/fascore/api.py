"""torch_npu-compatible entry points (SPEC §1): validate -> canonical problem -> engine -> layout.

``npu_fusion_attention[_v2]`` are differentiable through ``_FusionAttention`` (an
``autograd.Function``) whose backward calls the grad op, as flash-attn layers its interface.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .engine import get_engine
from .errors import invalid, nullptr, runtime
from .layouts import from_bnsd, from_bnsd_copies, tnd_rows, tnd_stats_view, to_bnsd
from .problem import Problem
from .validation import INT32_MAX, Names, build_problem

_V1_NAMES = Names({"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"})
_GRAD_V1_NAMES = Names({"pre_tokens": "pre_tockens", "next_tokens": "next_tockens", "scale": "scale_value"})
_GRAD_V2_NAMES = Names({"scale": "scale_value"})


# --------------------------------------------------------------------------- memory guard
def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without a limit."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CPU: MemAvailable, capped by the cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    if have is None:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cg = _cgroup_headroom()
    return have if cg is None else min(have, cg)


def _restore_bytes(prob: Problem, backward: bool) -> int:
    """Bytes the API allocates around the engine: results in the caller's dtype and layout
    (a copy where the dtype or the layout differs from the engine's [B, N, S, D] float32), the
    [.., 8] statistics, the dpse buffer."""
    item = torch.finfo(prob.dtype).bits // 8
    conv = prob.dtype not in (torch.float32, torch.float64)

    def copies(t: Tensor | None) -> int:  # of one result with the shape of ``t`` [B, N, S, D]
        if prob.layout == "TND":
            return 1 + conv
        return conv + from_bnsd_copies(tuple(t.shape), prob.layout) if t is not None else conv

    if backward:
        (seg,) = prob.segments if prob.layout != "TND" else (None,)
        per = [(seg.q if seg else None, prob.inputs[0]), (seg.k if seg else None, prob.inputs[1]),
               (seg.v if seg else None, prob.inputs[2])]
        need = sum(x.numel() * item * (copies(s4) + (prob.rope is not None)) for s4, x in per)
        need += sum(t.numel() * item * 2 for t in prob.rope) if prob.rope is not None else 0
        return need + (prob.pse.numel() * (4 + item) if prob.pse is not None else 0)
    (seg,) = prob.segments if prob.layout != "TND" else (None,)
    shape = (seg.q.shape[0], prob.n1, seg.q.shape[2], prob.dv) if seg is not None else None
    outs = math.prod(prob.out_shape)
    n = copies(torch.empty(shape, device="meta") if shape else None)
    return outs * item * n + 2 * math.prod(prob.stats_shape) * 4


def check_memory(prob: Problem, backward: bool) -> int:
    """Estimated bytes of a run (what the API allocates around the engine, and the engine's own
    allocations for its largest segment); 361001 if they cannot fit, before any work starts."""
    engine = get_engine()
    need = _restore_bytes(prob, backward)
    need += max((engine.workspace_bytes(s, prob, backward) for s in prob.segments), default=0)
    have = available_memory(prob.device)
    if need > have:
        raise runtime(f"memory: this call needs about {need / 2**30:.2f} GiB on {prob.device} "
                      f"but only {have / 2**30:.2f} GiB is available")
    return need


# --------------------------------------------------------------------------- forward / backward cores
def run_forward(prob: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """(attention_out, softmax_max, softmax_sum) in the caller's layout."""
    check_memory(prob, backward=False)
    engine = get_engine()
    dev = prob.device
    if prob.layout != "TND":
        (seg,) = prob.segments
        o, m, l = engine.forward(seg, prob)
        out = from_bnsd(o.to(prob.dtype), prob.layout)
        smax = m.float().unsqueeze(-1).expand(*m.shape, 8).contiguous()
        ssum = l.float().unsqueeze(-1).expand(*l.shape, 8).contiguous()
        return out, smax, ssum
    out = torch.zeros(prob.out_shape, dtype=prob.dtype, device=dev)
    smax = torch.zeros(prob.stats_shape, dtype=torch.float32, device=dev)
    ssum = torch.zeros(prob.stats_shape, dtype=torch.float32, device=dev)
    for seg in prob.segments:
        bt = seg.batch
        o, m, l = engine.forward(seg, prob)
        out[bt.q0:bt.q0 + bt.sq] = o[0].permute(1, 0, 2).to(prob.dtype)
        tnd_stats_view(smax, bt, prob.n1, prob.softmax_layout)[...] = m[0].float().unsqueeze(-1)
        tnd_stats_view(ssum, bt, prob.n1, prob.softmax_layout)[...] = l[0].float().unsqueeze(-1)
    return out, smax, ssum


def _check_grad_inputs(prob: Problem, dy: Any, attention_in: Any, softmax_max: Any, softmax_sum: Any,
                       nm: Names) -> None:
    for name, t in (("dy", dy), ("softmax_max", softmax_max), ("softmax_sum", softmax_sum),
                    ("attention_in", attention_in)):
        if t is None:
            raise nullptr(nm[name])
        if not isinstance(t, Tensor):
            raise invalid(f"{nm[name]}={t!r}: must be a torch.Tensor")
        if t.device != prob.device:
            raise invalid(f"{nm[name]} is on {t.device} but query is on {prob.device}")
    for name, t in (("dy", dy), ("attention_in", attention_in)):
        if tuple(t.shape) != prob.out_shape or t.dtype != prob.dtype:
            raise invalid(f"{nm[name]} shape {list(t.shape)} dtype {t.dtype}: must be the forward output's "
                          f"shape {list(prob.out_shape)} and dtype {prob.dtype}")
    for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
        if tuple(t.shape) != prob.stats_shape or t.dtype != torch.float32:
            raise invalid(f"{nm[name]} shape {list(t.shape)} dtype {t.dtype}: must be float32 "
                          f"{list(prob.stats_shape)} as the forward returns it")


def run_backward(prob: Problem, dy: Tensor, attention_in: Tensor, softmax_max: Tensor,
                 softmax_sum: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """(dq, dk, dv, dpse, dsink, dq_rope, dk_rope) in the caller's layout and dtypes."""
    check_memory(prob, backward=True)
    engine = get_engine()
    dev, d = prob.device, prob.d
    acc = torch.float64 if prob.dtype == torch.float64 else torch.float32
    dpse = torch.zeros(prob.pse.shape, dtype=acc, device=dev) if prob.pse is not None else None
    dsink = torch.zeros(prob.n1, dtype=torch.float32, device=dev) if prob.sink is not None else None
    results = []
    for seg in prob.segments:
        if prob.layout != "TND":
            dy4, o4 = to_bnsd(dy, prob.layout, prob.n1), to_bnsd(attention_in, prob.layout, prob.n1)
            m, l = softmax_max[..., 0], softmax_sum[..., 0]
        else:
            bt = seg.batch
            dy4, o4 = tnd_rows(dy, bt.q0, bt.sq), tnd_rows(attention_in, bt.q0, bt.sq)
            m = tnd_stats_view(softmax_max, bt, prob.n1, prob.softmax_layout)[..., 0].unsqueeze(0)
            l = tnd_stats_view(softmax_sum, bt, prob.n1, prob.softmax_layout)[..., 0].unsqueeze(0)
        dpse_seg = dpse[seg.pse_rows] if dpse is not None else None
        results.append((seg, engine.backward(seg, prob, dy4, o4, m, l, dpse_seg, dsink)))

    def assemble(idx: int, cols: slice, like: Tensor, rows: str) -> Tensor:
        if prob.layout != "TND":
            return from_bnsd(results[0][1][idx][..., cols].to(prob.dtype), prob.layout)
        buf = torch.zeros_like(like)
        for seg, g in results:
            bt = seg.batch
            r0, n = (bt.q0, bt.sq) if rows == "q" else (bt.k0, bt.skv)
            buf[r0:r0 + n] = g[idx][0, :, :, cols].permute(1, 0, 2).to(prob.dtype)
        return buf

    q, k, v = prob.inputs
    dq = assemble(0, slice(0, d), q, "q")
    dk = assemble(1, slice(0, d), k, "k")
    dv = assemble(2, slice(None), v, "k")
    dqr = dkr = None
    if prob.rope is not None:
        dqr = assemble(0, slice(d, None), prob.rope[0], "q")
        dkr = assemble(1, slice(d, None), prob.rope[1], "k")
    dpse_out = dpse.to(prob.pse.dtype) if dpse is not None else None
    dsink_out = dsink if dsink is not None else torch.empty(0, dtype=torch.float32, device=dev)
    return dq, dk, dv, dpse_out, dsink_out, dqr, dkr


# --------------------------------------------------------------------------- autograd
class _FusionAttention(torch.autograd.Function):
    """Forward runs the engine; backward calls the grad op with the forward's outputs."""

    @staticmethod
    def forward(ctx: Any, prob: Problem, grad_kwargs: dict, query: Tensor, key: Tensor, value: Tensor,
                pse: Tensor | None, sink: Tensor | None, query_rope: Tensor | None,
                key_rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        out, smax, ssum = run_forward(prob)
        ctx.mark_non_differentiable(smax, ssum)
        ctx.save_for_backward(query, key, value, pse, sink, query_rope, key_rope, out, smax, ssum)
        ctx.grad_kwargs = grad_kwargs
        ctx.pse_differentiable = prob.pse is not None
        return out, smax, ssum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple[Any, ...]:
        query, key, value, pse, sink, query_rope, key_rope, out, smax, ssum = ctx.saved_tensors
        kw = ctx.grad_kwargs
        prob = build_problem(query, key, value, kw["head_num"], kw["input_layout"], pse=pse, sink=sink,
                             query_rope=query_rope, key_rope=key_rope, draw_missing_seed=False,
                             **kw["rest"])
        dq, dk, dv, dpse, dsink, dqr, dkr = run_backward(prob, dout.contiguous(), out, smax, ssum)
        return (None, None, dq, dk, dv, dpse if ctx.pse_differentiable else None,
                dsink if sink is not None else None, dqr, dkr)


def _attention(query: Any, key: Any, value: Any, head_num: Any, input_layout: Any, names: Names,
               **kw: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    if _ops.use_ops(query):  # torch.compile / fake tensors: the custom ops (ops.py)
        return _ops.attention(query, key, value, head_num, input_layout, "v1" if names is _V1_NAMES else "v2", **kw)
    prob = build_problem(query, key, value, head_num, input_layout, names=names, **kw)
    pse, sink = kw.get("pse"), kw.get("sink")
    qr, kr = kw.get("query_rope"), kw.get("key_rope")
    diff = [query, key, value, sink, qr, kr] + ([pse] if prob.pse is not None else [])
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in diff):
        rest = {k: v for k, v in kw.items() if k not in ("pse", "sink", "query_rope", "key_rope")}
        rest.update(seed=prob.seed, offset=prob.offset)
        grad_kwargs = {"head_num": head_num, "input_layout": input_layout, "rest": rest}
        out, smax, ssum = _FusionAttention.apply(prob, grad_kwargs, query, key, value, pse, sink, qr, kr)
    else:
        out, smax, ssum = run_forward(prob)
    softmax_out = torch.empty(0, dtype=prob.dtype, device=prob.device)
    return out, smax, ssum, softmax_out, prob.seed, prob.offset, prob.numels


# --------------------------------------------------------------------------- public entry points
def npu_fusion_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                         pse: Tensor | None = None, padding_mask: Tensor | None = None,
                         atten_mask: Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
                         pre_tockens: int = INT32_MAX, next_tockens: int = INT32_MAX, inner_precise: int = 0,
                         prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
                         actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                         sink: Tensor | None = None, dropout_mask: Tensor | None = None, seed: int = 0,
                         offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """FlashAttentionScore, torch_npu's v1 signature (pse_type is 1).

    Shapes (N1 = ``head_num`` query heads, N2 kv heads with N1 % N2 == 0, G = N1 // N2)::

        input_layout   query           key / value                     attention_out
        BSH            [B, Sq, N1*D]   [B, Skv, N2*D] / [B, Skv, N2*Dv]  [B, Sq, N1*Dv]
        SBH            [Sq, B, N1*D]   [Skv, B, N2*D] / [Skv, B, N2*Dv]  [Sq, B, N1*Dv]
        BSND           [B, Sq, N1, D]  [B, Skv, N2, D] / [..., Dv]       [B, Sq, N1, Dv]
        BNSD           [B, N1, Sq, D]  [B, N2, Skv, D] / [..., Dv]       [B, N1, Sq, Dv]
        TND (varlen)   [T1, N1, D]     [T2, N2, D] / [T2, N2, Dv]        [T1, N1, Dv]

    TND needs ``actual_seq_qlen`` / ``actual_seq_kvlen``: cumulative end offsets per batch
    (lengths 2, 3 -> [2, 5]). Dtypes float16 / bfloat16 / float32 (float64 accepted).

    Returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``:
    attention_out in ``input_layout`` with query's dtype; softmax_max / softmax_sum float32
    [B, N1, Sq, 8] (TND: [T1, N1, 8]; the 8 entries are copies); softmax_out an empty tensor;
    seed / offset / numels Python ints (the dropout mask's Philox seed and offset, and its size
    B*N1*Sq*Skv).

    Formula, per batch b and query head n (kv head n // G), float32 accumulation::

        L = (Q K^T + pse) * scale            (v2: pse_type 0 is Q K^T * scale + pse, 2/3 ALiBi)
        L[i, j] = -inf where (i, j) does not take part (sparse_mode, below)
        m_i = max_j L[i, j]    l_i = sum_j exp(L[i, j] - m_i)    (a ``sink`` logit joins both)
        out = (exp(L - m) / l * Z / keep_prob) V      Z: dropout keep mask (keep_prob < 1)
        softmax_max = m, softmax_sum = l; a row where nothing takes part gives out 0,
        softmax_max -FLT_MAX, softmax_sum +FLT_MAX.

    Which (i, j) take part, by ``sparse_mode`` (``atten_mask``: True/1 = masked out; without
    ``atten_mask`` nothing is masked in any mode). d = Skv - Sq. Pictures for Sq = 4, Skv = 6
    (d = 2), row i = query, column j = key, ``#`` takes part, ``.`` masked out::

        sparse_mode=0 defaultMask: mask[i, j] == 0 and -pre <= j - i <= next
                      (atten_mask all zeros, pre_tockens=1, next_tockens=2)
            ###...
            ####..
            .####.
            ..####
        sparse_mode=1 allMask: mask[i, j] == 0, pre/next ignored
                      (atten_mask[i, j] = (i + 2j) % 5 == 0)
            .####.
            ##.###
            ####.#
            #.####
        sparse_mode=2 leftUpCausal: j <= i (compressed [2048, 2048] mask)
            #.....
            ##....
            ###...
            ####..
        sparse_mode=3 rightDownCausal: j <= i + d (compressed mask)
            ###...
            ####..
            #####.
            ######
        sparse_mode=4 band: -pre <= j - i - d <= next (compressed mask; pre_tockens=1, next_tockens=0)
            .##...
            ..##..
            ...##.
            ....##
        sparse_mode=5 prefix: mask[i, j] == 0 and (j <= i + d or j < prefix[b])
                      (full [B, 1, Sq, Skv] mask, here all zeros; prefix=[4])
            ####..
            ####..
            #####.
            ######
        sparse_mode=6 prefix, compressed [3072, 2048] mask: j <= i + d or j < prefix[b] (prefix=[4])
            ####..
            ####..
            #####.
            ######

    TND only, two batches (Sq_b, Skv_b) = (2, 3), (3, 4), i.e. actual_seq_qlen=[2, 5],
    actual_seq_kvlen=[3, 7], drawn on the [T1, T2] = [5, 7] grid (blank: another batch)::

        sparse_mode=7 (varlen mode 3; the last batch is a band, mode 4, pre_tockens=1, next_tockens=0)
            ##.
            ###
               ##..
               .##.
               ..##
        sparse_mode=8 (varlen mode 2; the first batch is a band, mode 4, pre_tockens=1, next_tockens=0)
            ##.
            .##
               #...
               ##..
               ###.

    Differentiable w.r.t. query, key, value, pse and sink (autograd calls the grad op with the
    forward's outputs). Raises ``FlashAttentionError`` (``.status`` = aclnn code) naming the
    parameter, value and rule. Under torch.compile / fake tensors it runs as the custom op
    ``torch.ops.fascore.npu_fusion_attention`` (see ``fascore.ops``). SPEC.md and the README have
    every rule and every [fascore] decision.
    """
    return _attention(query, key, value, head_num, input_layout, _V1_NAMES, pse=pse,
                      padding_mask=padding_mask, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
                      pre_tokens=pre_tockens, next_tokens=next_tockens, inner_precise=inner_precise,
                      prefix=prefix, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                      sparse_mode=sparse_mode, softmax_layout=softmax_layout, sink=sink,
                      dropout_mask=dropout_mask, seed=seed, offset=offset)


def npu_fusion_attention_v2(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                            pse: Tensor | None = None, padding_mask: Tensor | None = None,
                            atten_mask: Tensor | None = None, query_rope: Tensor | None = None,
                            key_rope: Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
                            pre_tokens: int = INT32_MAX, next_tokens: int = INT32_MAX, inner_precise: int = 0,
                            prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
                            actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0,
                            gen_mask_parallel: bool = True, sync: bool = False, pse_type: int = 1,
                            q_start_idx: list[int] | None = None, kv_start_idx: list[int] | None = None,
                            softmax_layout: str = "", sink: Tensor | None = None,
                            dropout_mask: Tensor | None = None, seed: int = 0,
                            offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """FlashAttentionScore, torch_npu's v2 signature: v1 plus ``pse_type``, ``q_start_idx`` /
    ``kv_start_idx`` and ``query_rope`` / ``key_rope``. Same 7-tuple, shapes, mask pictures and
    rules as ``npu_fusion_attention`` (see its docstring); keywords after ``input_layout`` only,
    spelled ``pre_tokens`` / ``next_tokens``.

    pse_type (``pse``'s meaning)::

        0   L = Q K^T * scale + pse             pse: [B|1, N1, Sq|1, Skv] in query's dtype
        1   L = (Q K^T + pse) * scale           (default, as v1)
        2   L = Q K^T * scale - slope[b, n] * |(j + kv_start) - (i + q_start)|
        3   L = Q K^T * scale - slope[b, n] * sqrt(|(j + kv_start) - (i + q_start)|)

    For 2/3 ``pse`` holds float32 ALiBi slopes [B, N1] or [N1] (needs Sq == Skv). With
    ``query_rope`` / ``key_rope`` (both or neither; query's / key's layout with their own head
    dim Dr): Q K^T becomes Q K^T + Qr Kr^T.
    """
    return _attention(query, key, value, head_num, input_layout, Names(), pse=pse,
                      padding_mask=padding_mask, atten_mask=atten_mask, query_rope=query_rope,
                      key_rope=key_rope, scale=scale, keep_prob=keep_prob, pre_tokens=pre_tokens,
                      next_tokens=next_tokens, inner_precise=inner_precise, prefix=prefix,
                      actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                      sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                      kv_start_idx=kv_start_idx, softmax_layout=softmax_layout, sink=sink,
                      dropout_mask=dropout_mask, seed=seed, offset=offset)


def _grad(query: Any, key: Any, value: Any, dy: Any, head_num: Any, input_layout: Any, names: Names,
          softmax_max: Any, softmax_sum: Any, attention_in: Any, numels: Any, **kw: Any) -> tuple:
    if _ops.use_ops(query):  # torch.compile / fake tensors: the custom ops (ops.py)
        return _ops.grad(query, key, value, dy, head_num, input_layout,
                         "grad_v1" if names is _GRAD_V1_NAMES else "grad_v2", softmax_max, softmax_sum,
                         attention_in, numels, **kw)
    prob = build_problem(query, key, value, head_num, input_layout, names=names, draw_missing_seed=False, **kw)
    _check_grad_inputs(prob, dy, attention_in, softmax_max, softmax_sum, names)
    if isinstance(numels, bool) or not isinstance(numels, int) or (numels != 0 and numels != prob.numels):
        raise invalid(f"numels={numels!r}: must be 0 or the forward's mask size {prob.numels}")
    with torch.no_grad():
        return run_backward(prob, dy, attention_in, softmax_max, softmax_sum)


def npu_fusion_attention_grad(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                              input_layout: str, *, pse: Tensor | None = None, padding_mask: Tensor | None = None,
                              atten_mask: Tensor | None = None, softmax_max: Tensor | None = None,
                              softmax_sum: Tensor | None = None, softmax_in: Tensor | None = None,
                              attention_in: Tensor | None = None, scale_value: float = 1.0,
                              keep_prob: float = 1.0, pre_tockens: int = INT32_MAX,
                              next_tockens: int = INT32_MAX, inner_precise: int = 0, seed: int = 0,
                              offset: int = 0, numels: int = 0, prefix: list[int] | None = None,
                              actual_seq_qlen: list[int] | None = None, actual_seq_kvlen: list[int] | None = None,
                              sparse_mode: int = 0, gen_mask_parallel: bool = True, sync: bool = False,
                              softmax_layout: str = "", sink: Tensor | None = None,
                              dropout_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Gradient of ``npu_fusion_attention``: ``(dq, dk, dv, dpse, dsink)``.

    P is rebuilt from ``softmax_max``/``softmax_sum`` and ``attention_in`` is the forward output
    (it is not recomputed). dpse is None without pse; dsink is empty without sink.
    """
    dq, dk, dv, dpse, dsink, _, _ = _grad(
        query, key, value, dy, head_num, input_layout, _GRAD_V1_NAMES, softmax_max, softmax_sum, attention_in,
        numels, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask, scale=scale_value,
        keep_prob=keep_prob, pre_tokens=pre_tockens, next_tokens=next_tockens, inner_precise=inner_precise,
        seed=seed, offset=offset, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, softmax_layout=softmax_layout,
        sink=sink, dropout_mask=dropout_mask)
    return dq, dk, dv, dpse, dsink


def npu_fusion_attention_grad_v2(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                                 input_layout: str, *, pse: Tensor | None = None,
                                 padding_mask: Tensor | None = None, atten_mask: Tensor | None = None,
                                 softmax_max: Tensor | None = None, softmax_sum: Tensor | None = None,
                                 softmax_in: Tensor | None = None, attention_in: Tensor | None = None,
                                 query_rope: Tensor | None = None, key_rope: Tensor | None = None,
                                 scale_value: float = 1.0, keep_prob: float = 1.0,
                                 pre_tokens: int = INT32_MAX, next_tokens: int = INT32_MAX,
                                 inner_precise: int = 0, seed: int = 0, offset: int = 0, numels: int = 0,
                                 prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
                                 actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0,
                                 gen_mask_parallel: bool = True, sync: bool = False, pse_type: int = 1,
                                 q_start_idx: list[int] | None = None, kv_start_idx: list[int] | None = None,
                                 softmax_layout: str = "", sink: Tensor | None = None,
                                 dropout_mask: Tensor | None = None) -> tuple:
    """Gradient of ``npu_fusion_attention_v2``: ``(dq, dk, dv, dpse, dsink)``, plus
    ``(dq_rope, dk_rope)`` when query_rope/key_rope are given. dpse is None for pse_type 2/3."""
    dq, dk, dv, dpse, dsink, dqr, dkr = _grad(
        query, key, value, dy, head_num, input_layout, _GRAD_V2_NAMES, softmax_max, softmax_sum, attention_in,
        numels, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask, query_rope=query_rope,
        key_rope=key_rope, scale=scale_value, keep_prob=keep_prob, pre_tokens=pre_tokens,
        next_tokens=next_tokens, inner_precise=inner_precise, seed=seed, offset=offset, prefix=prefix,
        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
        pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx,
        softmax_layout=softmax_layout, sink=sink, dropout_mask=dropout_mask)
    if query_rope is not None:
        return dq, dk, dv, dpse, dsink, dqr, dkr
    return dq, dk, dv, dpse, dsink


from . import ops as _ops  # noqa: E402  (registers the custom ops; imports this module)
