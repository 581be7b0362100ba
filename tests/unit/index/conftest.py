"""Shared fixtures for index tests: real LocalStorage in tmp_path, real FAISS."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.base import Storage
from common.storage.local import LocalStorage
from common.storage.s3 import S3Storage
from index.segments import SegmentWriter, VectorRecord
from tests.support.storage import fresh_s3_storage

DIM = 16
MODEL_ID = "test-model-v1"

RecordFactory = Callable[..., VectorRecord]


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def make_record() -> RecordFactory:
    """Build a record for (item, image key); ``vector=None`` makes a tombstone."""

    def factory(
        item_id: str,
        image_key: str = "0",
        *,
        version: int = 1,
        vector: np.ndarray | str | None = "random",
        seed: int = 0,
        run_id: str = "",
        model_id: str = MODEL_ID,
    ) -> VectorRecord:
        if isinstance(vector, str):
            vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return VectorRecord(
            image_id=image_id_for(item_id, image_key),
            item_id=item_id,
            version=version,
            content_hash=f"hash-{item_id}-{image_key}-{version}",
            model_id=model_id,
            vector=vector,
            etag=f'"etag-{item_id}-{version}"',
            last_modified="Sat, 21 Nov 2026 10:00:00 GMT",
            run_id=run_id,
        )

    return factory


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def write_records(storage: Storage, n_shards: int, *records: VectorRecord) -> list[str]:
    """One flush: the records land in new segments after every earlier call's."""
    writer = SegmentWriter(storage, n_shards=n_shards, writer_id="w1")
    for record in records:
        writer.add(record)
    return writer.flush()


def clustered_vectors(
    n: int, dim: int, *, n_clusters: int = 100, spread: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Seeded clustered unit vectors (float32), like embeddings of a catalogue."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    vectors = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def s3_storage(s3_endpoint: str) -> S3Storage:
    return fresh_s3_storage(s3_endpoint)
