"""Guard rails for code ported from other attention APIs: valid calls that are probably mistakes.

fascore follows Ascend's conventions, and several of them are the opposite of what flash-attn,
SDPA or xformers users write by habit. The calls below are valid (semantics §§2-5 define their
results) but are almost always a porting mistake, and their results are silently wrong. The
forward entry points (``npu_fusion_attention``, ``_v2``, ``_v3`` and ``fascore.attention``) run
these checks in eager mode after validation; they read the call and never change a result.

Default rules (on unless ``FASCORE_LINT=0``):

* ``keep-mask``: an ``atten_mask`` read as a full mask (sparse modes 0, 1, 5) whose True set is
  the complement of a causal or band pattern, or that masks every element of both the top-left
  and the bottom-right diagonal while leaving other positions visible. That is a keep-mask
  (True = attend, SDPA's polarity); fascore, like Ascend, masks where True.
* ``seq-lens``: TND ``actual_seq_qlen`` / ``actual_seq_kvlen`` whose last offset leaves rows of
  the packed tensor uncovered while the entries, read as per-sequence lengths, would fit it
  (``[100, 200, 300]`` with T = 600). Uncovered rows come out as zeros.

Strict rules (``FASCORE_LINT=strict``), for code being ported, since correct Ascend code uses
these values too:

* ``scale``: ``scale == 1.0`` (Ascend's default) with a head dim D > 1; flash-attn and SDPA
  default to 1/sqrt(D).
* ``keep-prob``: ``keep_prob <= 0.5``: keep_prob is the probability to keep, 1 - dropout_p.
* ``uncovered``: TND offsets that leave any row of the packed query or key tensor uncovered.

``FASCORE_LINT``: ``0`` / ``off`` (no checks), ``1`` / ``warn`` (default: a ``LintWarning``, a
``UserWarning``, once per call site and rule, attributed to the caller's line), ``error``
(raise ``LintError``, a ``FlashAttentionError`` with status 161002, on every offending call),
``strict`` (warnings, strict rules included), ``strict-error`` (errors, strict rules included).
``configure(level=..., strict=...)`` overrides the environment in-process; ``settings(...)`` is
the same as a context manager. The mask check reads the mask's two diagonals; only when one of
them is fully masked does it sample up to 64 rows, and only before a keep-mask verdict does it
confirm the pattern on every row (masks up to 16M elements); its verdict is cached per mask
tensor until the tensor changes.
Under torch.compile and fake tensors nothing is checked (the data cannot be read while tracing).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

from .errors import ACLNN_ERR_PARAM_INVALID, FlashAttentionError
from .params import Names
from .spec.values import as_int, as_int_list

__all__ = ["LintWarning", "LintError", "RULES", "STRICT_RULES", "check", "configure", "settings", "level", "reset",
           "keep_mask_reason"]

RULES = ("keep-mask", "seq-lens")
STRICT_RULES = ("scale", "keep-prob", "uncovered")
_LEVELS = {"0": "off", "off": "off", "false": "off", "no": "off", "none": "off",
           "1": "warn", "on": "warn", "warn": "warn", "true": "warn", "yes": "warn", "": "warn",
           "error": "error", "raise": "error", "2": "error",
           "strict": "warn+strict", "strict-warn": "warn+strict", "warn-strict": "warn+strict",
           "strict-error": "error+strict", "error-strict": "error+strict", "strict,error": "error+strict",
           "error,strict": "error+strict"}
_override: dict[str, Any] = {}
_reported: set[tuple[str, int, str]] = set()
_bad_env: set[str] = set()
_mask_cache: dict[int, tuple[weakref.ref, tuple, str | None]] = {}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SAMPLE_ROWS = 64
_EXACT_MAX = 1 << 24  # a keep-mask verdict on up to this many elements per slice is confirmed on every row


class LintWarning(UserWarning):
    """A valid call that is probably a porting mistake (``fascore.lint``)."""


class LintError(FlashAttentionError):
    """``FASCORE_LINT=error``: a guard rail fired (status 161002)."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message, ACLNN_ERR_PARAM_INVALID)
        self.rule = rule


