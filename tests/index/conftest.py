"""Shared fixtures for index tests: real LocalStorage in tmp_path, real FAISS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage import LocalStorage
from index.segments import VectorRecord

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
    ) -> VectorRecord:
        if isinstance(vector, str):
            vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return VectorRecord(
            image_id=image_id_for(item_id, image_key),
            item_id=item_id,
            version=version,
            content_hash=f"hash-{item_id}-{image_key}-{version}",
            model_id=MODEL_ID,
            vector=vector,
        )

    return factory


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)
