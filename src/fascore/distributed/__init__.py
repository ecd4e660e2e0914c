"""Context parallelism on torch.distributed: sharding, ring attention, and the merge of partial
results through their (max, sum) statistics (``npu_ring_attention_update``)."""
from .merge import merge_partials, ring_attention_update
from .ring import LOAD_BALANCES, pair_dropout_offset, ring_attention, shard, unshard

__all__ = ["shard", "unshard", "ring_attention", "pair_dropout_offset", "LOAD_BALANCES", "merge_partials",
           "ring_attention_update"]
