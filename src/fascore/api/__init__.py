"""The torch-style entry points and what runs them: generated functions (``functions``),
autograd (``autograd``), custom ops for torch.compile (``ops``), dispatch + restore (``run``)
and the memory guard (``memory``)."""
from .functions import (npu_fusion_attention, npu_fusion_attention_grad, npu_fusion_attention_grad_v2,
                        npu_fusion_attention_grad_v3, npu_fusion_attention_v2, npu_fusion_attention_v3)

__all__ = ["npu_fusion_attention", "npu_fusion_attention_v2", "npu_fusion_attention_v3",
           "npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3"]
