"""The per-shard row tables next to each FAISS file: who every vector belongs to.

A shard of a generation is a FAISS index plus a **base** table written by the build (every
image id of the shard, sorted, with item id, version, content hash, source validators and
a tombstone flag) and its float16 vectors in a separate ``.npy`` (so readers can memory-map
it), plus an optional small **delta** table written by live apply (rows that changed
since the base, vectors inline). For any image id the delta row, if there is one, wins.

Tombstones stay in the tables with their version so that an older upsert arriving late
(redelivery, reorder) loses against a newer delete.

String columns are stored as UTF-8 bytes (numpy ``S``): a quarter of the memory of numpy
unicode, which matters at millions of rows.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.files import replacing
from common.storage.base import Storage
from index.npz import pack_arrays, unpack_arrays


def _as_bytes(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        return values
    if values.shape[0] == 0:
        return np.zeros(0, dtype="S1")
    return np.char.encode(values.astype(np.str_), "utf-8")


def text(value: bytes | np.bytes_ | str) -> str:
    return value if isinstance(value, str) else bytes(value).decode("utf-8")


# Per-row string columns, by attribute name and stored name. ``url`` and ``payload`` (the
# image's catalogue attributes as ``common.payload`` bytes) arrived with table format 3;
# older tables read them as "".
_TEXT_COLUMNS = (
    ("item_ids", "item_id"),
    ("content_hashes", "content_hash"),
    ("etags", "etag"),
    ("last_modifieds", "last_modified"),
    ("run_ids", "run_id"),
    ("urls", "url"),
    ("payloads", "payload"),
)
_NUMERIC_COLUMNS = (("image_ids", "image_id"), ("versions", "version"), ("tombstones", "tombstone"))


@dataclass(frozen=True)
class ShardRows:
    """Column arrays sorted by ``image_ids`` (unique); row ``i`` of each is one image."""

    image_ids: np.ndarray  # int64 [n], ascending
    versions: np.ndarray  # int64 [n]
    tombstones: np.ndarray  # bool [n]
    item_ids: np.ndarray  # S [n]
    content_hashes: np.ndarray  # S [n]
    etags: np.ndarray  # S [n]
    last_modifieds: np.ndarray  # S [n]
    run_ids: np.ndarray  # S [n]
    vectors: np.ndarray  # float16 [n, d] (zero rows for tombstones); may be a memmap
    urls: np.ndarray  # S [n]
    payloads: np.ndarray  # S [n]: encode_payload bytes, b"" for none

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def live_count(self) -> int:
        return int((~self.tombstones).sum())

    def find(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row positions, found mask) for a batch of ids."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if len(self) == 0:
            return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
        pos = np.searchsorted(self.image_ids, ids)
        clipped = np.minimum(pos, len(self) - 1)
        return clipped, self.image_ids[clipped] == ids

    def row_of(self, image_id: int) -> int | None:
        pos, found = self.find(np.array([image_id], np.int64))
        return int(pos[0]) if bool(found[0]) else None

    def take(self, rows: np.ndarray) -> ShardRows:
        columns = {attr: getattr(self, attr)[rows] for attr, _ in _NUMERIC_COLUMNS + _TEXT_COLUMNS}
        return ShardRows(**columns, vectors=np.asarray(self.vectors[rows]))

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, attr) for attr, name in _NUMERIC_COLUMNS + _TEXT_COLUMNS}


def empty_rows(dim: int) -> ShardRows:
    blank = np.zeros(0, dtype="S1")
    return ShardRows(
        image_ids=np.zeros(0, np.int64),
        versions=np.zeros(0, np.int64),
        tombstones=np.zeros(0, bool),
        **{attr: blank for attr, _ in _TEXT_COLUMNS},
        vectors=np.zeros((0, dim), np.float16),
    )


def make_rows(
    *,
    image_ids: np.ndarray,
    versions: np.ndarray,
    tombstones: np.ndarray,
    vectors: np.ndarray,
    **text_columns: np.ndarray,
) -> ShardRows:
    """Rows from unsorted, unique-id columns (strings may be unicode or bytes); every
    ``_TEXT_COLUMNS`` attribute is required."""
    missing = sorted({a for a, _ in _TEXT_COLUMNS} - set(text_columns))
    if missing:
        raise TypeError(f"make_rows needs the columns {missing}")
    order = np.argsort(image_ids, kind="stable")
    return ShardRows(
        image_ids=np.asarray(image_ids, np.int64)[order],
        versions=np.asarray(versions, np.int64)[order],
        tombstones=np.asarray(tombstones, bool)[order],
        **{attr: _as_bytes(np.asarray(text_columns[attr])[order]) for attr, _ in _TEXT_COLUMNS},
        vectors=np.asarray(vectors, np.float16)[order],
    )


def merge_rows(base: ShardRows, delta: ShardRows) -> ShardRows:
    """``base`` with every id of ``delta`` replaced by the delta row (still sorted)."""
    if len(delta) == 0:
        return base
    _, overridden = base.find(delta.image_ids)
    keep = np.ones(len(base), bool)
    if overridden.any():
        pos, _ = base.find(delta.image_ids[overridden])
        keep[pos] = False
    kept = base.take(np.nonzero(keep)[0])
    dim = max(base.dim, delta.dim)

    def widen(v: np.ndarray) -> np.ndarray:
        return v if v.shape[1] == dim else np.zeros((v.shape[0], dim), np.float16)

    return make_rows(
        **{
            attr: np.concatenate([getattr(kept, attr), getattr(delta, attr)])
            for attr, _ in _NUMERIC_COLUMNS + _TEXT_COLUMNS
        },
        vectors=np.concatenate([widen(kept.vectors), widen(delta.vectors)]),
    )


# --- encoding ----------------------------------------------------------------------------


def encode_table(rows: ShardRows, *, with_vectors: bool) -> bytes:
    arrays = rows.columns()
    if with_vectors:
        arrays["vectors"] = np.asarray(rows.vectors, np.float16)
    return pack_arrays(arrays)


def encode_vectors(vectors: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(vectors, np.float16), allow_pickle=False)
    return buf.getvalue()


def _decode_table(data: bytes, vectors: np.ndarray | None, dim: int) -> ShardRows:
    arrays = unpack_arrays(data)
    n = int(arrays["image_id"].shape[0])
    blank = np.full(n, b"", dtype="S1")
    if vectors is None:
        vectors = arrays.get("vectors", np.zeros((n, dim), np.float16))
    return ShardRows(
        image_ids=arrays["image_id"].astype(np.int64, copy=False),
        versions=arrays["version"].astype(np.int64, copy=False),
        # Tables of the first format version hold live rows only.
        tombstones=arrays.get("tombstone", np.zeros(n, bool)).astype(bool, copy=False),
        # item_id is in every format; the others read as "" where a format lacks them.
        **{attr: _as_bytes(arrays.get(name, blank)) for attr, name in _TEXT_COLUMNS},
        vectors=vectors,
    )


def read_delta(storage: Storage, key: str, dim: int) -> ShardRows:
    return _decode_table(storage.get(key), None, dim)


def read_base(
    storage: Storage,
    items_key: str,
    vectors_key: str | None,
    dim: int,
    *,
    load_vectors: bool,
    cache_dir: Path | None = None,
) -> ShardRows:
    """The base table; vectors memory-mapped where the storage has a local path.

    With ``load_vectors=False`` (searchers) the vector column is a zero-width placeholder.
    """
    vectors: np.ndarray | None = None
    if not load_vectors or vectors_key is None:
        vectors = np.zeros((0, dim), np.float16)
    else:
        vectors = open_vectors(storage, vectors_key, cache_dir)
    rows = _decode_table(storage.get(items_key), vectors, dim)
    if load_vectors and vectors_key is None:
        rows = replace(rows, vectors=np.zeros((len(rows), dim), np.float16))
    return rows


def open_vectors(storage: Storage, key: str, cache_dir: Path | None = None) -> np.ndarray:
    """A read-only memory map of a vectors ``.npy``: page cache, not process memory.

    Remote storage is copied into ``cache_dir`` (or a temp dir) first. The copy is named
    by key, and keys are never rewritten with different bytes, so a cached copy is valid.
    """
    local = storage.local_path(key)
    if local is not None and local.is_file():
        return np.load(local, mmap_mode="r", allow_pickle=False)
    directory = cache_dir or Path(tempfile.gettempdir()) / "imgfleet-vectors"
    target = directory / key.replace("/", "__")
    if not target.is_file():
        # fsync'd: a cached copy is trusted for as long as it exists, so a power cut must
        # not leave a short one under its name.
        with replacing(target) as tmp:
            storage.download_to(key, tmp)
    return np.load(target, mmap_mode="r", allow_pickle=False)
