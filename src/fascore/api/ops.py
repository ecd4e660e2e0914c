"""fascore's forward and grad as ``torch.library`` custom ops, for torch.compile and fake tensors.

Two ops are registered in the ``fascore`` namespace, their schemas derived from
``fascore.params`` (v2's forward and grad parameters under canonical names, all positional as
custom ops require, plus ``str api``: "v1", "v2", "v3", "grad_v1", "grad_v2" or "grad_v3", the
entry point whose spellings error messages use):

* ``torch.ops.fascore.npu_fusion_attention`` -> ``(attention_out, softmax_max, softmax_sum)``
* ``torch.ops.fascore.npu_fusion_attention_grad`` -> ``(dq, dk, dv, dpse, dsink, dq_rope, dk_rope)``
  (absent results are empty tensors)

Each has a fake (meta) implementation, so shapes, dtypes and devices propagate under
``FakeTensorMode``, ``torch.export`` and ``torch.compile``; the forward's autograd formula
(``register_autograd``) calls the grad op, so AOTAutograd traces forward and backward into one
graph without breaks.

When the public entry points use them
-------------------------------------
The entry points keep their eager implementation (an ``autograd.Function``; no dispatcher
overhead) and switch to the ops when

* ``torch.compiler.is_compiling()`` (Dynamo is tracing the call), or
* the query is a fake tensor (``FakeTensorMode``, ``torch.export``), or
* ``fascore.api.ops.config["always"]`` is True (eager through the ops; tests use it).

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

from ..canonical.layouts import LAYOUTS
from ..errors import FlashAttentionError, invalid
from ..params import ENTRY_POINTS, EntryPoint, Param
from ..spec import build_problem, check_grad_inputs, check_numels, problem_args
from .run import run_backward, run_forward

__all__ = ["config", "use_ops", "use_ops_traced", "attention", "grad", "fusion_attention_op",
           "fusion_attention_grad_op", "numels_from_shapes"]

config: dict = {
    "always": False,  # route eager calls through the custom ops too
}

_API = Param("api", "str")
_FWD_EP, _GRAD_EP = ENTRY_POINTS["npu_fusion_attention_v2"], ENTRY_POINTS["npu_fusion_attention_grad_v2"]
_FWD_DROP = ("gen_mask_parallel", "sync")
_GRAD_DROP = ("gen_mask_parallel", "sync", "softmax_in")
_FWD_PARAMS = _FWD_EP.op_params(_FWD_DROP, (_API,))
_GRAD_PARAMS = _GRAD_EP.op_params(_GRAD_DROP, (_API,))
_LISTS = ("prefix", "actual_seq_qlen", "actual_seq_kvlen", "q_start_idx", "kv_start_idx")


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and bool(is_fake(t))


def use_ops(query: Any) -> bool:
    """True when a public entry point should go through the custom ops (see the module doc)."""
    return bool(config["always"]) or use_ops_traced(query)


def use_ops_traced(query: Any) -> bool:
    """Dynamo is tracing or the query is fake: nothing may read tensor data or draw a seed."""
    return torch.compiler.is_compiling() or _is_fake(query)


def _wrap64(x: int) -> int:
    """``x`` as a signed 64-bit int with the same low 64 bits (Philox reads seed mod 2**64)."""
    return ((x + 2**63) % 2**64) - 2**63


def _as_list(x: Any) -> Optional[list[int]]:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return [int(v) for v in x.tolist()]
    return list(x)


def _named(params: tuple[Param, ...], args: tuple) -> dict[str, Any]:
    return {p.name: a for p, a in zip(params, args)}


def _op_args(params: tuple[Param, ...], kw: dict[str, Any], **override: Any) -> list[Any]:
    """The op's positional arguments from an entry point's canonical keywords (defaults filled)."""
    vals = {p.name: kw.get(p.name, p.default) for p in params}
    vals.update({n: _as_list(vals[n]) for n in _LISTS if n in vals})
    vals.update(override)
    return [vals[p.name] for p in params]


# --------------------------------------------------------------------------- shapes from shapes
def _geometry(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str) -> tuple:
    """(b, sq, skv, n1, n2, d, dv) from the shapes alone; raises FlashAttentionError."""
    if layout not in LAYOUTS:
        raise invalid(f"input_layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
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


def _need_seed(keep_prob: float, dropout_mask: Optional[Tensor], seed: int) -> None:
    if keep_prob < 1.0 and dropout_mask is None and seed == 0:
        raise invalid("keep_prob < 1 with seed=0 under torch.compile / fake tensors: the emulated NPU generator "
                      "cannot be advanced inside a traced graph; pass an explicit seed (non-zero, with its offset), "
                      "or a dropout_mask")


# The ops' ``api`` argument: which entry point's spellings the messages use.
_API_OF = {"npu_fusion_attention": "v1", "npu_fusion_attention_v2": "v2", "npu_fusion_attention_v3": "v3",
           "npu_fusion_attention_grad": "grad_v1", "npu_fusion_attention_grad_v2": "grad_v2",
           "npu_fusion_attention_grad_v3": "grad_v3"}
_ENTRY_OF = {v: k for k, v in _API_OF.items()}


def _names(api: str) -> Any:
    return ENTRY_POINTS[_ENTRY_OF[api]].names


# --------------------------------------------------------------------------- forward op
def _forward_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttentionScore forward: ``(attention_out, softmax_max, softmax_sum)``, contiguous.

    ``seed``/``offset`` are used as given (seed == 0 with dropout and no dropout_mask is an
    error). ``api`` only chooses the parameter spelling of error messages.
    """
    a = _named(_FWD_PARAMS, args)
    api = a.pop("api")
    _need_seed(a["keep_prob"], a["dropout_mask"], a["seed"])
    prob = build_problem(**a, names=_names(api), draw_missing_seed=False)
    out, smax, ssum = run_forward(prob)
    return out.contiguous(), smax.contiguous(), ssum.contiguous()


