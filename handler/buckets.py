"""Batch sizes a compiled model is built for: powers of two, a batch padded up to the next one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["bucket_sizes", "bucket_for", "pad_batch"]


def bucket_sizes(batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``batch_size``, then ``batch_size`` itself: ``8 -> (1, 2, 4, 8)``.

    Raises:
        ValueError: if ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sizes, size = [], 1
    while size < batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, batch_size)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images (``n`` itself past the largest)."""
    return next((b for b in buckets if b >= n), n)


def pad_batch(x: Tensor, size: int) -> Tensor:
    """``x`` with its last image repeated up to ``size`` rows (real pixels: no odd statistics)."""
    n = x.shape[0]
    if size <= n:
        return x
    return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
