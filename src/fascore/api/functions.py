"""The torch_npu entry points (semantics §1): validate -> canonical problem -> engine -> restore.

Each public function is generated from its declaration in ``fascore.params`` (names, order,
defaults, keyword-only marker, spellings), so its signature is torch_npu's by construction; its
body maps the caller's spellings to canonical names and calls the implementation here. The
forward entry points are differentiable (``api.autograd``); under torch.compile and fake
tensors they run as custom ops (``api.ops``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import lint
from ..errors import invalid
from ..params import ENTRY_POINTS, REQUIRED, EntryPoint
from ..spec import build_problem, check_grad_inputs, check_numels, problem_args
from . import ops
from .autograd import attention_with_grad
from .run import run_backward

__all__ = ["npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
           "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3"]


def _as_int(t: Any) -> Any:
    """v3 passes seed / offset as int64 tensors."""
    return int(t.reshape(-1)[0]) if isinstance(t, Tensor) else (0 if t is None else t)


_V3_TENSORS = ("actual_seq_qlen", "actual_seq_kvlen", "seed", "offset")


def _v3_traced(ep: EntryPoint, kw: dict[str, Any]) -> dict[str, Any]:
    """v3 / grad_v3 on fake tensors: their tensor arguments cannot be read there.

    Under ``FakeTensorMode`` only shapes are computed, and none depends on the sequence lengths'
    or seed's values (v3 returns no numels), so fake lengths become the placeholders [T1] / [T2]
    and a fake seed / offset 0. Under torch.compile they would have to be read inside the graph,
    which fascore's custom ops (int lists, int seed) cannot do: that is an error.
    """
    if not ops.use_ops_traced(kw["query"]):
        return kw
    given = [n for n in _V3_TENSORS if isinstance(kw.get(n), Tensor)]
    if given and torch.compiler.is_compiling():
        raise invalid(f"{', '.join(given)} as tensors under torch.compile: fascore's custom ops take sequence "
                      f"lengths as Python lists and seed/offset as ints; call {ep.name} with lists (or outside the "
                      "compiled region)")
    out = dict(kw)
    for n in given:
        if ops._is_fake(kw[n]):
            if n in ("seed", "offset"):
                out[n] = 0
            else:
                out[n] = [kw["query" if n == "actual_seq_qlen" else "key"].shape[0]]
    return out


def _forward(ep: EntryPoint, kw: dict[str, Any]) -> tuple:
    if ep.name == "npu_fusion_attention_v3":
        kw = _v3_traced(ep, kw)
    if ops.use_ops(kw["query"]):  # torch.compile / fake tensors: the custom op
        res = ops.attention(ep, kw)
    else:
        args = problem_args(kw)
        prob = build_problem(**args, names=ep.names)
        lint.check(prob, args, ep.names)  # guard rails: warn (or raise) on probable porting mistakes
        out, smax, ssum = attention_with_grad(prob, args)
        softmax_out = torch.empty(0, dtype=prob.dtype, device=prob.device)
        res = (out, smax, ssum, softmax_out, prob.seed, prob.offset, prob.numels)
    if ep.name == "npu_fusion_attention_v3":  # seed and offset as int64 [1] tensors, no numels
        dev = res[0].device
        return (*res[:4], torch.tensor([res[4] - (1 << 64) if res[4] >= 1 << 63 else res[4]], device=dev),
                torch.tensor([res[5]], device=dev))
    return res


def _grad(ep: EntryPoint, kw: dict[str, Any]) -> tuple:
    if ep.name == "npu_fusion_attention_grad_v3":
        kw = _v3_traced(ep, kw)
        kw = dict(kw, seed=_as_int(kw["seed"]), offset=_as_int(kw["offset"]))
    if ops.use_ops(kw["query"]):  # torch.compile / fake tensors: the custom op
        g = ops.grad(ep, kw)
    else:
        prob = build_problem(**problem_args(kw), names=ep.names, draw_missing_seed=False)
        check_grad_inputs(prob, kw["dy"], kw["attention_in"], kw["softmax_max"], kw["softmax_sum"], ep.names)
        check_numels(prob, kw.get("numels", 0))
        with torch.no_grad():
            g = run_backward(prob, kw["dy"], kw["attention_in"], kw["softmax_max"], kw["softmax_sum"])
    dq, dk, dv, dpse, dsink, dqr, dkr = g
    if ep.name == "npu_fusion_attention_grad_v2":  # torch_npu's 7-tuple, always (semantics §1)
        def empty(t: Any) -> Tensor:
            return torch.empty(0, dtype=kw["query"].dtype, device=kw["query"].device) if t is None else t
        has_sink = kw.get("sink") is not None
        return dq, dk, dv, empty(dpse), empty(dqr), empty(dkr), dsink if has_sink else None
    return dq, dk, dv, dpse, dsink


def _generate(ep: EntryPoint, impl: Callable[[EntryPoint, dict], Any], doc: str) -> Callable[..., Any]:
    """A plain Python function with ``ep``'s signature whose body calls ``impl(ep, canonical)``."""
    defaults = {p.public: p.default for p in ep.params}
    params = [p.public if p.default is REQUIRED else f"{p.public}=_d[{p.public!r}]" for p in ep.params]
    if ep.kwonly_from < len(params):
        params.insert(ep.kwonly_from, "*")
    body = ", ".join(f"{p.name!r}: {p.public}" for p in ep.params)
    src = f"def {ep.name}({', '.join(params)}):\n    return _impl(_ep, {{{body}}})\n"
    ns: dict[str, Any] = {"_impl": impl, "_ep": ep, "_d": defaults}
    exec(compile(src, f"<fascore.params: {ep.name}>", "exec"), ns)  # noqa: S102 (generated from params)
    fn = ns[ep.name]
    fn.__doc__, fn.__module__, fn.__qualname__ = doc, "fascore", ep.name
    return fn


