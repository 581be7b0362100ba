"""IVF shards of a generation share one coarse quantizer; search uses it once per batch."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from common.storage.local import LocalStorage
from index.apply import Applier
from index.evaluation import merge_top, recall_at_k
from index.faiss_io import coarse_id, load_index
from index.manifest import GenerationInfo, load_manifest
from index.params import IndexPolicy
from index.publish import build_generation
from index.search import Searcher
from index.segments import SegmentWriter, VectorRecord
from index.shardfiles import read_base
from index.shardset import live_vectors
from tests.unit.index.conftest import MODEL_ID, clustered_vectors, write_records

DIM = 32
N = 12_000
POLICY = IndexPolicy(flat_max_vectors=1_000, eval_queries=200, list_size=64)


def _write(storage: LocalStorage, vectors: np.ndarray, n_shards: int) -> None:
    writer = SegmentWriter(storage, n_shards=n_shards, writer_id="w1")
    for i, vector in enumerate(vectors):
        writer.add(VectorRecord(i + 1, f"item-{i}", 1, f"h{i}", MODEL_ID, vector))
        if (i + 1) % 4_000 == 0:
            writer.flush()
    writer.flush()


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered_vectors(N, DIM, n_clusters=60, spread=0.6, seed=11)


@pytest.fixture
def sharded(storage: LocalStorage, vectors: np.ndarray) -> GenerationInfo:
    _write(storage, vectors, 4)
    return build_generation(storage, 4, policy=POLICY, grace_s=0.0)


def _whole_shard_search(
    storage: LocalStorage, info: GenerationInfo, queries: np.ndarray, k: int, nprobe: int
) -> np.ndarray:
    """The naive fan-out: every shard searched whole (its own quantizer call), merged."""
    parts = []
    for shard in info.shards:
        index = load_index(storage, shard.index_key)
        faiss.extract_index_ivf(index).nprobe = nprobe
        scores, ids = index.search(queries, k)
        parts.append((scores, ids))
    return merge_top(parts, k)[1]


def test_ivf_shards_share_one_trained_template(
    storage: LocalStorage, sharded: GenerationInfo
) -> None:
    params = [s.params for s in sharded.shards]
    assert all(p["kind"] == "ivf" for p in params)
    # nlist counts the whole generation, not one shard: 12,000 / 64 per list.
    assert {p["nlist"] for p in params} == {256}
    assert len({p["coarse_id"] for p in params}) == 1
    assert len({p["nprobe"] for p in params}) == 1
    # The fingerprint is of the centroids really stored in every shard file.
    stored = {coarse_id(load_index(storage, s.index_key)) for s in sharded.shards}
    assert stored == {params[0]["coarse_id"]}
    assert sharded.index_params["coarse_id"] == params[0]["coarse_id"]
    assert sharded.index_params["nprobe"] == params[0]["nprobe"]
    # nprobe is tuned on the merged answer, and the merged recall is recorded.
    assert sharded.index_params["recall_at_10"] >= POLICY.recall_target
    assert all(s.recall_at_10 is not None and s.eval_queries == 200 for s in sharded.shards)
    assert sum(s.vectors for s in sharded.shards) == N


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_shared_search_equals_searching_each_shard_whole(
    storage: LocalStorage, sharded: GenerationInfo, vectors: np.ndarray, batch: int
) -> None:
    queries = clustered_vectors(batch, DIM, n_clusters=60, spread=0.6, seed=11 + batch)
    searcher = Searcher(storage)
    nprobe = int(sharded.index_params["nprobe"])
    scores, ids = searcher.search_ids(queries, 10)
    expected = _whole_shard_search(storage, sharded, queries, 10, nprobe)
    assert ids.shape == (batch, 10)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(expected, axis=1))
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_recall_of_sharded_search_matches_one_index(
    tmp_path: object, vectors: np.ndarray, storage: LocalStorage, sharded: GenerationInfo
) -> None:
    from pathlib import Path

    single = LocalStorage(Path(str(tmp_path)) / "single")
    _write(single, vectors, 1)
    one = build_generation(single, 1, policy=POLICY, grace_s=0.0)
    # Same centres as the indexed vectors (same seed), other draws: held-out queries.
    queries = clustered_vectors(N + 300, DIM, n_clusters=60, spread=0.6, seed=11)[N:]
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact_ids = exact + 1
    nprobe = int(one.index_params["nprobe"])
    got = {}
    for name, store in (("one", single), ("four", storage)):
        searcher = Searcher(store, nprobe=nprobe)
        got[name] = recall_at_k(searcher.search_ids(queries, 10)[1], exact_ids, 10)
    # Same quantizer layout over the same vectors: sharding costs no recall.
    assert got["four"] >= got["one"] - 0.02
    assert got["four"] >= 0.9


def test_shard_with_its_own_quantizer_is_searched_whole(
    storage: LocalStorage, sharded: GenerationInfo, vectors: np.ndarray
) -> None:
    # Shard 2 as an older build would have made it: trained on its own vectors only.
    info = sharded.shards[2]
    rows = read_base(storage, info.items_key, info.vectors_key, DIM, load_vectors=True)
    own_vectors, ids = live_vectors(rows)
    own = faiss.index_factory(DIM, "IVF32,SQfp16", faiss.METRIC_INNER_PRODUCT)
    own.train(own_vectors)
    own.add_with_ids(own_vectors, ids)
    local = storage.local_path(info.index_key)
    assert local is not None
    faiss.write_index(own, str(local))

    searcher = Searcher(storage)
    searcher.set_nprobe(32)  # exhaustive on every shard: the answer is the exact one
    coarse = [s.coarse for s in searcher._gen.shards]  # type: ignore[union-attr]
    assert coarse[2] != coarse[0] and len({coarse[0], coarse[1], coarse[3]}) == 1
    queries = clustered_vectors(20, DIM, n_clusters=60, spread=0.6, seed=5)
    _, found = searcher.search_ids(queries, 10)
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert recall_at_k(found, exact + 1, 10) >= 0.9


def test_live_apply_then_generation_wide_retrain(
    storage: LocalStorage, sharded: GenerationInfo, vectors: np.ndarray
) -> None:
    before = sharded.index_params["coarse_id"]
    moved = clustered_vectors(1, DIM, n_clusters=1, seed=123)[0]
    write_records(
        storage,
        4,
        VectorRecord(50, "item-49", 2, "h2", MODEL_ID, moved),
        VectorRecord(51, "item-50", 2, "h2", MODEL_ID, None),
    )
    worker = Applier(storage, policy=POLICY, grace_s=0.0, retrain_fraction=0.5)
    report = worker.apply_once()
    assert (report.upserts, report.deletes, report.retrained) == (1, 1, [])
    searcher = Searcher(storage)
    (hits,) = searcher.search(moved[None, :], k=1, collapse_items=False)
    assert hits[0].image_id == 50  # added through the shared quantizer, found through it

    # Churn past half of the generation: every shard is rebuilt on a new shared template.
    fresh = clustered_vectors(N // 2 + 10, DIM, n_clusters=60, spread=0.6, seed=77)
    write_records(
        storage,
        4,
        *[
            VectorRecord(i + 100, f"item-{i + 99}", 3, "h3", MODEL_ID, v)
            for i, v in enumerate(fresh)
        ],
    )
    report = worker.apply_once()
    assert report.retrained == [0, 1, 2, 3]
    manifest = load_manifest(storage)
    assert manifest is not None
    gen = manifest.current()
    after = {s.params["coarse_id"] for s in gen.shards}
    assert len(after) == 1 and after != {before}
    assert gen.index_params["coarse_id"] in after
    assert all(s.changed_since_train == 0 and s.delta_key is None for s in gen.shards)
    assert all(s.revision >= 1 for s in gen.shards)
    assert sum(s.vectors for s in gen.shards) == N - 1
    searcher.reload_if_changed()
    assert {s.coarse for s in searcher._gen.shards} == after  # type: ignore[union-attr]
    (hits,) = searcher.search(fresh[7:8], k=1, collapse_items=False)
    assert hits[0].image_id == 107
    assert 51 not in set(searcher.image_ids().tolist())
