"""Which row of a repeated item a run publishes: the newest version; of equals, the first.

A catalogue may list one item in several rows (an export that appends changes, a file
concatenated twice). A run publishes ONE row per item, so an item's images never mix two
versions (publishing row by row as read made the first row win and left a v2 item with
v1's image 0). The winner is the row with the highest ``version``; of several rows at that
version, the first. A later row at the winning version with other image URLs or another
etag contradicts it and is rejected, naming the line that is used: a version is the
catalogue's name for one content, so two contents under one version is an export bug the
operator must see (last-wins would hide it), and keeping the first keeps the choice the
same when rows are appended to the file. An exact repeat is counted, not rejected; rows of
older versions are counted as superseded.

The winner is known only once the whole file is read, so a run reads the catalogue twice.
This is the first pass: per distinct item 33 bytes (item key, version, line, content key,
repeated flag) in sorted numpy runs, merged like ``ImageIdSet`` without sorting again; the
merge of the two largest runs is the peak, about 80 bytes per distinct item (measured on
300k items, ``tests/unit/producers/test_winners.py``): 0.8 GB at 10M items, below the
second pass's snapshot, which peaked at 127 bytes per item of two images (measured on 100k
items). At the end only repeated items are kept (usually few); the publishing pass looks
each row up there. The first pass is over before the snapshot grows, so the run's peak is
the larger of the two, not their sum. Time: the pass reads 206k rows in 2.1 s against 1.4 s
for a bare read of the file; a whole 60k-item run on the local broker took 5.5 s against
4.7-5.2 s before (measured on the 2-core test machine).

A resumed run makes the same first pass over the same file, so it makes the same choices.
A file that changed between the passes is caught: every winner must be met exactly once.

The table is keyed by ``row_key`` and ``content_key``, Python's 64-bit ``hash()``: both
passes run in one process (a resume makes its own first pass) and nothing of the table is
stored, so a per-process hash is enough, and it costs 0.2 µs a row against 3 µs for two
blake2b digests (with them the pass took 3.0 s for the 206k rows, not 2.1 s).
``item_key`` (blake2b) is the stable key the image snapshot stores. Two distinct item ids
with one key would be taken for one item; at 10M items the chance is about 3e-6 per run,
the same order as two images sharing a 63-bit image id.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import numpy as np

from producers.nightly.image_set import contains_sorted, merge_slots

_BUFFER_ROWS = 1 << 16  # rows gathered before they are sorted into a run
_COLUMNS = ("keys", "versions", "lines", "contents", "repeated")


def item_key(item_id: str) -> int:
    """A stable signed 64-bit key of an item id (never Python's ``hash()``)."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8, person=b"imgfleet-item")
    return int.from_bytes(digest.digest(), "big", signed=True)


def row_key(item_id: str) -> int:
    """The item's key in the first pass's table: valid in this process only."""
    return hash(item_id)


def content_key(image_urls: tuple[str, ...], etag: str | None) -> int:
    """What a row would publish for its item, as a key valid in this process only."""
    return hash((tuple(image_urls), etag))


@dataclass(frozen=True)
class _Table:
    """Sorted by key, one entry per key: the winning row and whether the key repeats."""

    keys: np.ndarray  # int64
    versions: np.ndarray  # int64
    lines: np.ndarray  # int64
    contents: np.ndarray  # int64
    repeated: np.ndarray  # bool

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes for a in (self.keys, self.versions, self.lines, self.contents, self.repeated)
        )


def _reduce(
    keys: np.ndarray,
    versions: np.ndarray,
    lines: np.ndarray,
    contents: np.ndarray,
    repeated: np.ndarray,
) -> _Table:
    """One entry per key: highest version, then lowest line."""
    n = len(keys)
    if n == 0:
        return _Table(keys, versions, lines, contents, repeated)
    order = np.lexsort((lines, -versions, keys))  # the last key is the primary one
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    sizes = np.diff(np.append(starts, n))
    again = np.logical_or.reduceat(repeated[order], starts) | (sizes > 1)
    winners = order[starts]
    return _Table(keys[starts], versions[winners], lines[winners], contents[winners], again)


def _better(av: np.ndarray, al: np.ndarray, bv: np.ndarray, bl: np.ndarray) -> np.ndarray:
    """Where row b beats row a: a higher version, or the same one on an earlier line."""
    better: np.ndarray = (bv > av) | ((bv == av) & (bl < al))
    return better


