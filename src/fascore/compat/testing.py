"""``torch_npu.testing`` of fascore's stand-in: ``testcase.TestCase`` / ``run_tests`` and a few
``common_utils`` helpers, with torch_npu's comparison semantics, so torch_npu's operator tests
run unmodified.

``assertRtolEqual(x, y, prec=1e-4, prec16=1e-3, auto_trans_dtype=False, message=None)``, as
torch_npu's ``torch_npu/testing/testcase.py`` defines it:

* sequences are compared element by element; a tensor against a sequence converts the sequence;
* two bfloat16 tensors: ``torch.allclose(rtol=prec16, atol=prec16)``;
* otherwise both become numpy arrays of equal shape and dtype (bool, int8/16/32/64, uint8/16,
  float16/32/64); bool must be equal; float16 uses ``prec16`` with a denominator floor of 6e-8,
  the rest ``prec`` with 1e-9;
* NaNs must sit at the same positions; an element passes by ``|y - x| <= prec`` (absolute) or
  ``|y - x| / (max(|x|, |y|) + floor) <= prec`` (relative), and the comparison fails only if
  neither criterion holds everywhere *and* more than ``numel * prec`` elements fail each of them.
"""
from __future__ import annotations

import math
import os
import random
import sys
import unittest
from collections.abc import Sequence
from functools import wraps
from numbers import Number
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["TestCase", "run_tests", "create_common_tensor", "SupportedDevices", "set_npu_device",
           "get_npu_device"]

_RTOL_DTYPES = (np.bool_, np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
                np.float64)


def run_tests() -> None:
    """torch_npu's ``run_tests``: ``unittest.main`` over the calling script's arguments."""
    unittest.main(argv=sys.argv)


def get_npu_device() -> str:
    return os.environ.get("SET_NPU_DEVICE", "npu:0")


def set_npu_device() -> str:
    dev = get_npu_device()
    torch.npu.set_device(dev)  # type: ignore[attr-defined]  (the stand-in's torch.npu)
    return dev


def create_common_tensor(item: Sequence, min_value: float, max_value: float, device: Any = None) -> tuple:
    """``(cpu_tensor, npu_tensor)`` of uniform values; ``item`` = (numpy dtype, npu_format, shape).
    NPU formats other than -1 do not exist off Ascend and are ignored."""
    dtype, _npu_format, shape = item[0], item[1], item[2]
    data = np.random.uniform(min_value, max_value, shape).astype(dtype)
    return torch.from_numpy(data), torch.from_numpy(data).to(device or get_npu_device())


class SupportedDevices:
    """torch_npu's SoC filter. fascore computes Ascend's semantics on any device, so the test runs."""

    def __init__(self, supported_devices: list[str]) -> None:
        self.supported_devices = supported_devices

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)
        return run


def _is_number(v: Any) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool) and not isinstance(v, complex)


