"""A Python mirror of the two-stage aclnn C API (semantics §1.4).

``...GetWorkspaceSize`` validates and returns ``(status, workspace_size, executor)``; the second
stage runs the executor once and writes the caller's output tensors in place. Errors come back as
status codes, never as exceptions; ``get_recent_err_msg()`` gives the last error's text.
At this layer dropout happens only when ``dropMaskOptional`` is given.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import Tensor

from .api.memory import check_memory
from .api.run import run_backward, run_forward
from .engines import select
from .errors import (ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, ACLNN_ERR_RUNTIME_ERROR, ACLNN_SUCCESS,
                     FlashAttentionError, invalid, nullptr)
from .canonical.problem import Problem
from .params import Names
from .spec import build_problem, check_grad_inputs

__all__ = [
    "aclnnFlashAttentionScoreV2GetWorkspaceSize", "aclnnFlashAttentionScoreV2",
    "aclnnFlashAttentionScoreGradV2GetWorkspaceSize", "aclnnFlashAttentionScoreGradV2",
    "get_recent_err_msg", "Executor", "ACLNN_SUCCESS", "ACLNN_ERR_PARAM_NULLPTR",
    "ACLNN_ERR_PARAM_INVALID", "ACLNN_ERR_RUNTIME_ERROR",
]

_ACLNN_NAMES = {
    "pse": "realShiftOptional", "dropout_mask": "dropMaskOptional", "padding_mask": "paddingMaskOptional",
    "atten_mask": "attenMaskOptional", "prefix": "prefixOptional", "q_start_idx": "qStartIdxOptional",
    "kv_start_idx": "kvStartIdxOptional", "scale": "scaleValue", "keep_prob": "keepProb",
    "pre_tokens": "preTokens", "next_tokens": "nextTokens", "head_num": "headNum",
    "input_layout": "inputLayout", "inner_precise": "innerPrecise", "sparse_mode": "sparseMode",
    "pse_type": "pseType", "softmax_max": "softmaxMaxOptional", "softmax_sum": "softmaxSumOptional",
    "attention_in": "attentionInOptional",
}
# Messages carry both spellings, e.g. "preTokens (pre_tokens)=-5: ...".
_NAMES = Names({k: f"{v} ({k})" for k, v in _ACLNN_NAMES.items()})
_GRAD_NAMES = Names({**{k: f"{v} ({k})" for k, v in _ACLNN_NAMES.items()}, "pse": "pseShiftOptional (pse)",
                     "key": "keyIn (key)"})
_err = threading.local()


def get_recent_err_msg() -> str:
    """Text of the last error returned on this thread ('' if none)."""
    return getattr(_err, "msg", "")


def _fail(e: FlashAttentionError) -> int:
    _err.msg = str(e)
    return e.status


class Executor:
    """One prepared run; it runs once."""

    def __init__(self, prob: Problem, workspace_size: int, run: Callable[[], None]) -> None:
        self.problem = prob
        self.workspace_size = workspace_size
        self._run = run
        self.used = False
        self._lock = threading.Lock()  # two threads running one executor: exactly one runs

    def _claim(self) -> bool:
        with self._lock:
            if self.used:
                return False
            self.used = True
            return True


def _check_out(t: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if t is None:
        raise nullptr(name)
    if not isinstance(t, Tensor):
        raise invalid(f"{name}={t!r}: must be a torch.Tensor")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise invalid(f"{name} {list(t.shape)} {t.dtype} on {t.device}: must be {list(shape)} {dtype} on {device}")
    if t.layout != torch.strided or _overlaps(t):
        raise invalid(f"{name} (strides {list(t.stride()) if t.layout == torch.strided else t.layout}): an output "
                      "must be a dense tensor whose elements do not share memory (not an expanded view)")
    return t


def _overlaps(t: Tensor) -> bool:
    """Some elements of ``t`` share memory (zero strides, or an overlapping as_strided view)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return True
    check = getattr(torch, "_debug_has_internal_overlap", None)
    return check is not None and check(t) == 1  # MemOverlap::Yes