def _forward_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    a = _named(_FWD_PARAMS, args)
    _need_seed(a["keep_prob"], a["dropout_mask"], a["seed"])
    q = a["query"]
    out_shape, stats_shape = _out_shapes(q, a["key"], a["value"], a["head_num"], a["input_layout"].upper())
    return q.new_empty(out_shape), q.new_empty(stats_shape, dtype=torch.float32), \
        q.new_empty(stats_shape, dtype=torch.float32)


fusion_attention_op = torch.library.custom_op(
    "fascore::npu_fusion_attention", _forward_impl, mutates_args=(),
    schema=_FWD_EP.positional_schema("(Tensor, Tensor, Tensor)", _FWD_DROP, (_API,)))
fusion_attention_op.register_fake(_forward_fake)


# --------------------------------------------------------------------------- grad op
def _grad_impl(*args: Any) -> tuple[Tensor, ...]:
    """FlashAttentionScore backward: ``(dq, dk, dv, dpse, dsink, dq_rope, dk_rope)``, contiguous.

    dpse is empty without a type 0/1 pse, dsink empty without sink, dq_rope/dk_rope empty
    without rope. ``seed``/``offset`` are the forward's (used as given).
    """
    a = _named(_GRAD_PARAMS, args)
    names = _names(a.pop("api"))
    grad_in = {n: a.pop(n) for n in ("dy", "softmax_max", "softmax_sum", "attention_in", "numels")}
    prob = build_problem(**a, names=names, draw_missing_seed=False)
    check_grad_inputs(prob, grad_in["dy"], grad_in["attention_in"], grad_in["softmax_max"], grad_in["softmax_sum"],
                      names)
    check_numels(prob, grad_in["numels"])
    with torch.no_grad():
        g = run_backward(prob, grad_in["dy"].contiguous(), grad_in["attention_in"], grad_in["softmax_max"],
                         grad_in["softmax_sum"])
    empty = a["query"].new_empty(0)
    return tuple(t.contiguous() if t is not None else empty.clone() for t in g)


def _grad_fake(*args: Any) -> tuple[Tensor, ...]:
    a = _named(_GRAD_PARAMS, args)
    q, k, v = a["query"], a["key"], a["value"]
    layout = a["input_layout"].upper()
    out_shape, stats_shape = _out_shapes(q, k, v, a["head_num"], layout)
    for name in ("dy", "softmax_max", "softmax_sum", "attention_in"):
        if a[name] is None:
            raise FlashAttentionError(f"{name}=None: {name} is required", 161001)
    for name, shape in (("dy", out_shape), ("attention_in", out_shape), ("softmax_max", stats_shape),
                        ("softmax_sum", stats_shape)):
        if list(a[name].shape) != list(shape):
            raise invalid(f"{name} shape {list(a[name].shape)}: must be {list(shape)} as the forward returns it")
    if a["numels"] != 0:
        want = numels_from_shapes(q, k, v, a["head_num"], layout, a["actual_seq_qlen"], a["actual_seq_kvlen"])
        if a["numels"] != want:
            raise invalid(f"numels={a['numels']!r}: must be 0 or the forward's mask size {want}")
    n1 = _geometry(q, k, v, a["head_num"], layout)[3]
    pse, sink, qr, kr = a["pse"], a["sink"], a["query_rope"], a["key_rope"]
    dpse = pse.new_empty(pse.shape) if pse is not None and a["pse_type"] in (0, 1) else q.new_empty(0)
    dsink = q.new_empty((n1,) if sink is not None else (0,), dtype=torch.float32)
    dqr = qr.new_empty(qr.shape) if qr is not None else q.new_empty(0)
    dkr = kr.new_empty(kr.shape) if kr is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpse, dsink, dqr, dkr