class TestCase(unittest.TestCase):
    """torch_npu's ``TestCase``: ``assertRtolEqual`` (module docstring), a tensor-aware
    ``assertEqual(x, y, prec=None)``, ``precision`` (default 1e-5) and torch_npu's per-test seed
    (``SEED`` environment variable, default 666)."""

    _precision = 1e-5
    maxDiff = None
    exact_dtype = False
    npu_device = "npu:0"

    @property
    def precision(self) -> float:
        return self._precision

    @precision.setter
    def precision(self, prec: float) -> None:
        self._precision = prec

    @classmethod
    def setUpClass(cls) -> None:
        cls.npu_device = set_npu_device()

    def setUp(self) -> None:
        seed = int(os.getenv("SEED", "666"))
        torch.manual_seed(seed)
        random.seed(seed)

    # ------------------------------------------------------------------ assertRtolEqual
    def assertRtolEqual(self, x: Any, y: Any, prec: float = 1.0e-4, prec16: float = 1.0e-3,  # noqa: N802
                        auto_trans_dtype: bool = False, message: Optional[str] = None) -> None:
        if isinstance(x, Sequence) and isinstance(y, Sequence) and not isinstance(x, str):
            for a, b in zip(x, y):
                self.assertRtolEqual(a, b, prec, prec16, auto_trans_dtype, message)
            return
        if isinstance(x, Tensor) and isinstance(y, Sequence):
            y = torch.as_tensor(y, dtype=x.dtype, device=x.device)
        elif isinstance(x, Sequence) and isinstance(y, Tensor):
            x = torch.as_tensor(x, dtype=y.dtype, device=y.device)
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if auto_trans_dtype:
                x = x.to(y.dtype)
            if x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16:
                if x.shape != y.shape:
                    self.fail(message or "shape error!")
                if not torch.allclose(x.detach().cpu(), y.detach().cpu(), rtol=prec16, atol=prec16):
                    self.fail(message or "result error!")
                return
            if torch.bfloat16 in (x.dtype, y.dtype):
                self.fail(message or "dtype error")
            x, y = x.detach().cpu().numpy(), y.detach().cpu().numpy()
        elif isinstance(x, Number) and isinstance(y, Number):
            x, y = np.array(x), np.array(y)
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            self.fail(message or "shape error")
        if x.dtype != y.dtype:
            self.fail(message or "dtype error")
        if x.dtype.type not in _RTOL_DTYPES:
            self.fail(message or f"required dtype in {[d.__name__ for d in _RTOL_DTYPES]}, got {x.dtype}")
        if x.dtype == np.bool_:
            if not np.equal(x, y).all():
                self.fail(message or "result error")
        elif x.dtype == np.float16:
            self._rtol_compare(x, y, prec16, 6e-8, message)
        else:
            self._rtol_compare(x, y, prec, 10e-10, message)

    def _rtol_compare(self, x: np.ndarray, y: np.ndarray, prec: float, floor: float, message: Optional[str]) -> None:
        nan = np.isnan(x) if x.dtype.kind == "f" else np.zeros(x.shape, dtype=bool)
        if x.dtype.kind == "f" and not np.equal(nan, np.isnan(y)).all():
            self.fail(message or "NaN positions differ")
        with np.errstate(all="ignore"):
            diff = y - x
            if nan.any():
                diff[nan] = 0
            err = np.abs(diff)
            abs_ok = np.less_equal(err, prec)
            rel_ok = np.less_equal(err / np.add(np.maximum(np.abs(x), np.abs(y)), floor), prec)
        if rel_ok.all() or abs_ok.all():
            return
        size = x.size
        if np.sum(~rel_ok) > size * prec and np.sum(~abs_ok) > size * prec:
            self.fail(message or f"result error: {int(np.sum(~rel_ok))} of {size} elements beyond rtol {prec} and "
                                 f"{int(np.sum(~abs_ok))} beyond atol {prec} (max |diff| {float(np.nanmax(err)):.3g})")

    # ------------------------------------------------------------------ assertEqual
    def assertEqual(self, x: Any, y: Any, prec: Optional[float] = None, message: str = "",  # noqa: N802
                    exact_dtype: Optional[bool] = None, **kwargs: Any) -> None:
        """Tensors, numbers and sequences within ``prec`` (default ``self.precision``); anything
        else as ``unittest``'s assertEqual."""
        msg = message or kwargs.get("msg") or None
        prec = self.precision if prec is None else prec
        exact = self.exact_dtype if exact_dtype is None else exact_dtype
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not isinstance(x, Tensor):
                x = torch.as_tensor(x, dtype=y.dtype, device=y.device)
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y, dtype=x.dtype, device=x.device)
            self._tensor_equal(x, y, prec, msg, exact)
        elif _is_number(x) and _is_number(y):
            if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
                return
            if x != y:
                self.assertLessEqual(abs(x - y), prec, msg)
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for a, b in zip(x, y):
                self.assertEqual(a, b, prec, message, exact_dtype)
        else:
            super().assertEqual(x, y, msg)

    def _tensor_equal(self, a: Tensor, b: Tensor, prec: float, msg: Optional[str], exact: bool) -> None:
        super().assertEqual(tuple(a.shape), tuple(b.shape), msg)
        if exact:
            super().assertEqual(a.dtype, b.dtype, msg)
        if a.numel() == 0:
            return
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.dtype == torch.bool or b.dtype == torch.bool:
            self.assertTrue(torch.equal(a.to(torch.int64), b.to(torch.int64)), msg)
            return
        ct = torch.complex128 if (a.dtype.is_complex or b.dtype.is_complex) else torch.float64
        a, b = a.to(ct), b.to(ct)
        if a.dtype.is_floating_point or a.dtype.is_complex:
            nan_a, nan_b = torch.isnan(a), torch.isnan(b)
            self.assertTrue(torch.equal(nan_a, nan_b), msg or "NaN positions differ")
            inf = torch.isinf(a) | torch.isinf(b)
            self.assertTrue(torch.equal(a[inf], b[inf]), msg or "infinities differ")
            keep = ~(nan_a | inf)
            a, b = a[keep], b[keep]
        if a.numel():
            err = (a - b).abs().max().item()
            self.assertLessEqual(err, prec, msg or f"max |x - y| = {err:.3g} > {prec}")
