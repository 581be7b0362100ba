"""The image snapshot of a run: every image it published, for the next run's deletes.

Stored at ``runs/<run_id>/images.npz`` (numpy, no pickle): the image ids sorted (int64),
per image its key (uint16: the image's position in its item), the version it was
published with (int64) and the row of its item in an item table; the table is the item
ids as one UTF-8 blob plus offsets. A delete job needs the item id, the key and the
version of what it deletes (a tombstone at the same version wins over that upsert, and
never over a later one), so that is what is kept, and nothing else.

``SnapshotBuilder`` is also the run's de-duplication: an image listed twice (a repeated
row) is published once, the first time.
"""

from __future__ import annotations

import io
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from common.storage.base import Storage
from producers.nightly.image_set import ImageIdSet, contains_sorted

SNAPSHOT_FORMAT = 1
MAX_IMAGE_KEY = 2**16 - 1


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
        )

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.image_ids,
                self.image_keys,
                self.versions,
                self.item_rows,
                self.item_offsets,
                self.item_blob,
            )
        )

    def item_id(self, index: int) -> str:
        """The item id of the image at ``index`` (sorted order)."""
        row = int(self.item_rows[index])
        start, end = int(self.item_offsets[row]), int(self.item_offsets[row + 1])
        return bytes(self.item_blob[start:end]).decode("utf-8")

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
        np.savez(
            fh,
            format=np.array([SNAPSHOT_FORMAT], np.int64),
            image_ids=self.image_ids,
            image_keys=self.image_keys,
            versions=self.versions,
            item_rows=self.item_rows,
            item_offsets=self.item_offsets,
            item_blob=self.item_blob,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageSnapshot:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            version = int(arrays["format"][0])
            if version != SNAPSHOT_FORMAT:
                raise ValueError(f"image snapshot format {version} is not supported")
            return cls(
                image_ids=arrays["image_ids"].astype(np.int64, copy=False),
                image_keys=arrays["image_keys"].astype(np.uint16, copy=False),
                versions=arrays["versions"].astype(np.int64, copy=False),
                item_rows=arrays["item_rows"].astype(np.uint32, copy=False),
                item_offsets=arrays["item_offsets"].astype(np.uint64, copy=False),
                item_blob=arrays["item_blob"].astype(np.uint8, copy=False),
            )


def save_snapshot(storage: Storage, run_id: str, snapshot: ImageSnapshot) -> None:
    storage.put(snapshot_key(run_id), snapshot.to_bytes())


def load_snapshot(storage: Storage, run_id: str) -> ImageSnapshot | None:
    key = snapshot_key(run_id)
    if not storage.exists(key):
        return None
    return ImageSnapshot.from_bytes(storage.get(key))


class SnapshotBuilder:
    """Collects a run's distinct images in the order first seen; about 26 bytes each.

    12 bytes in the id set, 2 for the key, 8 for the version, 4 for the item row; plus
    per item with a new image 8 bytes of offset and its id's UTF-8 bytes.
    """

    def __init__(self) -> None:
        self._ids = ImageIdSet()
        self._keys = array("H")
        self._versions = array("q")
        self._item_rows = array("I")
        self._offsets = array("Q", [0])
        self._blob = bytearray()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        arrays = (self._keys, self._versions, self._item_rows, self._offsets)
        return self._ids.nbytes + len(self._blob) + sum(a.itemsize * len(a) for a in arrays)

    def add(
        self,
        item_ids: Sequence[str],
        item_of: Sequence[int],
        image_ids: Sequence[int],
        image_keys: Sequence[int],
        versions: Sequence[int],
    ) -> np.ndarray:
        """Add a batch of images; return the mask of the ones not seen before.

        ``item_of[i]`` is the index in ``item_ids`` of image ``i``'s item.
        """
        n = len(image_ids)
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
        del positions
        snapshot = ImageSnapshot(
            image_ids=ids,
            image_keys=keys,
            versions=versions,
            item_rows=item_rows,
            item_offsets=np.frombuffer(self._offsets, np.uint64),  # shares, no copy
            item_blob=np.frombuffer(self._blob, np.uint8),
        )
        self._offsets, self._blob = array("Q", [0]), bytearray()
        return snapshot
