"""aclnn status codes and the exception the torch-style entry points raise."""
from __future__ import annotations

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