def _prepare(build: Callable[[], tuple[Problem, Callable[[], None]]], backward: bool) -> tuple[int, int, Executor | None]:
    try:
        prob, run = build()
        engine = select(prob, backward)
        check_memory(prob, backward, engine)
        size = max((int(engine.workspace_bytes(s, prob, backward)) for s in prob.segments), default=0)
    except FlashAttentionError as e:
        return _fail(e), 0, None
    except Exception as e:  # never raise: an unforeseen failure is a runtime error with its text
        err = FlashAttentionError(f"first stage failed: {type(e).__name__}: {e}", ACLNN_ERR_RUNTIME_ERROR)
        return _fail(err), 0, None
    return ACLNN_SUCCESS, size, Executor(prob, size, run)


def _execute(workspace: Any, workspace_size: Any, executor: Any) -> int:
    try:
        if not isinstance(executor, Executor):
            raise nullptr("executor") if executor is None else invalid(f"executor={executor!r}: not an Executor")
        if not executor._claim():
            raise FlashAttentionError("executor: an executor runs once; it has already run", ACLNN_ERR_RUNTIME_ERROR)
        need = executor.workspace_size
        given = 0 if workspace is None else workspace.numel() * workspace.element_size() \
            if isinstance(workspace, Tensor) else -1
        if given < 0:
            raise invalid(f"workspace={workspace!r}: must be a tensor or None")
        if isinstance(workspace, Tensor) and (workspace.device != executor.problem.device
                                              or workspace.layout != torch.strided or _overlaps(workspace)):
            raise invalid(f"workspace (shape {list(workspace.shape)} on {workspace.device}): must be a dense "
                          f"tensor on {executor.problem.device} whose bytes do not overlap")
        if isinstance(workspace_size, bool) or not isinstance(workspace_size, int):
            raise invalid(f"workspace_size={workspace_size!r}: must be an int (the first stage's value)")
        if workspace_size < need or given < need:
            raise FlashAttentionError(f"workspace: {given} bytes given (workspace_size={workspace_size!r}), "
                                      f"the run needs {need}", ACLNN_ERR_RUNTIME_ERROR)
        with torch.no_grad():
            executor._run()
    except FlashAttentionError as e:
        return _fail(e)
    except Exception as e:  # e.g. an allocation failing mid-run (RuntimeError, MemoryError): never raise
        return _fail(FlashAttentionError(f"run failed: {type(e).__name__}: {e}", ACLNN_ERR_RUNTIME_ERROR))
    return ACLNN_SUCCESS


def _problem(query, key, value, pse, drop_mask, padding_mask, atten_mask, prefix, q_start, kv_start, scale,
             keep_prob, pre, nxt, head_num, layout, inner_precise, sparse_mode, pse_type, names: Names) -> Problem:
    """The first stages' common validation; no dropout at this layer without a mask."""
    kp = keep_prob
    if drop_mask is None and isinstance(kp, (int, float)) and not isinstance(kp, bool) and 0 < kp <= 1:
        kp = 1.0
    return build_problem(query, key, value, head_num, layout, pse=pse, padding_mask=padding_mask,
                         atten_mask=atten_mask, scale=scale, keep_prob=kp, pre_tokens=pre, next_tokens=nxt,
                         inner_precise=inner_precise, prefix=prefix, sparse_mode=sparse_mode, pse_type=pse_type,
                         q_start_idx=q_start, kv_start_idx=kv_start, dropout_mask=drop_mask,
                         draw_missing_seed=False, names=names, allow_tnd=False)


