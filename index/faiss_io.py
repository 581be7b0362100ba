"""FAISS indexes in and out of storage, and the few knobs every reader and writer turns.

- ``load_index`` reads a shard's FAISS file straight from disk where the storage has a
  local path (no copy of the bytes in process memory first), else deserialises the bytes.
- ``index_bytes`` is the one serialisation every writer uses (build, apply, retrain).
- ``set_nprobe`` and ``coarse_id`` work on any index: they do nothing / return None for
  indexes without an IVF layer (Flat shards).

Pure FAISS helpers: this module knows nothing of manifests, shards or segments.
"""

from __future__ import annotations

import hashlib
from typing import Any

import faiss
import numpy as np

from common.storage.base import Storage


def load_index(storage: Storage, key: str) -> faiss.Index:
    local = storage.local_path(key)
    if local is not None and local.is_file():
        return faiss.read_index(str(local))
    return faiss.deserialize_index(np.frombuffer(storage.get(key), dtype=np.uint8))


def index_bytes(index: faiss.Index) -> bytes:
    return bytes(faiss.serialize_index(index).data)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    with_ivf = _ivf_or_none(index)
    if with_ivf is not None:
        with_ivf.nprobe = int(nprobe)


def _ivf_or_none(index: faiss.Index) -> Any:
    """The IVF layer of ``index`` (under an IDMap or not), or None for other indexes."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def coarse_id(index: faiss.Index) -> str | None:
    """Fingerprint of an IVF index's coarse centroids (None for other indexes).

    Searchers group shards by it: one quantizer call serves every shard with the same
    fingerprint, whatever the manifest says, so a shard trained on its own (an older
    generation) is simply searched on its own.
    """
    ivf = _ivf_or_none(index)
    if ivf is None:
        return None
    quantizer = ivf.quantizer
    if isinstance(quantizer, faiss.IndexFlatCodes):
        centroids = faiss.vector_to_array(quantizer.codes)
    else:  # pragma: no cover - factories here always build a flat coarse quantizer
        centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    digest = hashlib.sha256(np.ascontiguousarray(centroids).tobytes())
    digest.update(f"{ivf.nlist}:{ivf.d}:{int(ivf.metric_type)}".encode())
    return digest.hexdigest()[:16]