# --------------------------------------------------------------------------- configuration
def level() -> tuple[str, bool]:
    """(``"off"`` | ``"warn"`` | ``"error"``, strict) in effect now."""
    raw = os.environ.get("FASCORE_LINT", "1").strip().lower()
    if raw not in _LEVELS:
        if raw not in _bad_env:
            _bad_env.add(raw)
            warnings.warn(f"FASCORE_LINT={raw!r}: must be one of 0, 1, error, strict, strict-error; using 1",
                          LintWarning, stacklevel=2)
        raw = "1"
    lvl, _, strict = _LEVELS[raw].partition("+")
    lvl = _override.get("level") or lvl
    strict_b = _override["strict"] if _override.get("strict") is not None else bool(strict)
    return lvl, strict_b


def configure(level: str | None = None, strict: bool | None = None) -> None:
    """Override ``FASCORE_LINT`` in this process: ``level`` "off" / "warn" / "error" (None: back to
    the environment), ``strict`` True / False (None: the environment's)."""
    if level is not None and level not in ("off", "warn", "error"):
        raise ValueError(f"level={level!r}: must be 'off', 'warn', 'error' or None")
    _override["level"] = level
    _override["strict"] = strict


@contextlib.contextmanager
def settings(level: str | None = None, strict: bool | None = None) -> Iterator[None]:
    """``configure`` for a block; the previous settings come back afterwards."""
    saved = dict(_override)
    configure(level, strict)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


def reset() -> None:
    """Forget which call sites were warned (each warns again once) and the cached mask verdicts."""
    _reported.clear()
    _mask_cache.clear()


def _call_site() -> tuple[str, int, int]:
    """(file, line, stacklevel for warnings.warn from ``_emit``) of the first frame outside fascore."""
    frame, lvl = sys._getframe(2), 2  # the frame that called _emit is warn's stacklevel 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.startswith("<fascore.")):
        frame, lvl = frame.f_back, lvl + 1
    if frame is None:
        return "<unknown>", 0, 2
    return frame.f_code.co_filename, frame.f_lineno, lvl


def _emit(rule: str, message: str, lvl: str, what: str = "") -> None:
    """Warn once per (call site, rule, ``what``) or raise, per ``lvl``."""
    text = f"fascore.lint [{rule}]: {message} (FASCORE_LINT=0 turns these checks off; docs/lint.md)"
    if lvl == "error":
        raise LintError(text, rule)
    file, line, stacklevel = _call_site()
    if (file, line, rule + what) in _reported:
        return
    _reported.add((file, line, rule + what))
    warnings.warn(text, LintWarning, stacklevel=stacklevel)


# --------------------------------------------------------------------------- keep-mask
def _rows(sq: int) -> Tensor:
    if sq <= _SAMPLE_ROWS:
        return torch.arange(sq)
    return torch.linspace(0, sq - 1, _SAMPLE_ROWS).round().long().unique()


def _band_of(m: Tensor) -> tuple[int | None, int | None] | None:
    """(lo, hi) if the True set of the 2-D bool ``m`` is {lo <= j - i <= hi} on the sampled rows
    (None: unbounded on that side); else None."""
    sq, skv = m.shape
    idx = _rows(sq)
    rows = m[idx.to(m.device)].cpu()
    cnt = rows.sum(1)
    first = rows.int().argmax(1)
    last = skv - 1 - rows.flip(1).int().argmax(1)
    lo = hi = None
    for i, c, f, la in zip(idx.tolist(), cnt.tolist(), first.tolist(), last.tolist()):
        if c == 0:
            continue
        if c != la - f + 1:
            return None  # not one interval per row
        for bound, val, edge in (("lo", f - i, f > 0), ("hi", la - i, la < skv - 1)):
            if edge:
                cur = lo if bound == "lo" else hi
                if cur is not None and cur != val:
                    return None
                if bound == "lo":
                    lo = val
                else:
                    hi = val
    for i, c, f, la in zip(idx.tolist(), cnt.tolist(), first.tolist(), last.tolist()):
        a = 0 if lo is None else max(0, i + lo)
        b = skv - 1 if hi is None else min(skv - 1, i + hi)
        if (c == 0) != (a > b) or (c and (f, la) != (a, b)):
            return None
    return lo, hi


