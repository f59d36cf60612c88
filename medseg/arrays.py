"""Whole-volume array helpers whose temporaries stay a small fraction of the volume."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

SLAB_VALUES = 1 << 22  # values of a (channels, ..., slab) temporary: 16 MB in float32


def slabs(shape: Sequence[int], channels: int = 1, budget: int = SLAB_VALUES) -> Iterator[tuple[Any, ...]]:
    """Index tuples ``(..., slice)`` that cover ``(..., *shape)`` in slabs along the last axis, each slab
    holding at most ``budget`` values over ``channels`` channels (at least one slice). The same index selects
    the slab of a ``(*shape)`` map and of a ``(P, *shape)`` stack."""
    per_slice = max(1, channels * int(np.prod(shape[:-1], dtype=np.int64)))
    step = max(1, budget // per_slice)
    for start in range(0, int(shape[-1]), step):
        yield (Ellipsis, slice(start, min(start + step, int(shape[-1]))))
