"""2.5D context: each slice with its neighbours as input channels (``ModelConfig.in_channels``).

A model with ``in_channels`` K > 1 (odd) sees slice ``z`` as the stack ``z - K//2 .. z + K//2``
(edge slices repeated at the volume's ends) and predicts slice ``z``. Training (the crop is cut
at the same place in every slice of the stack) and inference build the stacks the same way.
"""

from __future__ import annotations

import numpy as np


def neighbours(start: int, stop: int, depth: int, context: int) -> np.ndarray:
    """``(stop - start) x context`` slice numbers: each slice of ``start:stop`` with its
    ``context // 2`` neighbours on either side, clamped to ``0 .. depth - 1`` (edges repeat)."""
    r = context // 2
    return np.clip(np.arange(start, stop)[:, None] + np.arange(-r, r + 1)[None, :], 0, depth - 1)


def stack_slices(volume, start: int, stop: int, context: int) -> np.ndarray:
    """Slices ``start:stop`` of a ``D x H x W`` volume (an array or an on-disk volume) with their
    neighbours: ``(stop - start) x context x H x W`` float32, read as one contiguous block."""
    z = neighbours(start, stop, len(volume), context)
    lo, hi = int(z.min()), int(z.max()) + 1
    block = np.asarray(volume[lo:hi], dtype=np.float32)
    return block[z - lo]