def _merge(a: _Table, b: _Table) -> _Table:
    """Merge two tables without sorting again: the output and small index arrays are all
    that is allocated (the peak is the two inputs plus the output, about 2x)."""
    if len(a) == 0 or len(b) == 0:
        return b if len(a) == 0 else a
    at = np.minimum(np.searchsorted(a.keys, b.keys), len(a) - 1)
    both = a.keys[at] == b.keys
    ib = np.flatnonzero(both)
    ia = at[ib]
    new = np.flatnonzero(~both)
    del at, both
    slots, from_a = merge_slots(a.keys, b.keys[new])
    n = len(from_a)
    columns = []
    for column in _COLUMNS:
        a_col, b_col = getattr(a, column), getattr(b, column)
        out = np.empty(n, a_col.dtype)
        out[from_a] = a_col
        out[slots] = b_col[new]
        columns.append(out)
    keys, versions, lines, contents, repeated = columns
    # Keys in both: a's entry moved right by the new keys before it; b may win it.
    out_a = ia + np.searchsorted(b.keys[new], a.keys[ia])
    wins = _better(a.versions[ia], a.lines[ia], b.versions[ib], b.lines[ib])
    won_at, won_by = out_a[wins], ib[wins]
    versions[won_at] = b.versions[won_by]
    lines[won_at] = b.lines[won_by]
    contents[won_at] = b.contents[won_by]
    repeated[out_a] = True
    return _Table(keys, versions, lines, contents, repeated)


class ItemVersions:
    """The first pass: ``add`` every usable row, then ``finish`` for the repeated items."""

    def __init__(self) -> None:
        self._runs: list[_Table] = []
        self._keys = array("q")
        self._versions = array("q")
        self._lines = array("q")
        self._contents = array("q")
        self.rows = 0

    @property
    def nbytes(self) -> int:
        buffered = sum(a.itemsize * len(a) for a in (self._keys, self._versions, self._lines))
        return sum(run.nbytes for run in self._runs) + buffered + 8 * len(self._contents)

    def add(self, key: int, version: int, line: int, content: int) -> None:
        self._keys.append(key)
        self._versions.append(version)
        self._lines.append(line)
        self._contents.append(content)
        self.rows += 1
        if len(self._keys) >= _BUFFER_ROWS:
            self._spill()

    def _spill(self) -> None:
        if not self._keys:
            return
        n = len(self._keys)
        run = _reduce(
            np.frombuffer(self._keys, np.int64).copy(),
            np.frombuffer(self._versions, np.int64).copy(),
            np.frombuffer(self._lines, np.int64).copy(),
            np.frombuffer(self._contents, np.int64).copy(),
            np.zeros(n, bool),
        )
        self._keys, self._versions = array("q"), array("q")
        self._lines, self._contents = array("q"), array("q")
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b = self._runs.pop()
            self._runs.append(_merge(self._runs.pop(), b))

    def finish(self) -> Winners:
        """The winning rows of the items listed more than once; the pass's memory is freed.

        The runs are not merged into one: only the entries of repeated keys (flagged, or
        in another run) are taken out of each and reduced, so the peak stays at what is
        held plus a mask and a search index of the largest run (9 bytes per item).
        """
        self._spill()
        runs, self._runs = self._runs, []
        parts: list[_Table] = []
        for i, run in enumerate(runs):
            pick = run.repeated.copy()
            for j, other in enumerate(runs):
                if j != i:
                    pick |= contains_sorted(other.keys, run.keys)
            parts.append(
                _Table(
                    run.keys[pick],
                    run.versions[pick],
                    run.lines[pick],
                    run.contents[pick],
                    np.ones(int(pick.sum()), bool),
                )
            )
        del runs
        if not parts:
            return Winners.none()
        table = _reduce(*(np.concatenate([getattr(p, c) for p in parts]) for c in _COLUMNS))
        return Winners(table.keys, table.versions, table.lines, table.contents)


@dataclass(frozen=True)
class Winners:
    """The winning row of each repeated item, sorted by item key."""

    keys: np.ndarray  # int64, sorted, distinct
    versions: np.ndarray  # int64
    lines: np.ndarray  # int64
    contents: np.ndarray  # int64

    @classmethod
    def none(cls) -> Winners:
        empty = np.zeros(0, np.int64)
        return cls(empty, empty, empty, empty)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """For each key, its index here, or -1 (an item listed once)."""
        keys = np.asarray(keys, np.int64)
        if len(self.keys) == 0 or len(keys) == 0:
            return np.full(len(keys), -1, np.int64)
        at = np.searchsorted(self.keys, keys)
        np.minimum(at, len(self.keys) - 1, out=at)
        found: np.ndarray = np.where(self.keys[at] == keys, at, -1)
        return found