_V1_DOC = """FlashAttentionScore, torch_npu's v1 signature (pse_type is 1).

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
    ``torch.ops.fascore.npu_fusion_attention`` (see ``fascore.api.ops``). docs/semantics.md has every
    rule and every [fascore] decision.

"""

_V2_DOC = """FlashAttentionScore, torch_npu's v2 signature: v1 plus ``pse_type``, ``q_start_idx`` /
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

_V3_DOC = """FlashAttentionScore, torch_npu's graph-mode variant ``npu_fusion_attention_v3``: v1's
    signature without ``dropout_mask`` / ``seed`` / ``offset``; ``actual_seq_qlen`` /
    ``actual_seq_kvlen`` as 1-D int64 tensors (lists are accepted too). Returns 6 tensors
    ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset)``: seed and offset as
    int64 [1] tensors on query's device (drawn from the emulated NPU generator with dropout).
    Differentiable like ``npu_fusion_attention``; see its docstring for shapes and rules.
    """

_GRAD_DOC = """Gradient of ``npu_fusion_attention``: ``(dq, dk, dv, dpse, dsink)``.

    P is rebuilt from ``softmax_max``/``softmax_sum`` and ``attention_in`` is the forward output
    (it is not recomputed). dpse is None without pse; dsink is empty without sink.

"""

_GRAD_V2_DOC = """Gradient of ``npu_fusion_attention_v2``: torch_npu's 7-tuple
    ``(dq, dk, dv, dpse, dq_rope, dk_rope, dsink)``, in that order whatever is given. ``dpse``
    (absent without pse or with pse_type 2/3), ``dq_rope`` and ``dk_rope`` (absent without rope)
    are empty [0] tensors of query's dtype when absent; ``dsink`` is None without sink.
"""

_GRAD_V3_DOC = """Gradient of ``npu_fusion_attention_v3``: ``(dq, dk, dv, dpse, dsink)``, with the
    forward's ``seed`` / ``offset`` as the int64 tensors it returned and tensor sequence lengths."""

npu_fusion_attention = _generate(ENTRY_POINTS["npu_fusion_attention"], _forward, _V1_DOC)
npu_fusion_attention_v2 = _generate(ENTRY_POINTS["npu_fusion_attention_v2"], _forward, _V2_DOC)
npu_fusion_attention_v3 = _generate(ENTRY_POINTS["npu_fusion_attention_v3"], _forward, _V3_DOC)
npu_fusion_attention_grad = _generate(ENTRY_POINTS["npu_fusion_attention_grad"], _grad, _GRAD_DOC)
npu_fusion_attention_grad_v2 = _generate(ENTRY_POINTS["npu_fusion_attention_grad_v2"], _grad, _GRAD_V2_DOC)
npu_fusion_attention_grad_v3 = _generate(ENTRY_POINTS["npu_fusion_attention_grad_v3"], _grad, _GRAD_V3_DOC)
