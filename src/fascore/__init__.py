"""fascore: Ascend's FlashAttentionScore (npu_fusion_attention) on PyTorch, CPU and CUDA."""
from .api import (
    npu_fusion_attention,
    npu_fusion_attention_grad,
    npu_fusion_attention_grad_v2,
    npu_fusion_attention_v2,
)
from .engine import available_engines, current_engine_name, register_engine, set_default_engine, use_engine
from .errors import (
    ACLNN_ERR_PARAM_INVALID,
    ACLNN_ERR_PARAM_NULLPTR,
    ACLNN_ERR_RUNTIME_ERROR,
    ACLNN_SUCCESS,
    FlashAttentionError,
)
from .generator import manual_seed
from .genmask import _npu_dropout_gen_mask, npu_dropout_gen_mask
from . import aclnn  # noqa: E402  (after the API it wraps)
from .ring import ring_attention_update  # noqa: E402
from . import distributed  # noqa: E402  (torch.distributed is imported by torch already)

__all__ = [
    "npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_grad",
    "npu_fusion_attention_grad_v2", "FlashAttentionError", "aclnn", "use_engine", "available_engines",
    "current_engine_name", "register_engine", "set_default_engine", "ACLNN_SUCCESS",
    "ACLNN_ERR_PARAM_NULLPTR", "ACLNN_ERR_PARAM_INVALID", "ACLNN_ERR_RUNTIME_ERROR",
]
__all__ += ["ring_attention_update", "distributed", "manual_seed", "_npu_dropout_gen_mask", "npu_dropout_gen_mask"]
__version__ = "0.1.0"
