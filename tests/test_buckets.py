"""Batch buckets of the compiled runner and the config switches that turn compiling on (no
compiling here: tests/test_compiled*.py compile)."""

from __future__ import annotations

import pytest
import torch

from handler.buckets import bucket_for, bucket_sizes, pad_batch
from handler.config import ServeConfig


def test_buckets_cover_every_batch_size_with_powers_of_two():
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(6) == (1, 2, 4, 6)
    assert bucket_sizes(1) == (1,)
    assert [bucket_for(n, bucket_sizes(8)) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert bucket_for(9, (1, 2)) == 9
    with pytest.raises(ValueError, match="batch_size must be positive"):
        bucket_sizes(0)


def test_pad_batch_repeats_the_last_image():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 3, 2, 2)
    torch.testing.assert_close(padded[:2], x)
    torch.testing.assert_close(padded[2], x[1])
    torch.testing.assert_close(padded[3], x[1])
    assert pad_batch(x, 2) is x


def test_config_switches_accept_the_old_booleans_and_refuse_unknown_values():
    assert ServeConfig.from_dict({"channels_last": True}).speed.channels_last == "on"
    assert ServeConfig.from_dict({"compile": False}).speed.compile == "off"
    assert ServeConfig.from_dict({"compile_freeze": True}).speed.compile_freeze == "on"
    assert ServeConfig.from_dict({}).speed.compile_freeze == "off"
    with pytest.raises(ValueError, match="'compile_freeze' must be one of auto, on, off"):
        ServeConfig.from_dict({"compile_freeze": "yes"})
    with pytest.raises(ValueError, match="'compile' must be one of auto, on, off"):
        ServeConfig.from_dict({"compile": "fast"})
    with pytest.raises(ValueError, match="'compile_batch' must be one of buckets, dynamic"):
        ServeConfig.from_dict({"compile_batch": "pad"})
