"""The image snapshot of a run: every image it published, for the next run's deletes.

Stored at ``runs/<run_id>/images.npz`` (numpy, no pickle): the image ids sorted (int64),
per image its key (uint16: the image's position in its item), the version it was
published with (int64), the row of its item in an item table, its URL and the position it
was first seen at (uint32); the table is the item ids as one UTF-8 blob plus offsets, and
each item's key (``winners.item_key``). A delete job needs the item id, the key and the
version of what it deletes (a tombstone at the same version wins over that upsert, and
never over a later one). The URL is what lets the next run keep an item whose row it
rejected: it republishes the item's images as this run had them (``producers.nightly.kept``),
because a nightly generation holds only what its run mentions.

URLs are kept in the order first seen, in zlib-compressed JSON blocks (one per batch
added): about 9 bytes per URL of a CDN-style catalogue with hashed paths (81 bytes raw),
measured; a lookup decompresses only the blocks it needs. Format 1 snapshots (older
versions: no URLs, no item keys) are still read: item keys are computed from the item ids,
and their URLs are unknown.

``SnapshotBuilder`` is also the run's de-duplication: an image listed twice is published
once, the first time (the run publishes one row per item, ``producers.nightly.winners``, so
this only ever catches two ids that hash alike).
"""

from __future__ import annotations

import io
import tempfile
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import orjson

from common.storage.base import Storage
from producers.nightly.image_set import ImageIdSet, contains_sorted
from producers.nightly.winners import item_key

SNAPSHOT_FORMAT = 2
_READABLE_FORMATS = (1, 2)
MAX_IMAGE_KEY = 2**16 - 1
_URL_ZLIB_LEVEL = 1  # level 6 saves 7% more for 2.2x the time (2000 URLs: 0.7 vs 1.6 ms)


def _empty(dtype: type) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(0, dtype)


def snapshot_key(run_id: str) -> str:
    return f"runs/{run_id}/images.npz"


