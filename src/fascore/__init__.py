"""fascore: Ascend's FlashAttentionScore (npu_fusion_attention) on PyTorch, CPU and CUDA.

The data path, one package per step: ``spec`` validates a call and builds its ``canonical``
problem, ``plan`` classifies its tiles, an engine of ``engines`` (chosen by dispatch) computes
it, ``api`` restores the caller's layout; ``aclnn`` is the two-stage C API's mirror, ``rng``
the dropout bits, ``distributed`` context parallelism, ``compat`` the torch_npu stand-in and
``tools`` the command line. docs/semantics.md is the behaviour fascore implements.
"""
from .api import (npu_fusion_attention, npu_fusion_attention_grad, npu_fusion_attention_grad_v2,
                  npu_fusion_attention_grad_v3, npu_fusion_attention_v2, npu_fusion_attention_v3)
from .engines import (available_engines, current_engine_name, register_engine, set_default_engine,
                      unregister_engine, use_engine)
from .errors import (ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, ACLNN_ERR_RUNTIME_ERROR, ACLNN_SUCCESS,
                     FlashAttentionError)
from .rng import _npu_dropout_gen_mask, manual_seed, npu_dropout_gen_mask
from . import aclnn  # noqa: E402  (after the API it wraps)
from . import distributed  # noqa: E402
from .distributed import npu_ring_attention_update, ring_attention_update  # noqa: E402
from .tools.capture import capture  # noqa: E402
from .api.attention import attention  # noqa: E402  (flash-attn / SDPA conventions over v2)

__all__ = [
    "npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3", "npu_fusion_attention_grad",
    "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3", "ring_attention_update",
    "npu_ring_attention_update",
    "_npu_dropout_gen_mask", "npu_dropout_gen_mask", "manual_seed", "capture", "FlashAttentionError",
    "ACLNN_SUCCESS", "ACLNN_ERR_PARAM_NULLPTR", "ACLNN_ERR_PARAM_INVALID", "ACLNN_ERR_RUNTIME_ERROR",
    "aclnn", "distributed", "use_engine", "set_default_engine", "available_engines", "current_engine_name",
    "register_engine", "unregister_engine", "attention",
]
__version__ = "0.1.0"
