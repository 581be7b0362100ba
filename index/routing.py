"""Image id -> shard, identical in every process on every host.

Ids from ``common.identity`` are already hashes, but a splitmix64 finaliser in front of the
modulo keeps the spread even for any id source (sequential test ids, ids from another
hash), and unlike Python's ``hash()`` it is not salted per process.
"""

from __future__ import annotations

import numpy as np

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15
_MUL_1 = 0xBF58476D1CE4E5B9
_MUL_2 = 0x94D049BB133111EB


def _check_n_shards(n_shards: int) -> None:
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")


def _mix64(value: int) -> int:
    z = (value + _GOLDEN_64) & _MASK_64
    z = ((z ^ (z >> 30)) * _MUL_1) & _MASK_64
    z = ((z ^ (z >> 27)) * _MUL_2) & _MASK_64
    return z ^ (z >> 31)


def shard_for(image_id: int, n_shards: int) -> int:
    """The shard of one image id, in ``[0, n_shards)``."""
    _check_n_shards(n_shards)
    return _mix64(image_id & _MASK_64) % n_shards


def shards_for(image_ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Vectorised ``shard_for``: same answers, for a whole array of ids at once (int64 out)."""
    _check_n_shards(n_shards)
    # uint64 arithmetic wraps modulo 2**64, which is exactly the masking _mix64 does by hand.
    z = np.asarray(image_ids).astype(np.int64).view(np.uint64)
    z = z + np.uint64(_GOLDEN_64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL_1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL_2)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_shards)).astype(np.int64)
