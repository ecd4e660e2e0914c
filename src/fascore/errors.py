"""aclnn status codes and the exception the torch-style entry points raise."""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["ACLNN_SUCCESS", "ACLNN_ERR_PARAM_NULLPTR", "ACLNN_ERR_PARAM_INVALID", "ACLNN_ERR_RUNTIME_ERROR",
           "FlashAttentionError", "invalid", "nullptr", "runtime", "warn_user"]

ACLNN_SUCCESS = 0
ACLNN_ERR_PARAM_NULLPTR = 161001
ACLNN_ERR_PARAM_INVALID = 161002
ACLNN_ERR_RUNTIME_ERROR = 361001


class FlashAttentionError(ValueError):
    """Invalid input or a failure while running.

    ``status`` is the aclnn code (161001 null pointer, 161002 invalid parameter,
    361001 runtime error); the message names the parameter, the value and the rule.
    """

    def __init__(self, message: str, status: int = ACLNN_ERR_PARAM_INVALID) -> None:
        super().__init__(message)
        self.status = status


def invalid(message: str) -> FlashAttentionError:
    return FlashAttentionError(message, ACLNN_ERR_PARAM_INVALID)


def nullptr(name: str) -> FlashAttentionError:
    return FlashAttentionError(f"{name}=None: {name} is required", ACLNN_ERR_PARAM_NULLPTR)


def runtime(message: str) -> FlashAttentionError:
    return FlashAttentionError(message, ACLNN_ERR_RUNTIME_ERROR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside fascore (the caller's line)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.startswith("<fascore.")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