fusion_attention_grad_op = torch.library.custom_op(
    "fascore::npu_fusion_attention_grad", _grad_impl, mutates_args=(),
    schema=_GRAD_EP.positional_schema("(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", _GRAD_DROP,
                                      (_API,)))
fusion_attention_grad_op.register_fake(_grad_fake)


# --------------------------------------------------------------------------- autograd of the forward op
_SAVED = ("query", "key", "value", "pse", "padding_mask", "atten_mask", "query_rope", "key_rope", "sink",
          "dropout_mask")


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    a = _named(_FWD_PARAMS, inputs)
    out, smax, ssum = output
    ctx.mark_non_differentiable(smax, ssum)
    ctx.save_for_backward(*(a[n] for n in _SAVED), out, smax, ssum)
    ctx.args = {k: v for k, v in a.items() if k not in _SAVED}


def _backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple:
    *saved, out, smax, ssum = ctx.saved_tensors
    a = dict(ctx.args, **dict(zip(_SAVED, saved)))
    grad_api = "grad_v2" if a["api"] == "v2" else "grad_v1"
    g = fusion_attention_grad_op(*_op_args(_GRAD_PARAMS, a, dy=dout, softmax_max=smax, softmax_sum=ssum,
                                           attention_in=out, numels=0, api=grad_api))
    dq, dk, dv, dpse, dsink, dqr, dkr = g
    grads = dict.fromkeys(p.name for p in _FWD_PARAMS)
    grads.update(query=dq, key=dk, value=dv)
    if a["pse"] is not None and a["pse_type"] in (0, 1):
        grads["pse"] = dpse
    if a["sink"] is not None:
        grads["sink"] = dsink
    if a["query_rope"] is not None:
        grads.update(query_rope=dqr, key_rope=dkr)
    return tuple(grads[p.name] for p in _FWD_PARAMS)


fusion_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the public entry points' op path
def attention(ep: EntryPoint, kw: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    """A forward entry point (canonical keywords ``kw``) through the forward op."""
    q = kw["query"]
    seed, offset = kw.get("seed", 0), kw.get("offset", 0)
    if use_ops_traced(q):
        numels = numels_from_shapes(q, kw["key"], kw["value"], kw["head_num"], kw["input_layout"],
                                    _as_list(kw.get("actual_seq_qlen")), _as_list(kw.get("actual_seq_kvlen")))
    else:  # eager through the ops: validate and draw the seed here, as the eager path does
        prob = build_problem(**problem_args(kw), names=ep.names)
        seed, offset, numels = prob.seed, prob.offset, prob.numels
    args = _op_args(_FWD_PARAMS, kw, scale=float(kw.get("scale", 1.0)), keep_prob=float(kw.get("keep_prob", 1.0)),
                    seed=_wrap64(seed), offset=offset, api=_API_OF[ep.name])
    out, smax, ssum = fusion_attention_op(*args)
    return out, smax, ssum, q.new_empty(0), seed, offset, numels


def grad(ep: EntryPoint, kw: dict[str, Any]) -> tuple:
    """A grad entry point through the grad op: the 7 results, None where absent."""
    q = kw["query"]
    if not use_ops_traced(q):  # eager through the ops: the eager path's checks first
        prob = build_problem(**problem_args(kw), names=ep.names, draw_missing_seed=False)
        check_grad_inputs(prob, kw["dy"], kw["attention_in"], kw["softmax_max"], kw["softmax_sum"], ep.names)
        check_numels(prob, kw.get("numels", 0))
    args = _op_args(_GRAD_PARAMS, kw, scale=float(kw.get("scale", 1.0)), keep_prob=float(kw.get("keep_prob", 1.0)),
                    seed=_wrap64(kw.get("seed", 0)), api=_API_OF[ep.name])
    dq, dk, dv, dpse, dsink, dqr, dkr = fusion_attention_grad_op(*args)
    has_pse = kw.get("pse") is not None and kw.get("pse_type", 1) in (0, 1)
    has_rope = kw.get("query_rope") is not None
    return dq, dk, dv, dpse if has_pse else None, dsink, dqr if has_rope else None, dkr if has_rope else None
