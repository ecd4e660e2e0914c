"""fascore's forward and grad as ``torch.library`` custom ops, for torch.compile and fake tensors.

Two ops are registered in the ``fascore`` namespace:

* ``torch.ops.fascore.npu_fusion_attention`` -> ``(attention_out, softmax_max, softmax_sum)``
* ``torch.ops.fascore.npu_fusion_attention_grad`` -> ``(dq, dk, dv, dpse, dsink, dq_rope, dk_rope)``
  (absent results are empty tensors)

Each has a fake (meta) implementation, so shapes, dtypes and devices propagate under
``FakeTensorMode``, ``torch.export`` and ``torch.compile``; the forward's autograd formula
(``register_autograd``) calls the grad op, so AOTAutograd traces forward and backward into one
graph without breaks.

When the public entry points use them
-------------------------------------
``fascore.npu_fusion_attention[_v2]`` and ``npu_fusion_attention_grad[_v2]`` keep their eager
implementation (an ``autograd.Function``; no dispatcher overhead) and switch to the ops when

* ``torch.compiler.is_compiling()`` (Dynamo is tracing the call), or
* the query is a fake tensor (``FakeTensorMode``, ``torch.export``), or
* ``fascore.ops.config["always"]`` is True (eager through the ops; tests use it).

The 7-tuple's ``seed``, ``offset`` and ``numels`` are Python ints, which an op cannot return:
on the op path ``numels`` is computed from the shapes in Python, and ``seed``/``offset`` go into
the op as ints. Dropout (``keep_prob < 1``) without ``dropout_mask`` under torch.compile or fake
tensors needs an explicit seed (``seed != 0``): advancing the emulated NPU generator is a host-side
side effect that a graph cannot return as an int, so a call with ``seed == 0`` there raises
``FlashAttentionError`` (under torch.compile Dynamo wraps it in a ``TorchRuntimeError``
whose message quotes it). In eager mode through the ops the seed is drawn before the op, as
without them.

On the op path, all validation of tensor contents (mask patterns, sequence lengths) happens when
the op runs on real tensors; the fake implementation checks what shapes alone decide. Under
torch.compile ``prefix``, ``actual_seq_qlen``/``actual_seq_kvlen`` and ``q_start_idx``/
``kv_start_idx`` must be Python lists of ints (not tensors). An int ``seed`` that changes between
calls makes Dynamo recompile once and then treat it as dynamic (with ``dynamic=False`` every new
value recompiles).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import api as _api
from .errors import FlashAttentionError, invalid
from .validation import INT32_MAX, Names, build_problem

__all__ = ["config", "use_ops", "attention", "grad", "fusion_attention_op", "fusion_attention_grad_op"]

config: dict = {
    "always": False,  # route eager calls through the custom ops too
}

_NAMES = {"v1": _api._V1_NAMES, "v2": Names(), "grad_v1": _api._GRAD_V1_NAMES, "grad_v2": _api._GRAD_V2_NAMES}
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _is_fake(t: Any) -> bool:
    if not isinstance(t, Tensor):
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(is_fake(t))


def use_ops(query: Any) -> bool:
    """True when a public entry point should go through the custom ops (see the module doc)."""
    if torch.compiler.is_compiling():
        return True
    return bool(config["always"]) or _is_fake(query)


def _wrap64(x: int) -> int:
    """``x`` as a signed 64-bit int with the same low 64 bits (Philox reads seed mod 2**64)."""
    return ((x + 2**63) % 2**64) - 2**63


def _as_list(x: Any) -> Optional[list[int]]:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return [int(v) for v in x.tolist()]
    return [v for v in x]


# --------------------------------------------------------------------------- shapes from shapes
def _geometry(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str) -> tuple:
    """(b, sq, skv, n1, n2, d, dv) from the shapes alone; raises FlashAttentionError."""
    if layout not in _LAYOUTS:
        raise invalid(f"input_layout={layout!r}: must be one of {', '.join(_LAYOUTS)}")
    rank = 3 if layout in ("BSH", "SBH", "TND") else 4
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != rank:
            raise invalid(f"{name} shape {list(t.shape)}: layout {layout} needs a {rank}-D tensor")
    if head_num < 1:
        raise invalid(f"head_num={head_num}: must be >= 1")
    if layout in ("BSH", "SBH"):
        hq, hk, hv = query.shape[2], key.shape[2], value.shape[2]
        if hq % head_num != 0:
            raise invalid(f"head_num={head_num}: must divide query's hidden size H={hq}")
        d = hq // head_num
        if hk % d != 0:
            raise invalid(f"key hidden size {hk} is not a multiple of the head dim D={d}")
        n2 = hk // d
        if n2 == 0 or hv % n2 != 0:
            raise invalid(f"value hidden size {hv} is not a multiple of N2={n2} kv heads")
        bi, si = (0, 1) if layout == "BSH" else (1, 0)
        return query.shape[bi], query.shape[si], key.shape[si], head_num, n2, d, hv // n2
    ni = {"BSND": 2, "BNSD": 1, "TND": 1}[layout]
    n1, n2 = query.shape[ni], key.shape[ni]
    if head_num != n1:
        raise invalid(f"head_num={head_num}: must equal query's N axis ({n1}) for layout {layout}")
    if layout == "TND":
        return 1, query.shape[0], key.shape[0], n1, n2, query.shape[-1], value.shape[-1]
    si = 1 if layout == "BSND" else 2
    return query.shape[0], query.shape[si], key.shape[si], n1, n2, query.shape[-1], value.shape[-1]


def _strip_padding(cum: list) -> list:
    end = len(cum)
    while end > 0 and cum[end - 1] == 0 and any(x > 0 for x in cum[:end - 1]):
        end -= 1
    return cum[:end]


def numels_from_shapes(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                       actual_seq_qlen: Optional[list] = None, actual_seq_kvlen: Optional[list] = None) -> int:
    """The 7-tuple's ``numels`` (B*N1*Sq*Skv; TND: N1 * sum_b Sq_b*Skv_b) without running anything."""
    layout = input_layout.upper()
    b, sq, skv, n1, _, _, _ = _geometry(query, key, value, head_num, layout)
    if layout != "TND":
        return b * n1 * sq * skv
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise invalid("actual_seq_qlen/actual_seq_kvlen=None: required with layout TND")
    cq, ck = _strip_padding(list(actual_seq_qlen)), _strip_padding(list(actual_seq_kvlen))
    total, pq, pk = 0, 0, 0
    for eq, ek in zip(cq, ck):
        total += (eq - pq) * (ek - pk)
        pq, pk = eq, ek
    return n1 * total


