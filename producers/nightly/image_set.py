"""An exact, compact set of 63-bit image ids for de-duplicating a run, 12 bytes per id.

A Python set of ints costs about 70 bytes per id (the int object plus hash-table slots);
ten million rows would take most of a gigabyte. Here ids live in sorted numpy runs, each
id with the position it was first added at (uint32), merged like a log-structured tree:
a new run is merged into the previous one while that one is not more than twice its
size, so there are O(log n) runs and each id is copied O(log n) times. Membership for a
batch is one ``searchsorted`` per run. ``sorted_items`` hands back the ids sorted with
their first-seen positions, which is what the run's image snapshot is built from.
"""

from __future__ import annotations

import numpy as np

_EMPTY_IDS = np.zeros(0, np.int64)
_EMPTY_POS = np.zeros(0, np.uint32)
MAX_IDS = 2**32 - 1  # positions are uint32


def contains_sorted(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """For each needle, whether it is in the sorted array ``haystack``."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), bool)
    at = np.searchsorted(haystack, needles)
    np.minimum(at, len(haystack) - 1, out=at)
    hit: np.ndarray = haystack[at] == needles
    return hit


def merge_slots(a_keys: np.ndarray, b_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merging two sorted runs of distinct keys (no key in both) without sorting again:
    the output positions of b's keys, and a mask of the positions a's keys take."""
    slots = np.searchsorted(a_keys, b_keys) + np.arange(len(b_keys))
    from_a = np.ones(len(a_keys) + len(b_keys), bool)
    from_a[slots] = False
    return slots, from_a


def _merge(
    a_ids: np.ndarray, a_pos: np.ndarray, b_ids: np.ndarray, b_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted runs of distinct ids (no id is in both)."""
    slots, from_a = merge_slots(a_ids, b_ids)
    ids = np.empty(len(from_a), np.int64)
    pos = np.empty(len(from_a), np.uint32)
    ids[slots], pos[slots] = b_ids, b_pos
    ids[from_a], pos[from_a] = a_ids, a_pos
    return ids, pos


class ImageIdSet:
    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return sum(ids.nbytes + pos.nbytes for ids, pos in self._runs)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        found = np.zeros(len(ids), bool)
        for run_ids, _ in self._runs:
            found |= contains_sorted(run_ids, ids)
        return found

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Add a batch; return a mask of the ids that are new (first in batch order).

        New ids get the next positions in batch order: the i-th new id of the batch gets
        position ``len(self) + i`` (before the call).
        """
        ids = np.asarray(ids, np.int64)
        fresh = np.zeros(len(ids), bool)
        if len(ids) == 0:
            return fresh
        unique, first = np.unique(ids, return_index=True)
        new = ~self.contains(unique)
        unique, first = unique[new], first[new]
        if len(unique) == 0:
            return fresh
        if self._size + len(unique) > MAX_IDS:
            raise OverflowError("more than 2**32-1 distinct images in one run")
        fresh[first] = True
        in_batch_order = np.sort(first)
        positions = (self._size + np.searchsorted(in_batch_order, first)).astype(np.uint32)
        self._runs.append((unique, positions))
        self._size += len(unique)
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            b_ids, b_pos = self._runs.pop()
            a_ids, a_pos = self._runs.pop()
            self._runs.append(_merge(a_ids, a_pos, b_ids, b_pos))
        return fresh

    def sorted_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, their first-seen positions); merges everything into one run."""
        while len(self._runs) > 1:
            b_ids, b_pos = self._runs.pop()
            a_ids, a_pos = self._runs.pop()
            self._runs.append(_merge(a_ids, a_pos, b_ids, b_pos))
        if not self._runs:
            return _EMPTY_IDS, _EMPTY_POS
        return self._runs[0]
