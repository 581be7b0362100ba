from __future__ import annotations

import numpy as np
import pytest

from common.identity import image_id_for
from common.storage.local import LocalStorage
from index.publish import build_generation
from index.search import Searcher
from tests.unit.index.conftest import DIM, RecordFactory, unit, write_records

N_ITEMS = 60
IMAGES_PER_ITEM = 3


@pytest.fixture
def centres() -> np.ndarray:
    return np.random.default_rng(42).standard_normal((N_ITEMS, DIM)).astype(np.float32)


@pytest.fixture
def clustered(storage: LocalStorage, centres: np.ndarray, make_record: RecordFactory) -> Searcher:
    """Each item's images are small perturbations of that item's centre."""
    rng = np.random.default_rng(7)
    records = [
        make_record(f"item-{i}", str(j), vector=centres[i] + 0.05 * rng.standard_normal(DIM))
        for i in range(N_ITEMS)
        for j in range(IMAGES_PER_ITEM)
    ]
    write_records(storage, 4, *records)
    build_generation(storage, 4)
    return Searcher(storage)


def test_top1_is_the_right_item(clustered: Searcher, centres: np.ndarray) -> None:
    rng = np.random.default_rng(11)
    queries = centres + 0.05 * rng.standard_normal(centres.shape).astype(np.float32)
    results = clustered.search(queries, k=5)
    assert [hits[0].item_id for hits in results] == [f"item-{i}" for i in range(N_ITEMS)]
    for hits in results:
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(1.0, abs=0.05)  # cosine of near-identical vectors


def test_collapse_gives_one_hit_per_item(clustered: Searcher, centres: np.ndarray) -> None:
    (collapsed,) = clustered.search(centres[:1], k=5)
    assert len({h.item_id for h in collapsed}) == len(collapsed) == 5

    (raw,) = clustered.search(centres[:1], k=5, collapse_items=False)
    assert [h.item_id for h in raw[:IMAGES_PER_ITEM]] == ["item-0"] * IMAGES_PER_ITEM
    # The collapsed hit of an item is its best image.
    assert collapsed[0].image_id == raw[0].image_id


def test_collapse_finds_k_items_behind_a_crowded_one(
    storage: LocalStorage, make_record: RecordFactory
) -> None:
    rng = np.random.default_rng(1)
    query = unit(rng.standard_normal(DIM))
    crowd = [
        make_record("crowd", str(j), vector=query + 0.01 * rng.standard_normal(DIM))
        for j in range(50)
    ]
    others = [
        make_record(f"other-{i}", "0", vector=query + 0.5 * rng.standard_normal(DIM))
        for i in range(10)
    ]
    write_records(storage, 1, *crowd, *others)
    build_generation(storage, 1)
    # 50 images of one item outrank everything; over-fetch must dig past them.
    (hits,) = Searcher(storage).search(query[None, :], k=4)
    assert hits[0].item_id == "crowd"
    assert len(hits) == 4 and len({h.item_id for h in hits}) == 4


def test_exclude_item_ids(clustered: Searcher, centres: np.ndarray) -> None:
    results = clustered.search(centres[:2], k=3, exclude_item_ids=[{"item-0"}, set()])
    assert "item-0" not in {h.item_id for h in results[0]}
    assert len(results[0]) == 3
    assert results[1][0].item_id == "item-1"
    with pytest.raises(ValueError, match="exclude_item_ids"):
        clustered.search(centres[:2], exclude_item_ids=[set()])


def test_k_larger_than_index(clustered: Searcher, centres: np.ndarray) -> None:
    (hits,) = clustered.search(centres[:1], k=1000)
    assert len(hits) == N_ITEMS
    (hits,) = clustered.search(centres[:1], k=1000, collapse_items=False)
    assert len(hits) == N_ITEMS * IMAGES_PER_ITEM


def test_vector_of_and_count(clustered: Searcher) -> None:
    assert clustered.count() == N_ITEMS * IMAGES_PER_ITEM
    vector = clustered.vector_of(image_id_for("item-3", "1"))
    assert vector is not None and vector.shape == (DIM,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert clustered.vector_of(image_id_for("item-3", "no-such-image")) is None
    # Querying with an image's own vector finds that image first.
    (hits,) = clustered.search(vector[None, :], k=1, collapse_items=False)
    assert hits[0].image_id == image_id_for("item-3", "1")


def test_query_shape_is_checked(clustered: Searcher) -> None:
    with pytest.raises(ValueError, match="queries must be"):
        clustered.search(np.ones((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        clustered.search(np.ones((1, DIM), np.float32), k=0)


def test_reload_if_changed(storage: LocalStorage, make_record: RecordFactory) -> None:
    searcher = Searcher(storage)
    assert searcher.generation is None
    assert searcher.search(np.ones((2, DIM), np.float32)) == [[], []]
    assert searcher.reload_if_changed() is False

    write_records(storage, 2, make_record("a", seed=1))
    build_generation(storage, 2)
    assert searcher.reload_if_changed() is True
    assert searcher.generation == 1
    assert searcher.reload_if_changed() is False
    assert searcher.count() == 1

    b = make_record("b", seed=2)
    write_records(storage, 2, b)
    build_generation(storage, 2)
    assert searcher.count() == 1  # still serving generation 1 until told to reload
    assert searcher.reload_if_changed() is True
    assert searcher.generation == 2
    (hits,) = searcher.search(b.vector[None, :].astype(np.float32), k=1)
    assert hits[0].item_id == "b"
