"""Vector segments: the durable, append-only per-shard log that workers write.

A worker acks a job only once its record is in a flushed segment, so a segment object is
written whole (``Storage.put`` is atomic) and never changed afterwards. Builds replay
segments in key order; keys start with a zero-padded nanosecond timestamp and a per-writer
sequence number, so lexical key order is write order.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.storage.base import Storage
from index.npz import pack_arrays, unpack_arrays
from index.routing import shard_for

SEGMENT_FORMAT_VERSION = 3
# Version 1 segments lack the etag / last_modified / run_id columns, version 2 the url and
# payload columns; missing columns read as "".
_READABLE_FORMAT_VERSIONS = (1, 2, 3)
SEGMENTS_PREFIX = "segments/"
SEGMENT_SUFFIX = ".seg"
_MAX_IMAGE_ID = (1 << 63) - 1  # FAISS ids are signed int64
_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*$")


def shard_prefix(shard: int) -> str:
    return f"{SEGMENTS_PREFIX}shard-{shard:04d}/"


@dataclass(frozen=True)
class VectorRecord:
    """One upsert (``vector`` set) or delete (``vector is None``) of one image."""

    image_id: int
    item_id: str
    version: int
    content_hash: str
    model_id: str
    vector: np.ndarray | None
    # Source validators and the nightly run the record belongs to. Optional so older
    # callers and older segments keep working; "" means unknown / not part of a run.
    etag: str = ""
    last_modified: str = ""
    run_id: str = ""
    # What search shows and filters on: the image URL and the catalogue attributes as
    # ``common.payload.encode_payload`` text ("" for none).
    url: str = ""
    payload: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.image_id <= _MAX_IMAGE_ID:
            raise ValueError(f"image_id {self.image_id} is outside [0, 2**63)")
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
        if self.vector is None:
            return
        vector = np.asarray(self.vector)
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(f"vector must be 1-D and non-empty, got shape {vector.shape}")
        if not np.isfinite(vector).all():
            # A NaN vector would poison every inner-product search it takes part in.
            raise ValueError(f"vector of image {self.image_id} has non-finite values")
        # Stored as float16 either way; converting once here keeps the segment encoder simple.
        object.__setattr__(self, "vector", vector.astype(np.float16, copy=False))

    @property
    def is_tombstone(self) -> bool:
        return self.vector is None

    @property
    def dim(self) -> int | None:
        return None if self.vector is None else int(self.vector.shape[0])


@dataclass(frozen=True)
class SegmentData:
    """A decoded segment as column arrays (row ``i`` of every array is one record)."""

    key: str
    image_ids: np.ndarray  # int64 [n]
    versions: np.ndarray  # int64 [n]
    tombstones: np.ndarray  # bool [n]
    vectors: np.ndarray  # float16 [n, d]; zero rows for tombstones; d == 0 if all are
    item_ids: np.ndarray  # unicode [n]
    content_hashes: np.ndarray  # unicode [n]
    model_ids: np.ndarray  # unicode [n]
    etags: np.ndarray  # unicode [n]; "" where unknown
    last_modifieds: np.ndarray  # unicode [n]
    run_ids: np.ndarray  # unicode [n]; "" for records outside a run
    urls: np.ndarray  # unicode [n]; "" where unknown
    payloads: np.ndarray  # unicode [n]; "" for no payload

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def records(self) -> Iterator[VectorRecord]:
        for i in range(len(self)):
            yield VectorRecord(
                image_id=int(self.image_ids[i]),
                item_id=str(self.item_ids[i]),
                version=int(self.versions[i]),
                content_hash=str(self.content_hashes[i]),
                model_id=str(self.model_ids[i]),
                vector=None if self.tombstones[i] else self.vectors[i].copy(),
                etag=str(self.etags[i]),
                last_modified=str(self.last_modifieds[i]),
                run_id=str(self.run_ids[i]),
                url=str(self.urls[i]),
                payload=str(self.payloads[i]),
            )


def encode_segment(records: list[VectorRecord]) -> bytes:
    if not records:
        raise ValueError("a segment needs at least one record")
    dims = {r.dim for r in records if r.dim is not None}
    if len(dims) > 1:
        raise ValueError(f"one segment cannot mix vector dimensions, got {sorted(dims)}")
    dim = dims.pop() if dims else 0
    vectors = np.zeros((len(records), dim), dtype=np.float16)
    for row, record in enumerate(records):
        if record.vector is not None:
            vectors[row] = record.vector
    return pack_arrays(
        {
            "format_version": np.array(SEGMENT_FORMAT_VERSION, dtype=np.int64),
            "image_id": np.array([r.image_id for r in records], dtype=np.int64),
            "version": np.array([r.version for r in records], dtype=np.int64),
            "tombstone": np.array([r.is_tombstone for r in records], dtype=np.bool_),
            "vectors": vectors,
            "item_id": np.array([r.item_id for r in records], dtype=np.str_),
            "content_hash": np.array([r.content_hash for r in records], dtype=np.str_),
            "model_id": np.array([r.model_id for r in records], dtype=np.str_),
            "etag": np.array([r.etag for r in records], dtype=np.str_),
            "last_modified": np.array([r.last_modified for r in records], dtype=np.str_),
            "run_id": np.array([r.run_id for r in records], dtype=np.str_),
            "url": np.array([r.url for r in records], dtype=np.str_),
            "payload": np.array([r.payload for r in records], dtype=np.str_),
        }
    )


def decode_segment(key: str, data: bytes) -> SegmentData:
    arrays = unpack_arrays(data)
    version = int(arrays["format_version"])
    if version not in _READABLE_FORMAT_VERSIONS:
        raise ValueError(
            f"segment {key!r} has format version {version}, expected one of "
            f"{_READABLE_FORMAT_VERSIONS}"
        )
    n_rows = int(arrays["image_id"].shape[0])
    blank = np.full(n_rows, "", dtype=np.str_)
    segment = SegmentData(
        key=key,
        image_ids=arrays["image_id"].astype(np.int64, copy=False),
        versions=arrays["version"].astype(np.int64, copy=False),
        tombstones=arrays["tombstone"].astype(np.bool_, copy=False),
        vectors=arrays["vectors"].astype(np.float16, copy=False),
        item_ids=arrays["item_id"],
        content_hashes=arrays["content_hash"],
        model_ids=arrays["model_id"],
        etags=arrays.get("etag", blank),
        last_modifieds=arrays.get("last_modified", blank),
        run_ids=arrays.get("run_id", blank),
        urls=arrays.get("url", blank),
        payloads=arrays.get("payload", blank),
    )
    columns = (
        segment.versions,
        segment.tombstones,
        segment.vectors,
        segment.item_ids,
        segment.content_hashes,
        segment.model_ids,
        segment.etags,
        segment.last_modifieds,
        segment.run_ids,
        segment.urls,
        segment.payloads,
    )
    if segment.vectors.ndim != 2 or any(col.shape[0] != n_rows for col in columns):
        raise ValueError(f"segment {key!r} has columns of different lengths")
    return segment


def read_segment(storage: Storage, key: str) -> SegmentData:
    return decode_segment(key, storage.get(key))


def segment_time_ns(key: str) -> int:
    """The writer's flush timestamp encoded at the start of a segment key's file name."""
    name = key.rsplit("/", 1)[-1]
    stamp = name.split("-", 1)[0]
    if not stamp.isdigit():
        raise ValueError(f"segment key {key!r} does not start with a timestamp")
    return int(stamp)


def segment_shard(key: str) -> int:
    """The shard directory a segment was written to (by the writer's shard count)."""
    directory = key[len(SEGMENTS_PREFIX) :].split("/", 1)[0]
    return int(directory.removeprefix("shard-"))


def list_segments(storage: Storage, shard: int | None = None) -> list[str]:
    """Segment keys in write order: of one shard, or of all shards (shard by shard)."""
    prefix = SEGMENTS_PREFIX if shard is None else shard_prefix(shard)
    return sorted(key for key in storage.list(prefix) if key.endswith(SEGMENT_SUFFIX))


class SegmentWriter:
    """Buffers records per shard; ``flush`` makes them durable, one segment per shard.

    The caller acks the jobs behind the buffered records only after ``flush`` returns.
    Thread-safe: decode/embed threads may ``add`` while another thread flushes.
    """

    def __init__(self, storage: Storage, n_shards: int, writer_id: str) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        if not _WRITER_ID_RE.match(writer_id):
            raise ValueError(f"writer_id {writer_id!r} must be [A-Za-z0-9_.-] (a key part)")
        self._storage = storage
        self._n_shards = n_shards
        self._writer_id = writer_id
        self._pending: dict[int, list[VectorRecord]] = {}
        self._dims: dict[int, int] = {}
        self._seq = 0
        self._last_time_ns = 0
        self._lock = threading.Lock()

    @property
    def n_shards(self) -> int:
        return self._n_shards

    @property
    def pending_count(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._pending.values())

    def add(self, record: VectorRecord) -> None:
        shard = shard_for(record.image_id, self._n_shards)
        with self._lock:
            # Checked here, not at flush, so one bad record cannot make a whole buffer
            # of good ones unflushable.
            if record.dim is not None:
                expected = self._dims.setdefault(shard, record.dim)
                if record.dim != expected:
                    raise ValueError(
                        f"image {record.image_id} has dim {record.dim}, but shard {shard} "
                        f"already buffers dim {expected}; one segment cannot mix dims"
                    )
            self._pending.setdefault(shard, []).append(record)

    def flush(self) -> list[str]:
        """Write every pending shard's records; return the new keys (empty if nothing).

        All or nothing for the buffer: if any put fails, every record stays buffered and
        the exception propagates. Segments already written in that attempt are written
        again by the retry under new keys, which is harmless because replay is idempotent.
        """
        with self._lock:
            if not self._pending:
                return []
            time_ns = max(time.time_ns(), self._last_time_ns + 1)
            # Claimed before any put: a key is never reused, even after a failed attempt,
            # so a key that a build has applied always names the same bytes.
            self._last_time_ns = time_ns
            keys: list[str] = []
            for shard in sorted(self._pending):
                seq = self._seq
                self._seq += 1
                key = (
                    f"{shard_prefix(shard)}{time_ns:020d}-{self._writer_id}-{seq:06d}"
                    f"{SEGMENT_SUFFIX}"
                )
                self._storage.put(key, encode_segment(self._pending[shard]))
                keys.append(key)
            self._pending.clear()
            self._dims.clear()
            return keys
