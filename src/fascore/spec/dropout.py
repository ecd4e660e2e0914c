"""semantics §5: dropout (``keep_prob``, an explicit ``dropout_mask`` or generated bits from
``seed``/``offset``, the emulated NPU generator when seed == 0) and each segment's ``Dropout``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..canonical.dropout import Dropout
from ..errors import invalid
from ..params import Names
from ..rng.generator import default_generator
from ..rng.philox import pad16
from .scalars import Scalars
from .tensors import Geometry
from .tnd import Varlen
from .values import as_tensor

__all__ = ["Drop", "drop", "dropout_for"]


@dataclass(frozen=True)
class Drop:
    keep_prob: float
    numels: int  # B*N1*Sq*Skv (TND: N1 * sum Sq_b * Skv_b), whatever the padding
    bits: Tensor | None  # an explicit mask, flat
    seed: int
    offset: int

    def row_len(self, skv: int) -> int:
        """Elements per row of the numbering: Skv for explicit masks, padded to 16 for generated ones."""
        return skv if self.bits is not None else pad16(skv)


def drop(g: Geometry, vl: Varlen, sc: Scalars, dropout_mask: Any, draw_missing_seed: bool, nm: Names) -> Drop:
    if g.layout == "TND":
        numels = g.n1 * sum(x.sq * x.skv for x in vl.batches)
    else:
        numels = g.b * g.n1 * g.sq * g.skv
    seed, offset, bits = sc.seed, sc.offset, None
    if sc.keep_prob < 1.0:
        if dropout_mask is not None:
            bits = as_tensor(dropout_mask, nm["dropout_mask"], g.device)
            if bits.dtype != torch.uint8:
                hint = ""
                if bits.dtype == torch.bool or bits.numel() == numels:
                    hint = (f"; one element per position is the unpacked form: pack 8 per byte, least significant "
                            f"bit first (bit f % 8 of byte f // 8), or let keep_prob with seed/offset generate it")
                raise invalid(f"{nm['dropout_mask']} dtype {bits.dtype}: must be uint8 (bit-packed, 1 = keep)" + hint)
            need = -(-numels // 8)
            if bits.numel() < need:
                raise invalid(f"{nm['dropout_mask']} has {bits.numel()} bytes: needs at least ceil({numels}/8)={need}")
            bits = bits.reshape(-1)
        elif seed == 0 and draw_missing_seed:  # torch_npu: the device's generator supplies both
            seed, offset = default_generator(g.device).philox_engine_inputs(10)
    return Drop(sc.keep_prob, numels, bits, seed, offset)


def dropout_for(dr: Drop, base: tuple[int, ...], gq: int, gk: int) -> Dropout | None:
    """The keep mask of a segment whose batches start at element numbers ``base``."""
    if dr.keep_prob >= 1.0:
        return None
    return Dropout(dr.keep_prob, base, gq, dr.row_len(gk), bits=dr.bits, seed=dr.seed, offset=dr.offset)
