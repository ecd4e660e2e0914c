"""Random bits: Ascend's Philox stream, the emulated NPU generator, torch_npu's mask generators."""
from .generator import NPUGenerator, default_generator, get_rng_state, initial_seed, manual_seed, set_rng_state
from .genmask import _npu_dropout_gen_mask, npu_dropout_gen_mask

__all__ = ["NPUGenerator", "default_generator", "manual_seed", "initial_seed", "get_rng_state", "set_rng_state",
           "_npu_dropout_gen_mask", "npu_dropout_gen_mask"]