def _out_shapes(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str) -> tuple[list, list]:
    b, sq, _, n1, _, _, dv = _geometry(query, key, value, head_num, layout)
    if layout == "TND":
        return [query.shape[0], n1, dv], [query.shape[0], n1, 8]
    last = n1 * dv if layout in ("BSH", "SBH") else dv
    return list(query.shape[:-1]) + [last], [b, n1, sq, 8]


def _need_seed(keep_prob: float, dropout_mask: Optional[Tensor], seed: int, offset: int) -> None:
    if keep_prob < 1.0 and dropout_mask is None and seed == 0:
        raise invalid("keep_prob < 1 with seed=0 under torch.compile / fake tensors: the emulated NPU generator "
                      "cannot be advanced inside a traced graph; pass an explicit seed (non-zero, with its offset), "
                      "or a dropout_mask")


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("fascore::npu_fusion_attention", mutates_args=())
def fusion_attention_op(
    query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
    pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
    query_rope: Optional[Tensor], key_rope: Optional[Tensor], scale: float, keep_prob: float,
    pre_tokens: int, next_tokens: int, inner_precise: int, prefix: Optional[list[int]],
    actual_seq_qlen: Optional[list[int]], actual_seq_kvlen: Optional[list[int]], sparse_mode: int,
    pse_type: int, q_start_idx: Optional[list[int]], kv_start_idx: Optional[list[int]],
    softmax_layout: str, sink: Optional[Tensor], dropout_mask: Optional[Tensor], seed: int, offset: int,
    api: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttentionScore forward: ``(attention_out, softmax_max, softmax_sum)``, contiguous.

    ``seed``/``offset`` are used as given (no seed is drawn: seed == 0 with dropout and no
    dropout_mask is an error). ``api`` ("v1"/"v2") only chooses the parameter spelling of
    error messages.
    """
    _need_seed(keep_prob, dropout_mask, seed, offset)
    prob = build_problem(query, key, value, head_num, input_layout, names=_NAMES.get(api, Names()), pse=pse,
                         padding_mask=padding_mask, atten_mask=atten_mask, query_rope=query_rope,
                         key_rope=key_rope, scale=scale, keep_prob=keep_prob, pre_tokens=pre_tokens,
                         next_tokens=next_tokens, inner_precise=inner_precise, prefix=prefix,
                         actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                         sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                         kv_start_idx=kv_start_idx, softmax_layout=softmax_layout, sink=sink,
                         dropout_mask=dropout_mask, seed=seed, offset=offset, draw_missing_seed=False)
    out, smax, ssum = _api.run_forward(prob)
    return out.contiguous(), smax.contiguous(), ssum.contiguous()


@fusion_attention_op.register_fake
def _fusion_attention_fake(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                           query_rope, key_rope, scale, keep_prob, pre_tokens, next_tokens, inner_precise,
                           prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx,
                           kv_start_idx, softmax_layout, sink, dropout_mask, seed, offset, api):
    _need_seed(keep_prob, dropout_mask, seed, offset)
    out_shape, stats_shape = _out_shapes(query, key, value, head_num, input_layout.upper())
    return (query.new_empty(out_shape), query.new_empty(stats_shape, dtype=torch.float32),
            query.new_empty(stats_shape, dtype=torch.float32))


# --------------------------------------------------------------------------- grad op
@torch.library.custom_op("fascore::npu_fusion_attention_grad", mutates_args=())
def fusion_attention_grad_op(
    query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int, input_layout: str,
    pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
    softmax_max: Optional[Tensor], softmax_sum: Optional[Tensor], attention_in: Optional[Tensor],
    query_rope: Optional[Tensor], key_rope: Optional[Tensor], scale: float, keep_prob: float,
    pre_tokens: int, next_tokens: int, inner_precise: int, seed: int, offset: int, numels: int,
    prefix: Optional[list[int]], actual_seq_qlen: Optional[list[int]], actual_seq_kvlen: Optional[list[int]],
    sparse_mode: int, pse_type: int, q_start_idx: Optional[list[int]], kv_start_idx: Optional[list[int]],
    softmax_layout: str, sink: Optional[Tensor], dropout_mask: Optional[Tensor], api: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """FlashAttentionScore backward: ``(dq, dk, dv, dpse, dsink, dq_rope, dk_rope)``, contiguous.

    dpse is empty without a type 0/1 pse, dsink empty without sink, dq_rope/dk_rope empty
    without rope. ``seed``/``offset`` are the forward's (used as given).
    """
    names = _NAMES.get(api, Names())
    prob = build_problem(query, key, value, head_num, input_layout, names=names, pse=pse,
                         padding_mask=padding_mask, atten_mask=atten_mask, query_rope=query_rope,
                         key_rope=key_rope, scale=scale, keep_prob=keep_prob, pre_tokens=pre_tokens,
                         next_tokens=next_tokens, inner_precise=inner_precise, prefix=prefix,
                         actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                         sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                         kv_start_idx=kv_start_idx, softmax_layout=softmax_layout, sink=sink,
                         dropout_mask=dropout_mask, seed=seed, offset=offset, draw_missing_seed=False)
    _api._check_grad_inputs(prob, dy, attention_in, softmax_max, softmax_sum, names)
    if numels != 0 and numels != prob.numels:
        raise invalid(f"numels={numels!r}: must be 0 or the forward's mask size {prob.numels}")
    with torch.no_grad():
        dq, dk, dv, dpse, dsink, dqr, dkr = _api.run_backward(prob, dy.contiguous(), attention_in,
                                                              softmax_max, softmax_sum)
    empty = query.new_empty(0)
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            dpse.contiguous() if dpse is not None else empty,
            dsink.contiguous(), dqr.contiguous() if dqr is not None else empty.clone(),
            dkr.contiguous() if dkr is not None else empty.clone())


@fusion_attention_grad_op.register_fake
def _fusion_attention_grad_fake(query, key, value, dy, head_num, input_layout, pse, padding_mask, atten_mask,
                                softmax_max, softmax_sum, attention_in, query_rope, key_rope, scale, keep_prob,
                                pre_tokens, next_tokens, inner_precise, seed, offset, numels, prefix,
                                actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx,
                                kv_start_idx, softmax_layout, sink, dropout_mask, api):
    layout = input_layout.upper()
    out_shape, stats_shape = _out_shapes(query, key, value, head_num, layout)
    for name, t in (("dy", dy), ("softmax_max", softmax_max), ("softmax_sum", softmax_sum),
                    ("attention_in", attention_in)):
        if t is None:
            raise FlashAttentionError(f"{name}=None: {name} is required", 161001)
    for name, t, shape in (("dy", dy, out_shape), ("attention_in", attention_in, out_shape),
                           ("softmax_max", softmax_max, stats_shape), ("softmax_sum", softmax_sum, stats_shape)):
        if list(t.shape) != list(shape):
            raise invalid(f"{name} shape {list(t.shape)}: must be {list(shape)} as the forward returns it")
    if numels != 0:
        want = numels_from_shapes(query, key, value, head_num, layout, actual_seq_qlen, actual_seq_kvlen)
        if numels != want:
            raise invalid(f"numels={numels!r}: must be 0 or the forward's mask size {want}")
    n1 = _geometry(query, key, value, head_num, layout)[3]
    empty = query.new_empty(0)
    dpse = pse.new_empty(pse.shape) if pse is not None and pse_type in (0, 1) else empty
    dsink = query.new_empty((n1,) if sink is not None else (0,), dtype=torch.float32)
    dqr = query_rope.new_empty(query_rope.shape) if query_rope is not None else query.new_empty(0)
    dkr = key_rope.new_empty(key_rope.shape) if key_rope is not None else query.new_empty(0)
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dpse, dsink,
            dqr, dkr)


# --------------------------------------------------------------------------- autograd of the forward op
_FWD_ARGS = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask",
             "query_rope", "key_rope", "scale", "keep_prob", "pre_tokens", "next_tokens", "inner_precise",
             "prefix", "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "pse_type", "q_start_idx",
             "kv_start_idx", "softmax_layout", "sink", "dropout_mask", "seed", "offset", "api")
_SAVED = ("query", "key", "value", "pse", "padding_mask", "atten_mask", "query_rope", "key_rope", "sink",
          "dropout_mask")


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    a = dict(zip(_FWD_ARGS, inputs))
    out, smax, ssum = output
    ctx.mark_non_differentiable(smax, ssum)
    ctx.save_for_backward(*(a[n] for n in _SAVED), out, smax, ssum)
    ctx.args = {k: v for k, v in a.items() if k not in _SAVED}


def _backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple:
    *saved, out, smax, ssum = ctx.saved_tensors
    t = dict(zip(_SAVED, saved))
    a = ctx.args
    dq, dk, dv, dpse, dsink, dqr, dkr = fusion_attention_grad_op(
        t["query"], t["key"], t["value"], dout, a["head_num"], a["input_layout"], t["pse"], t["padding_mask"],
        t["atten_mask"], smax, ssum, out, t["query_rope"], t["key_rope"], a["scale"], a["keep_prob"],
        a["pre_tokens"], a["next_tokens"], a["inner_precise"], a["seed"], a["offset"], 0, a["prefix"],
        a["actual_seq_qlen"], a["actual_seq_kvlen"], a["sparse_mode"], a["pse_type"], a["q_start_idx"],
        a["kv_start_idx"], a["softmax_layout"], t["sink"], t["dropout_mask"],
        "grad_v1" if a["api"] == "v1" else "grad_v2")
    grads = dict.fromkeys(_FWD_ARGS)
    grads.update(query=dq, key=dk, value=dv)
    if t["pse"] is not None and a["pse_type"] in (0, 1):
        grads["pse"] = dpse
    if t["sink"] is not None:
        grads["sink"] = dsink
    if t["query_rope"] is not None:
        grads.update(query_rope=dqr, key_rope=dkr)
    return tuple(grads[n] for n in _FWD_ARGS)


fusion_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the public entry points' op path
def attention(query: Any, key: Any, value: Any, head_num: Any, input_layout: Any, api: str,
              **kw: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """``npu_fusion_attention[_v2]`` through the forward op (``kw`` uses v2 spellings)."""
    seed, offset = kw.get("seed", 0), kw.get("offset", 0)
    lists = {n: _as_list(kw.get(n)) for n in ("prefix", "actual_seq_qlen", "actual_seq_kvlen", "q_start_idx",
                                              "kv_start_idx")}
    if use_ops_traced(query):
        numels = numels_from_shapes(query, key, value, head_num, input_layout, lists["actual_seq_qlen"],
                                    lists["actual_seq_kvlen"])
    else:  # eager through the ops: validate and draw the seed here, as the eager path does
        prob = build_problem(query, key, value, head_num, input_layout, names=_NAMES[api], **kw)
        seed, offset, numels = prob.seed, prob.offset, prob.numels
    out, smax, ssum = fusion_attention_op(
        query, key, value, head_num, input_layout, kw.get("pse"), kw.get("padding_mask"), kw.get("atten_mask"),
        kw.get("query_rope"), kw.get("key_rope"), float(kw.get("scale", 1.0)), float(kw.get("keep_prob", 1.0)),
        kw.get("pre_tokens", INT32_MAX), kw.get("next_tokens", INT32_MAX), kw.get("inner_precise", 0),
        lists["prefix"], lists["actual_seq_qlen"], lists["actual_seq_kvlen"], kw.get("sparse_mode", 0),
        kw.get("pse_type", 1), lists["q_start_idx"], lists["kv_start_idx"], kw.get("softmax_layout", ""),
        kw.get("sink"), kw.get("dropout_mask"), _wrap64(seed), offset, api)
    softmax_out = query.new_empty(0)
    return out, smax, ssum, softmax_out, seed, offset, numels


def grad(query: Any, key: Any, value: Any, dy: Any, head_num: Any, input_layout: Any, api: str,
         softmax_max: Any, softmax_sum: Any, attention_in: Any, numels: Any,
         **kw: Any) -> tuple:
    """``npu_fusion_attention_grad[_v2]`` through the grad op: the 7 results, None where absent."""
    lists = {n: _as_list(kw.get(n)) for n in ("prefix", "actual_seq_qlen", "actual_seq_kvlen", "q_start_idx",
                                              "kv_start_idx")}
    if not use_ops_traced(query):  # eager through the ops: the eager path's checks first
        names = _NAMES[api]
        prob = build_problem(query, key, value, head_num, input_layout, names=names, draw_missing_seed=False,
                             **kw)
        _api._check_grad_inputs(prob, dy, attention_in, softmax_max, softmax_sum, names)
        if isinstance(numels, bool) or not isinstance(numels, int) or (numels != 0 and numels != prob.numels):
            raise invalid(f"numels={numels!r}: must be 0 or the forward's mask size {prob.numels}")
    dq, dk, dv, dpse, dsink, dqr, dkr = fusion_attention_grad_op(
        query, key, value, dy, head_num, input_layout, kw.get("pse"), kw.get("padding_mask"),
        kw.get("atten_mask"), softmax_max, softmax_sum, attention_in, kw.get("query_rope"), kw.get("key_rope"),
        float(kw.get("scale", 1.0)), float(kw.get("keep_prob", 1.0)), kw.get("pre_tokens", INT32_MAX),
        kw.get("next_tokens", INT32_MAX), kw.get("inner_precise", 0), _wrap64(kw.get("seed", 0)),
        kw.get("offset", 0), numels, lists["prefix"], lists["actual_seq_qlen"], lists["actual_seq_kvlen"],
        kw.get("sparse_mode", 0), kw.get("pse_type", 1), lists["q_start_idx"], lists["kv_start_idx"],
        kw.get("softmax_layout", ""), kw.get("sink"), kw.get("dropout_mask"), api)
    has_pse = kw.get("pse") is not None and kw.get("pse_type", 1) in (0, 1)
    has_rope = kw.get("query_rope") is not None
    return dq, dk, dv, dpse if has_pse else None, dsink, dqr if has_rope else None, dkr if has_rope else None


def use_ops_traced(query: Any) -> bool:
    """Dynamo is tracing or the query is fake: nothing may read tensor data or draw a seed."""
    return torch.compiler.is_compiling() or _is_fake(query)