def aclnnFlashAttentionScoreV2GetWorkspaceSize(
    query, key, value, realShiftOptional, dropMaskOptional, paddingMaskOptional, attenMaskOptional,
    prefixOptional, qStartIdxOptional, kvStartIdxOptional, scaleValue, keepProb, preTokens, nextTokens,
    headNum, inputLayout, innerPrecise, sparseMode, pseType, softmaxMaxOut, softmaxSumOut, softmaxOutOut,
    attentionOutOut,
) -> tuple[int, int, Executor | None]:
    """First stage of the forward: validate, size the workspace, return an executor."""

    def build() -> tuple[Problem, Callable[[], None]]:
        prob = _problem(query, key, value, realShiftOptional, dropMaskOptional, paddingMaskOptional,
                        attenMaskOptional, prefixOptional, qStartIdxOptional, kvStartIdxOptional, scaleValue,
                        keepProb, preTokens, nextTokens, headNum, inputLayout, innerPrecise, sparseMode, pseType,
                        _NAMES)
        if isinstance(keepProb, (int, float)) and not 0 < keepProb <= 1:
            raise invalid(f"keepProb={keepProb}: must be in (0, 1]")
        out = _check_out(attentionOutOut, "attentionOutOut", prob.out_shape, prob.dtype, prob.device)
        smax = _check_out(softmaxMaxOut, "softmaxMaxOut", prob.stats_shape, torch.float32, prob.device)
        ssum = _check_out(softmaxSumOut, "softmaxSumOut", prob.stats_shape, torch.float32, prob.device)
        if softmaxOutOut is not None and not isinstance(softmaxOutOut, Tensor):
            raise invalid(f"softmaxOutOut={softmaxOutOut!r}: must be a tensor or None")

        def run() -> None:
            o, m, l = run_forward(prob)
            out.copy_(o)
            smax.copy_(m)
            ssum.copy_(l)

        return prob, run

    return _prepare(build, backward=False)


def aclnnFlashAttentionScoreV2(workspace: Tensor | None, workspace_size: int, executor: Executor,
                               stream: Any = None) -> int:
    """Second stage of the forward: run the executor once, writing its outputs in place."""
    return _execute(workspace, workspace_size, executor)


def aclnnFlashAttentionScoreGradV2GetWorkspaceSize(
    query, keyIn, value, dy, pseShiftOptional, dropMaskOptional, paddingMaskOptional, attenMaskOptional,
    softmaxMaxOptional, softmaxSumOptional, softmaxInOptional, attentionInOptional, prefixOptional,
    qStartIdxOptional, kvStartIdxOptional, scaleValue, keepProb, preTokens, nextTokens, headNum, inputLayout,
    innerPrecise, sparseMode, pseType, dqOut, dkOut, dvOut, dpseOut,
) -> tuple[int, int, Executor | None]:
    """First stage of the backward; dpseOut (optional) receives the pse gradient for types 0/1."""

    def build() -> tuple[Problem, Callable[[], None]]:
        prob = _problem(query, keyIn, value, pseShiftOptional, dropMaskOptional, paddingMaskOptional,
                        attenMaskOptional, prefixOptional, qStartIdxOptional, kvStartIdxOptional, scaleValue,
                        keepProb, preTokens, nextTokens, headNum, inputLayout, innerPrecise, sparseMode, pseType,
                        _GRAD_NAMES)
        check_grad_inputs(prob, dy, attentionInOptional, softmaxMaxOptional, softmaxSumOptional, _GRAD_NAMES)
        q, k, v = prob.inputs
        dq = _check_out(dqOut, "dqOut", tuple(q.shape), q.dtype, prob.device)
        dk = _check_out(dkOut, "dkOut", tuple(k.shape), k.dtype, prob.device)
        dv = _check_out(dvOut, "dvOut", tuple(v.shape), v.dtype, prob.device)
        dpse = None
        if dpseOut is not None and prob.pse is not None:
            dpse = _check_out(dpseOut, "dpseOut", tuple(prob.pse.shape), prob.pse.dtype, prob.device)

        def run() -> None:
            gq, gk, gv, gpse, *_ = run_backward(prob, dy, attentionInOptional, softmaxMaxOptional, softmaxSumOptional)
            dq.copy_(gq)
            dk.copy_(gk)
            dv.copy_(gv)
            if dpse is not None:
                dpse.copy_(gpse)

        return prob, run

    return _prepare(build, backward=True)


def aclnnFlashAttentionScoreGradV2(workspace: Tensor | None, workspace_size: int, executor: Executor,
                                   stream: Any = None) -> int:
    """Second stage of the backward."""
    return _execute(workspace, workspace_size, executor)