def _is_band(m: Tensor, lo: int | None, hi: int | None) -> bool:
    """``m`` == {lo <= j - i <= hi} exactly, compared in chunks of about 1M elements."""
    sq, skv = m.shape
    step = max(1, (1 << 20) // skv)
    j = torch.arange(skv, device=m.device, dtype=torch.int32)[None, :]
    for i0 in range(0, sq, step):
        diff = j - torch.arange(i0, min(sq, i0 + step), device=m.device, dtype=torch.int32)[:, None]
        exp = torch.ones_like(diff, dtype=torch.bool)
        if lo is not None:
            exp &= diff >= lo
        if hi is not None:
            exp &= diff <= hi
        if not torch.equal(exp, m[i0:i0 + step]):
            return False
    return True


def keep_mask_reason(m: Tensor) -> str | None:
    """Why the 2-D mask ``m`` (nonzero = masked out) looks like a keep-mask, or None.

    Fires on a True set {j - i <= hi} containing the top-left or bottom-right diagonal (the
    complement of causal), on a finite band {lo <= j - i <= hi} containing one of them (the
    complement of a band), and on masks that mask both diagonals entirely but not everything.
    """
    sq, skv = m.shape
    if min(sq, skv) < 2:
        return None
    d = skv - sq
    tl, br = bool((m.diagonal(0) != 0).all()), bool((m.diagonal(d) != 0).all())
    if not (tl or br):
        return None  # a correct mask keeps some diagonal element: the common, cheap exit
    mb = m if m.dtype == torch.bool else m != 0
    band = _band_of(mb)
    if band is not None:
        lo, hi = band
        if lo is None and hi is None:
            return None  # everything masked: not a polarity question
        reason = None
        if lo is None and hi >= min(0, d):
            kind = "top-left" if hi == 0 else ("bottom-right" if hi == d else f"j - i <= {hi}")
            reason = (f"it masks exactly the positions a causal mask keeps ({kind}: True where j - i <= {hi}), "
                      "the complement of a causal mask")
        elif lo is not None and hi is not None and (lo <= 0 <= hi or lo <= d <= hi):
            reason = (f"it masks exactly a band around the diagonal ({lo} <= j - i <= {hi}), the complement of "
                      "a band (sliding-window) mask")
        if reason is None:
            return None  # a causal / band mask in Ascend's polarity: the cheap verdict of correct calls
        if sq * skv > _EXACT_MAX or _is_band(mb, lo, hi):  # confirmed on every row when affordable
            return reason
    if tl and br and min(sq, skv) >= 4 and _keep_shaped(mb):
        return "it masks every element of the diagonal while other positions take part"
    return None


def _keep_shaped(m: Tensor) -> bool:
    """The sampled rows of the 2-D bool ``m`` are what keep-masks' rows are (causal, band, padding,
    block-diagonal documents): one interval of True each, whose ends never move left from one row
    to the next, and not all of ``m`` True. Random masks almost never are."""
    sq, skv = m.shape
    rows = m[_rows(sq).to(m.device)].cpu()
    cnt = rows.sum(1)
    first = rows.int().argmax(1)
    last = skv - 1 - rows.flip(1).int().argmax(1)
    live = cnt > 0
    if not bool((cnt[live] == (last - first + 1)[live]).all()):
        return False
    f, la = first[live], last[live]
    if f.numel() > 1 and not (bool((f[1:] >= f[:-1]).all()) and bool((la[1:] >= la[:-1]).all())):
        return False
    if bool(rows.all()):
        return sq * skv <= _EXACT_MAX and not bool(m.all())
    return True


def _mask_slices(mask: Tensor) -> Iterator[Tensor]:
    """The distinct 2-D slices to look at: those whose diagonal is fully masked, at most 4."""
    sq, skv = mask.shape[-2:]
    if min(sq, skv) < 2:
        return
    m4 = mask.reshape(-1, sq, skv)
    full = (m4.diagonal(0, -2, -1) != 0).all(-1) | (m4.diagonal(skv - sq, -2, -1) != 0).all(-1)
    for k in full.nonzero().flatten()[:4].tolist():
        yield m4[k]


def _mask_verdict(mask: Tensor, parts: list[Tensor]) -> str | None:
    for part in parts:
        for sl in _mask_slices(part):
            reason = keep_mask_reason(sl)
            if reason is not None:
                return reason
    return None


def _check_mask(prob: Any, kw: dict[str, Any], nm: Names, lvl: str) -> None:
    mask = kw.get("atten_mask")
    if not isinstance(mask, Tensor) or as_int(kw.get("sparse_mode", 0), "sparse_mode") not in (0, 1, 5):
        return
    parts = [seg.mask.explicit for seg in prob.segments if seg.mask.explicit is not None]
    if len(parts) > 16:  # TND: a sample of the batches
        step = len(parts) / 16
        parts = [parts[int(k * step)] for k in range(16)]
    geo = tuple(tuple(p.shape) for p in parts)
    stamp = (mask._version, mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.dtype, geo)
    seen = _mask_cache.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == stamp:
        reason = seen[2]
    else:
        reason = _mask_verdict(mask, parts)
        if len(_mask_cache) >= 64:
            _mask_cache.pop(next(iter(_mask_cache)))
        _mask_cache[id(mask)] = (weakref.ref(mask), stamp, reason)
    if reason is not None:
        am = nm["atten_mask"]
        if am.startswith("attn_mask"):  # fascore.attention: its attn_mask is SDPA's, and the operator got ~attn_mask
            _emit("keep-mask", f"attn_mask is read in SDPA's polarity (True = attend), and ~attn_mask, the operator's "
                               f"mask, looks like a keep-mask: {reason}. attn_mask looks like an Ascend-style mask "
                               "(True = masked out): pass its complement", lvl)
            return
        _emit("keep-mask", f"{am} looks like a keep-mask (True = attend, SDPA's polarity): {reason}. fascore, "
                           f"like Ascend, masks where True: pass ~{am} (or, for causal / band patterns, the "
                           f"compressed mask with {nm['sparse_mode']}=2, 3 or 4)", lvl)


# --------------------------------------------------------------------------- TND lengths
def _body(value: Any) -> list[int]:
    cum = as_int_list(value, "lengths")
    end = len(cum)
    while end > 0 and cum[end - 1] == 0 and any(x > 0 for x in cum[:end - 1]):
        end -= 1
    return cum[:end]


def _check_lengths(prob: Any, kw: dict[str, Any], nm: Names, lvl: str, strict: bool) -> None:
    if prob.layout != "TND":
        return
    from .spec.tnd import cumsum

    q, k = prob.inputs[0], prob.inputs[1]
    for name, tensor, total, tname in (("actual_seq_qlen", "query", q.shape[0], "T1"),
                                       ("actual_seq_kvlen", "key", k.shape[0], "T2")):
        body = _body(kw[name])
        last = body[-1] if body else 0
        if last >= total:
            continue
        n = nm[name]
        if len(body) >= 2 and last < sum(body) <= total:  # read as lengths, they would cover more rows
            _emit("seq-lens", f"{n}={body if len(body) <= 8 else body[:8] + ['...']} ends at {last}, leaving rows "
                              f"{last}..{total - 1} of {nm[tensor]} ({tname}={total}) uncovered (they come out as "
                              f"zeros), and its entries add up to {sum(body)} <= {tname}: they look like per-sequence "
                              f"lengths. Ascend's lengths are cumulative end offsets: pass "
                              f"{cumsum(body)[:8]}{'...' if len(body) > 8 else ''} (itertools.accumulate or "
                              "torch.cumsum)", lvl, name)
        elif strict:
            _emit("uncovered", f"{n} ends at {last}: rows {last}..{total - 1} of {nm[tensor]} ({tname}={total}) are "
                               "in no batch and come out as zeros", lvl, name)


# --------------------------------------------------------------------------- strict scalars
def _check_scalars(prob: Any, nm: Names, lvl: str) -> None:
    d = prob.d + prob.dr
    if prob.scale == 1.0 and d > 1:
        _emit("scale", f"{nm['scale']}=1.0 (Ascend's default) with head dim D={d}: flash-attn and SDPA default to "
                       f"1/sqrt(D) = {d ** -0.5:.6g}; pass {nm['scale']}=D ** -0.5 if that is what you mean", lvl)
    if prob.keep_prob <= 0.5:
        kp = prob.keep_prob
        _emit("keep-prob", f"{nm['keep_prob']}={kp:g} keeps {100 * kp:.0f} % of the probabilities (drops "
                           f"{100 * (1 - kp):.0f} %): {nm['keep_prob']} is the probability to keep, 1 - dropout_p "
                           f"(flash-attn's dropout_p={kp:g} is {nm['keep_prob']}={1 - kp:g})", lvl)


def check(prob: Any, kw: dict[str, Any], names: Names | None = None) -> None:
    """Run the guard rails on one validated forward call: ``prob`` its canonical problem, ``kw`` its
    canonical arguments, ``names`` the caller's spellings. Warns, raises ``LintError`` or does
    nothing, per ``FASCORE_LINT``; never changes anything."""
    lvl, strict = level()
    if lvl == "off":
        return
    nm = names or Names()
    _check_mask(prob, kw, nm, lvl)
    _check_lengths(prob, kw, nm, lvl, strict)
    if strict:
        _check_scalars(prob, nm, lvl)