@dataclass(frozen=True)
class ImageSnapshot:
    image_ids: np.ndarray  # int64, sorted, distinct
    image_keys: np.ndarray  # uint16
    versions: np.ndarray  # int64
    item_rows: np.ndarray  # uint32: row of the image's item in the item table
    item_offsets: np.ndarray  # uint64 [items + 1] into item_blob
    item_blob: np.ndarray  # uint8: item ids, UTF-8, back to back
    # Format 2. item_keys None: a format 1 snapshot (computed from the item ids on demand).
    item_keys: np.ndarray | None = None  # int64 [items]
    positions: np.ndarray = field(
        default_factory=_empty(np.uint32)
    )  # uint32: the position each image was first seen at
    url_starts: np.ndarray = field(
        default_factory=_empty(np.uint64)
    )  # uint64 [blocks]: first position in each block
    url_offsets: np.ndarray = field(
        default_factory=_empty(np.uint64)
    )  # uint64 [blocks + 1] into url_blob
    url_blob: np.ndarray = field(
        default_factory=_empty(np.uint8)
    )  # uint8: the zlib-compressed JSON blocks

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @classmethod
    def empty(cls) -> ImageSnapshot:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.uint16),
            np.zeros(0, np.int64),
            np.zeros(0, np.uint32),
            np.zeros(1, np.uint64),
            np.zeros(0, np.uint8),
            item_keys=np.zeros(0, np.int64),
            positions=np.zeros(0, np.uint32),
            url_starts=np.zeros(0, np.uint64),
            url_offsets=np.zeros(1, np.uint64),
            url_blob=np.zeros(0, np.uint8),
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "image_ids": self.image_ids,
            "image_keys": self.image_keys,
            "versions": self.versions,
            "item_rows": self.item_rows,
            "item_offsets": self.item_offsets,
            "item_blob": self.item_blob,
            "item_keys": self.item_keys_by_row(),
            "positions": self.positions,
            "url_starts": self.url_starts,
            "url_offsets": self.url_offsets,
            "url_blob": self.url_blob,
        }

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays().values())

    def item_keys_by_row(self) -> np.ndarray:
        """The key of each item of the item table (format 1: computed from its id)."""
        if self.item_keys is None:
            keys = [item_key(self.item_id_at_row(row)) for row in range(len(self.item_offsets) - 1)]
            object.__setattr__(self, "item_keys", np.array(keys, np.int64))
        assert self.item_keys is not None
        return self.item_keys

    def item_keys_of_images(self) -> np.ndarray:
        """The item key of each image (sorted order)."""
        keys: np.ndarray = self.item_keys_by_row()[self.item_rows]
        return keys

    def item_id_at_row(self, row: int) -> str:
        """The item id at ``row`` of the item table."""
        start, end = int(self.item_offsets[row]), int(self.item_offsets[row + 1])
        return bytes(self.item_blob[start:end]).decode("utf-8")

    def urls_at(self, indexes: np.ndarray) -> list[str | None]:
        """The URL of each image at ``indexes`` (sorted order); None where unknown."""
        indexes = np.asarray(indexes, np.int64)
        out: list[str | None] = [None] * len(indexes)
        if len(self.url_starts) == 0 or len(indexes) == 0:
            return out
        positions = self.positions[indexes].astype(np.int64)
        blocks = np.searchsorted(self.url_starts.astype(np.int64), positions, side="right") - 1
        order = np.argsort(blocks, kind="stable")
        cuts = np.flatnonzero(np.diff(blocks[order])) + 1
        for group in np.split(order, cuts):
            block = int(blocks[group[0]])
            start, end = int(self.url_offsets[block]), int(self.url_offsets[block + 1])
            urls = orjson.loads(zlib.decompress(self.url_blob[start:end].tobytes()))
            first = int(self.url_starts[block])
            for at in group.tolist():
                out[at] = urls[int(positions[at]) - first]
        return out

    def item_id(self, index: int) -> str:
        """The item id of the image at ``index`` (sorted order)."""
        return self.item_id_at_row(int(self.item_rows[index]))

    def missing_from(self, current: ImageSnapshot) -> np.ndarray:
        """Indexes (sorted order) of this snapshot's images that ``current`` lacks."""
        gone = ~contains_sorted(current.image_ids, self.image_ids)
        indexes: np.ndarray = np.flatnonzero(gone)
        return indexes

    def to_bytes(self) -> bytes:
        # Through a temporary file, not BytesIO + getvalue(): one copy of the file in
        # memory beside the arrays instead of two (this is the run's memory peak).
        with tempfile.TemporaryFile() as fh:
            self._write(fh)
            fh.seek(0)
            return fh.read()

    def _write(self, fh: BinaryIO) -> None:
        arrays: dict[str, Any] = {"format": np.array([SNAPSHOT_FORMAT], np.int64)}
        arrays.update(self._arrays())
        np.savez(fh, **arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageSnapshot:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            version = int(arrays["format"][0])
            if version not in _READABLE_FORMATS:
                raise ValueError(f"image snapshot format {version} is not supported")
            snapshot = cls(
                image_ids=arrays["image_ids"].astype(np.int64, copy=False),
                image_keys=arrays["image_keys"].astype(np.uint16, copy=False),
                versions=arrays["versions"].astype(np.int64, copy=False),
                item_rows=arrays["item_rows"].astype(np.uint32, copy=False),
                item_offsets=arrays["item_offsets"].astype(np.uint64, copy=False),
                item_blob=arrays["item_blob"].astype(np.uint8, copy=False),
            )
            if version == 1:
                return snapshot
            return cls(
                **{
                    name: getattr(snapshot, name)
                    for name in (
                        "image_ids",
                        "image_keys",
                        "versions",
                        "item_rows",
                        "item_offsets",
                        "item_blob",
                    )
                },
                item_keys=arrays["item_keys"].astype(np.int64, copy=False),
                positions=arrays["positions"].astype(np.uint32, copy=False),
                url_starts=arrays["url_starts"].astype(np.uint64, copy=False),
                url_offsets=arrays["url_offsets"].astype(np.uint64, copy=False),
                url_blob=arrays["url_blob"].astype(np.uint8, copy=False),
            )


def save_snapshot(storage: Storage, run_id: str, snapshot: ImageSnapshot) -> None:
    storage.put(snapshot_key(run_id), snapshot.to_bytes())


def load_snapshot(storage: Storage, run_id: str) -> ImageSnapshot | None:
    key = snapshot_key(run_id)
    if not storage.exists(key):
        return None
    return ImageSnapshot.from_bytes(storage.get(key))


class SnapshotBuilder:
    """Collects a run's distinct images in the order first seen; about 42 bytes each.

    12 bytes in the id set, 2 for the key, 8 for the version, 4 for the item row, about 9
    for the compressed URL; plus per item with a new image 8 bytes of offset, 8 of item key
    and its id's UTF-8 bytes. Measured: 42.5 bytes an image, 127 per item of two images at
    the peak of ``finish`` (100k items, CDN-style URLs; 26 bytes an image before URLs and
    item keys were kept).
    """

    def __init__(self) -> None:
        self._ids = ImageIdSet()
        self._keys = array("H")
        self._versions = array("q")
        self._item_rows = array("I")
        self._offsets = array("Q", [0])
        self._blob = bytearray()
        self._item_keys = array("q")
        self._url_starts = array("Q")
        self._url_offsets = array("Q", [0])
        self._url_blob = bytearray()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        arrays = (
            self._keys,
            self._versions,
            self._item_rows,
            self._offsets,
            self._item_keys,
            self._url_starts,
            self._url_offsets,
        )
        blobs = len(self._blob) + len(self._url_blob)
        return self._ids.nbytes + blobs + sum(a.itemsize * len(a) for a in arrays)

    def item_keys(self) -> np.ndarray:
        """The keys of the items added so far (a copy)."""
        return np.frombuffer(self._item_keys, np.int64).copy()

    def add(
        self,
        item_ids: Sequence[str],
        item_of: Sequence[int],
        image_ids: Sequence[int],
        image_keys: Sequence[int],
        versions: Sequence[int],
        urls: Sequence[str],
        item_keys: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Add a batch of images; return the mask of the ones not seen before.

        ``item_of[i]`` is the index in ``item_ids`` of image ``i``'s item; ``item_keys``
        (default: computed) are the items' ``winners.item_key``.
        """
        n = len(image_ids)
        first_position = len(self._ids)
        fresh = self._ids.add(np.fromiter(image_ids, np.int64, n))
        new_at = np.flatnonzero(fresh)
        if len(new_at) == 0:
            return fresh
        items = np.fromiter(item_of, np.int64, n)[new_at]
        new_items = np.unique(items)
        # Only items with a new image enter the item table, in first-seen order.
        row_of = np.zeros(len(item_ids), np.int64)
        first_row = len(self._offsets) - 1
        row_of[new_items] = first_row + np.arange(len(new_items))
        for slot in new_items.tolist():
            self._blob += item_ids[slot].encode("utf-8")
            self._offsets.append(len(self._blob))
            self._item_keys.append(
                item_key(item_ids[slot]) if item_keys is None else item_keys[slot]
            )
        # New images take the next positions in batch order (``ImageIdSet.add``).
        block = orjson.dumps([urls[at] for at in new_at.tolist()])
        self._url_starts.append(first_position)
        self._url_blob += zlib.compress(block, _URL_ZLIB_LEVEL)
        self._url_offsets.append(len(self._url_blob))
        keys = np.fromiter(image_keys, np.int64, n)[new_at]
        if len(keys) and int(keys.max()) > MAX_IMAGE_KEY:
            raise ValueError(f"an image key above {MAX_IMAGE_KEY} does not fit the snapshot")
        self._keys.frombytes(keys.astype(np.uint16).tobytes())
        self._versions.frombytes(np.fromiter(versions, np.int64, n)[new_at].tobytes())
        self._item_rows.frombytes(row_of[items].astype(np.uint32).tobytes())
        return fresh

    def finish(self) -> ImageSnapshot:
        """The snapshot; the builder hands over its memory and is empty afterwards."""
        ids, positions = self._ids.sorted_items()
        self._ids = ImageIdSet()
        keys = np.frombuffer(self._keys, np.uint16)[positions]
        self._keys = array("H")
        versions = np.frombuffer(self._versions, np.int64)[positions]
        self._versions = array("q")
        item_rows = np.frombuffer(self._item_rows, np.uint32)[positions]
        self._item_rows = array("I")
        snapshot = ImageSnapshot(
            image_ids=ids,
            image_keys=keys,
            versions=versions,
            item_rows=item_rows,
            item_offsets=np.frombuffer(self._offsets, np.uint64),  # shares, no copy
            item_blob=np.frombuffer(self._blob, np.uint8),
            item_keys=np.frombuffer(self._item_keys, np.int64),
            positions=positions,
            url_starts=np.frombuffer(self._url_starts, np.uint64),
            url_offsets=np.frombuffer(self._url_offsets, np.uint64),
            url_blob=np.frombuffer(self._url_blob, np.uint8),
        )
        self._offsets, self._blob = array("Q", [0]), bytearray()
        self._item_keys, self._url_starts = array("q"), array("Q")
        self._url_offsets, self._url_blob = array("Q", [0]), bytearray()
        return snapshot
