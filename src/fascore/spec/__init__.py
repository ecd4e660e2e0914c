"""Validate: every rule of semantics §§2-9, and the canonical problem a call becomes.

``build_problem`` is a pipeline of validators, each owning its rules and their messages:
``tensors`` (layouts, shapes, dtypes, limits, rope) -> ``scalars`` -> ``tnd`` (varlen lengths) ->
``masks`` (atten_mask, sparse modes, band rules, prefix) -> ``pse`` (bias, slopes, start indices,
sink) -> ``dropout`` (masks, seeds) -> ``segments`` (the ``Problem``). Every broken rule raises
``FlashAttentionError`` naming the parameter as the caller spelled it, the value and the rule.
``grad`` checks the grad ops' extra inputs.
"""
from __future__ import annotations

from typing import Any

from ..canonical.problem import Problem
from ..limits import INT32_MAX
from ..params import Names
from .dropout import drop
from .grad import check_grad_inputs, check_numels
from .masks import masking
from .pse import bias
from .scalars import scalars
from .segments import problem
from .tensors import geometry
from .tnd import varlen

__all__ = ["build_problem", "problem_args", "check_grad_inputs", "check_numels", "Names"]

HINTS = ("gen_mask_parallel", "sync")  # Ascend's scheduling hints: accepted, nothing to do off-NPU
GRAD_INPUTS = ("dy", "softmax_max", "softmax_sum", "softmax_in", "attention_in", "numels")


def problem_args(kw: dict[str, Any]) -> dict[str, Any]:
    """``build_problem``'s arguments among an entry point's canonical ones."""
    return {k: v for k, v in kw.items() if k not in HINTS and k not in GRAD_INPUTS}


def build_problem(
    query: Any, key: Any, value: Any, head_num: Any, input_layout: Any, *,
    pse: Any = None, padding_mask: Any = None, atten_mask: Any = None,
    query_rope: Any = None, key_rope: Any = None, scale: Any = 1.0, keep_prob: Any = 1.0,
    pre_tokens: Any = INT32_MAX, next_tokens: Any = INT32_MAX, inner_precise: Any = 0,
    prefix: Any = None, actual_seq_qlen: Any = None, actual_seq_kvlen: Any = None,
    sparse_mode: Any = 0, pse_type: Any = 1, q_start_idx: Any = None, kv_start_idx: Any = None,
    softmax_layout: Any = "", sink: Any = None, dropout_mask: Any = None, seed: Any = 0,
    offset: Any = 0, draw_missing_seed: bool = True, names: Names | None = None,
    allow_tnd: bool = True,
) -> Problem:
    """Validate one call's arguments (canonical names) and build its canonical problem.

    ``names`` gives the caller's spelling of each parameter for messages; ``draw_missing_seed``
    lets seed == 0 with dropout take (seed, offset) from the emulated NPU generator (the forward
    entry points; grad ops use the seed they are given); ``allow_tnd`` is False for aclnn's V2.
    """
    nm = names or Names()
    g = geometry(query, key, value, head_num, input_layout, query_rope, key_rope, nm, allow_tnd)
    sc = scalars(g.layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, sparse_mode, pse_type,
                 softmax_layout, padding_mask, seed, offset, nm)
    vl = varlen(g, actual_seq_qlen, actual_seq_kvlen, nm)
    mk = masking(g, vl, sc, atten_mask, prefix, nm)
    bi = bias(g, vl, sc, mk, pse, q_start_idx, kv_start_idx, sink, nm)
    dr = drop(g, vl, sc, dropout_mask, draw_missing_seed, nm)
    return problem(g, vl, sc, mk, bi, dr)
