"""Parameter choice from size and budget; recall of the defaults on seeded clustered data."""

from __future__ import annotations

import numpy as np

from common.storage.local import LocalStorage
from index.evaluation import evaluate_generation, recall_at_k
from index.params import IndexPolicy, choose_params
from index.publish import build_generation
from index.search import Searcher
from index.segments import SegmentWriter, VectorRecord
from tests.unit.index.conftest import MODEL_ID, clustered_vectors

DIM = 32


def test_choose_params_by_size_and_budget() -> None:
    policy = IndexPolicy()
    assert choose_params(10_000, 256, policy)["factory"] == "IDMap2,Flat"
    big = choose_params(1_000_000, 256, policy)
    assert big["factory"] == "IVF4096,SQ8" and big["nlist"] == 4096
    tight = choose_params(1_000_000, 256, IndexPolicy(memory_budget_bytes=72 * 1_000_000))
    assert tight["codes"] == "PQ64" and tight["bytes"] <= 72 * 1_000_000 + 4096 * 256 * 4
    # Over the Flat memory budget, even a small shard goes IVF.
    small_budget = IndexPolicy(memory_budget_bytes=10 * 2**20)
    assert choose_params(40_000, 256, small_budget)["kind"] == "ivf"
    # Never fewer than 39 training points per list.
    assert choose_params(2_000, 64, IndexPolicy(flat_max_vectors=0))["nlist"] <= 2_000 // 39


def test_recall_at_k_counts_overlap() -> None:
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [4, -1, -1]])
    assert recall_at_k(approx, exact, 3) == (2 / 3 + 1 / 3) / 2


def test_default_recall_target_met_on_clustered_data(storage: LocalStorage) -> None:
    n = 30_000
    vectors = clustered_vectors(n, DIM, n_clusters=200, spread=0.35, seed=3)
    writer = SegmentWriter(storage, n_shards=2, writer_id="w1")
    for i, vector in enumerate(vectors):
        writer.add(VectorRecord(i + 1, f"item-{i}", 1, f"h{i}", MODEL_ID, vector))
        if (i + 1) % 5000 == 0:
            writer.flush()
    policy = IndexPolicy(flat_max_vectors=1_000, eval_queries=300)  # force IVF at this size
    info = build_generation(storage, 2, policy=policy, grace_s=0.0)
    for shard in info.shards:
        # At 32 dims 8-bit codes cannot separate these tight clusters: the build measures
        # that and moves to 16-bit codes on the same coarse quantizer.
        assert shard.params["kind"] == "ivf" and shard.params["codes"] == "SQfp16"
        assert shard.params["escalated_from"] == "SQ8"
        assert shard.recall_at_10 is not None and shard.recall_at_10 >= policy.recall_target
        assert shard.eval_queries == 300
        nprobe = shard.params["nprobe"]
        # Tuned as the smallest power of two that reaches the target, once per generation.
        assert nprobe & (nprobe - 1) == 0 and nprobe <= shard.params["nlist"] // 4
    assert len({shard.params["nprobe"] for shard in info.shards}) == 1
    measured = evaluate_generation(storage, queries=300)
    assert measured["recall_at_k"] >= 0.95  # end to end, merged over both shards
    # The shard's own vector finds itself first.
    (hits,) = Searcher(storage).search(vectors[123:124], k=1, collapse_items=False)
    assert hits[0].image_id == 124
