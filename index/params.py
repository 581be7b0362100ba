"""FAISS index type and parameters for the shards of a generation, from size and budget.

- Small shards (``flat_max_vectors`` or fewer, and raw float32 within the budget) are exact:
  ``IDMap2,Flat`` with inner product.
- Beyond, IVF, with 8-bit scalar quantisation when ``vectors x dim`` bytes fit the
  per-shard budget, product quantisation sized to fit it otherwise.
- The IVF shards of one generation share one trained template (``index.training``), with
  about ``list_size`` vectors per list counted over the whole generation, so the list
  count comes from the generation's total and the codes from its largest shard.
- ``nprobe`` is one value per generation (the quantizer call is shared): the smallest
  candidate from ``nprobe_candidates`` whose merged recall@10 against exact search, on a
  held-back sample drawn across the shards, meets ``recall_target`` (``index.shardset``).

Pure policy: no FAISS call, no storage; ``IndexPolicy`` is what the composition root
builds from ``[index]`` settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from common.config import IndexConfig

# The configurable knobs take [index]'s defaults, so a policy built in a test or a
# benchmark follows the config when a default changes; the rest are tuning constants.
_INDEX = IndexConfig()

METRIC = "inner_product"
ID_BYTES = 8  # each IVF entry stores its int64 id next to its code


@dataclass(frozen=True)
class IndexPolicy:
    flat_max_vectors: int = _INDEX.flat_max_vectors
    memory_budget_bytes: int = _INDEX.memory_budget_mb * 2**20  # per shard, codes + ids
    list_size: int = _INDEX.list_size
    min_lists: int = 64
    max_lists: int = 65_536
    train_per_list: int = 64
    max_train_vectors: int = _INDEX.max_train_vectors
    kmeans_iterations: int = 20
    recall_target: float = _INDEX.recall_target
    eval_queries: int = _INDEX.eval_queries
    max_nprobe_fraction: float = 0.25  # never probe more than this share of the lists
    nprobe: int = _INDEX.nprobe  # 0: tune to recall_target; otherwise fixed
    seed: int = 1234
    use_gpu: bool = _INDEX.use_gpu  # train on the GPU when faiss-gpu sees one

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pow2_near(x: float) -> int:
    return 1 << max(round(math.log2(max(x, 1.0))), 0)


def _kind_of(n_vectors: int, dim: int, policy: IndexPolicy) -> str:
    flat_bytes = n_vectors * (dim * 4 + ID_BYTES)
    fits = flat_bytes <= policy.memory_budget_bytes
    return "flat" if n_vectors <= policy.flat_max_vectors and fits else "ivf"


def choose_shard_params(counts: list[int], dim: int, policy: IndexPolicy) -> list[dict[str, Any]]:
    """Parameters for each shard of a generation with ``counts[k]`` live vectors in shard k.

    If any shard needs IVF, every shard is IVF. They share one template: nlist from the
    total, codes from the largest shard (the budget is per shard).
    """
    kinds = [_kind_of(n, dim, policy) for n in counts]
    if "ivf" in kinds:
        # One layout per generation: shards straddling flat_max_vectors (hash routing makes
        # them near equal) would otherwise mix exact scans with the shared IVF path.
        kinds = ["ivf"] * len(counts)
    ivf_counts = [n for n, kind in zip(counts, kinds, strict=True) if kind == "ivf"]
    shared: dict[str, Any] = {}
    if ivf_counts:
        total, largest = sum(ivf_counts), max(ivf_counts)
        nlist = _pow2_near(total / policy.list_size)
        # FAISS wants >= 39 training points per centroid; tiny IVF sets get fewer lists.
        nlist = max(min(nlist, policy.max_lists, max(total // 39, 1)), 1)
        nlist = max(nlist, min(policy.min_lists, max(total // 39, 1)))
        if largest * (dim + ID_BYTES) <= policy.memory_budget_bytes:
            codes, code_bytes = "SQ8", dim
        else:
            per_vector = policy.memory_budget_bytes // max(largest, 1) - ID_BYTES
            m = max((m for m in range(1, dim + 1) if dim % m == 0 and m <= per_vector), default=1)
            codes, code_bytes = f"PQ{m}", m
        shared = {
            "factory": f"IVF{nlist},{codes}",
            "kind": "ivf",
            "metric": METRIC,
            "nlist": nlist,
            "codes": codes,
            "code_bytes": code_bytes,
        }
    out = []
    for n, kind in zip(counts, kinds, strict=True):
        if kind == "flat":
            flat_bytes = n * (dim * 4 + ID_BYTES)
            out.append(
                {"factory": "IDMap2,Flat", "kind": "flat", "metric": METRIC, "bytes": flat_bytes}
            )
            continue
        params = {k: v for k, v in shared.items() if k != "code_bytes"}
        params["bytes"] = n * (shared["code_bytes"] + ID_BYTES) + shared["nlist"] * dim * 4
        out.append(params)
    return out


def choose_params(n_vectors: int, dim: int, policy: IndexPolicy) -> dict[str, Any]:
    """Factory string and parameters for a generation of one shard of ``n_vectors``."""
    return choose_shard_params([n_vectors], dim, policy)[0]


def code_bytes_per_vector(params: dict[str, Any], dim: int) -> int:
    codes = str(params.get("codes", ""))
    if params.get("kind") == "flat":
        return dim * 4
    if codes == "SQfp16":
        return 2 * dim
    if codes.startswith("PQ"):
        return int(codes[2:])
    return dim


def nprobe_candidates(nlist: int, policy: IndexPolicy) -> list[int]:
    """Powers of two up to ``max_nprobe_fraction`` of the lists (or the fixed nprobe)."""
    if policy.nprobe:
        return [policy.nprobe]
    ceiling = max(int(nlist * policy.max_nprobe_fraction), 1)
    candidates, p = [], 1
    while p < ceiling:
        candidates.append(p)
        p *= 2
    return [*candidates, ceiling]
