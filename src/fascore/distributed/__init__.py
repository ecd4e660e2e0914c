"""Context parallelism on torch.distributed: the sequence split across the ranks of a group.

Strategies: ``ring_attention`` (K/V shards travel around a ring), ``ulysses_attention``
(all-to-all of heads) and their hybrid, all through ``context_parallel_attention``; ``shard`` /
``unshard`` / ``shard_seq_lens`` cut and rebuild sequences; ``npu_ring_attention_update`` merges
partial results through their (max, sum) statistics. docs/context-parallel.md describes them.
"""
from .cp import STRATEGIES, context_parallel_attention, hybrid_groups
from .merge import merge_partials, npu_ring_attention_update, ring_attention_update
from .ring import LOAD_BALANCES, last_timings, ring_attention
from .shards import shard, shard_seq_lens, unshard
from .ulysses import ulysses_attention

__all__ = ["shard", "unshard", "shard_seq_lens", "ring_attention", "ulysses_attention", "context_parallel_attention",
           "hybrid_groups", "STRATEGIES", "LOAD_BALANCES", "last_timings", "merge_partials", "ring_attention_update",
           "npu_ring_attention_update"]
