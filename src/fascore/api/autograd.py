"""Autograd of the forward entry points: the forward runs the engine; the backward is the grad op
(``run_backward``) called with the forward's output and statistics, as torch_npu's
``derivatives.yaml`` wires ``npu_fusion_attention`` to ``npu_fusion_attention_grad``."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..canonical.problem import Problem
from ..spec import build_problem
from .run import run_backward, run_forward

__all__ = ["DIFFERENTIABLE", "attention_with_grad"]

DIFFERENTIABLE = ("query", "key", "value", "pse", "sink", "query_rope", "key_rope")


class _FusionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, prob: Problem, args: dict, *tensors: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        out, smax, ssum = run_forward(prob)
        ctx.mark_non_differentiable(smax, ssum)
        ctx.save_for_backward(*tensors, out, smax, ssum)
        ctx.args = args
        ctx.pse_differentiable = prob.pse is not None
        return out, smax, ssum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple[Any, ...]:
        *tensors, out, smax, ssum = ctx.saved_tensors
        named = dict(zip(DIFFERENTIABLE, tensors))
        prob = build_problem(**ctx.args, **named, draw_missing_seed=False)
        dq, dk, dv, dpse, dsink, dqr, dkr = run_backward(prob, dout.contiguous(), out, smax, ssum)
        grads = dict(query=dq, key=dk, value=dv, pse=dpse if ctx.pse_differentiable else None,
                     sink=dsink if named["sink"] is not None else None, query_rope=dqr, key_rope=dkr)
        return (None, None, *(grads[n] for n in DIFFERENTIABLE))


def attention_with_grad(prob: Problem, args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """run_forward(prob), recorded for autograd when a differentiable input needs a gradient.

    ``args`` are ``build_problem``'s arguments (canonical names) the backward rebuilds the
    problem from, with the forward's resolved seed and offset.
    """
    tensors = [args.get(n) for n in DIFFERENTIABLE]
    needs = [t for n, t in zip(DIFFERENTIABLE, tensors) if n != "pse" or prob.pse is not None]
    if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in needs)):
        return run_forward(prob)
    rest = {k: v for k, v in args.items() if k not in DIFFERENTIABLE}
    rest.update(seed=prob.seed, offset=prob.offset)
    return _FusionAttention.apply(prob, rest, *tensors)
