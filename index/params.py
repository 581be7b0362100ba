"""FAISS index type and parameters for the shards of a generation, from size and budget.

- Small shards (``flat_max_vectors`` or fewer, and raw float32 within the budget) are exact:
  ``IDMap2,Flat`` with inner product.
- Beyond, IVF, with 8-bit scalar quantisation when ``vectors x dim`` bytes fit the
  per-shard budget, product quantisation sized to fit it otherwise.
- The IVF shards of one generation share one trained *template*: one coarse quantizer
  (and one scalar quantiser), trained once on a sample drawn across all shards and copied
  into every shard, with about ``list_size`` vectors per list counted over the whole
  generation. A searcher then assigns a query batch to its ``nprobe`` lists once and each
  shard scans only its own part of those lists, so a query costs what it costs on one
  index of the same size, however many shards there are (``index.search``). Separately
  trained shards would each pay for their own quantizer and need more lists probed for
  the same recall.
- ``nprobe`` is one value per generation (the quantizer call is shared): the smallest power
  of two whose merged recall@10 against exact search, on a held-back sample drawn across
  the shards, meets ``recall_target`` (``index.shardset``).

IVF shards keep a hash-table direct map so live apply can remove and reconstruct ids
without scanning every list.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

METRIC = "inner_product"
_ID_BYTES = 8  # each IVF entry stores its int64 id next to its code
_HASHTABLE_DIRECT_MAP = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]


@dataclass(frozen=True)
class IndexPolicy:
    flat_max_vectors: int = 50_000
    memory_budget_bytes: int = 4 * 2**30  # per shard, for codes + ids
    list_size: int = 256
    min_lists: int = 64
    max_lists: int = 65_536
    train_per_list: int = 64
    max_train_vectors: int = 262_144
    kmeans_iterations: int = 20
    recall_target: float = 0.97
    eval_queries: int = 500
    max_nprobe_fraction: float = 0.25  # never probe more than this share of the lists
    nprobe: int = 0  # 0: tune to recall_target; otherwise fixed
    seed: int = 1234
    use_gpu: bool = True  # train on the GPU when faiss-gpu sees one

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pow2_near(x: float) -> int:
    return 1 << max(round(math.log2(max(x, 1.0))), 0)


def _kind_of(n_vectors: int, dim: int, policy: IndexPolicy) -> str:
    flat_bytes = n_vectors * (dim * 4 + _ID_BYTES)
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
        if largest * (dim + _ID_BYTES) <= policy.memory_budget_bytes:
            codes, code_bytes = "SQ8", dim
        else:
            per_vector = policy.memory_budget_bytes // max(largest, 1) - _ID_BYTES
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
            flat_bytes = n * (dim * 4 + _ID_BYTES)
            out.append(
                {"factory": "IDMap2,Flat", "kind": "flat", "metric": METRIC, "bytes": flat_bytes}
            )
            continue
        params = {k: v for k, v in shared.items() if k != "code_bytes"}
        params["bytes"] = n * (shared["code_bytes"] + _ID_BYTES) + shared["nlist"] * dim * 4
        out.append(params)
    return out


def choose_params(n_vectors: int, dim: int, policy: IndexPolicy) -> dict[str, Any]:
    """Factory string and parameters for a generation of one shard of ``n_vectors``."""
    return choose_shard_params([n_vectors], dim, policy)[0]


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


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


def train_template(
    params: dict[str, Any], sample: np.ndarray, policy: IndexPolicy
) -> tuple[faiss.Index, dict[str, Any]]:
    """An empty IVF index trained on ``sample`` (float32, normalised): the generation's
    shared coarse quantizer and codec, to be cloned into every IVF shard."""
    dim = sample.shape[1]
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = policy.kmeans_iterations
    ivf.cp.seed = policy.seed
    on_gpu = policy.use_gpu and _gpu_count() > 0
    if on_gpu:  # pragma: no cover - needs faiss-gpu and a device
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    started_s = time.perf_counter()
    index.train(np.ascontiguousarray(sample))
    ivf.set_direct_map_type(_HASHTABLE_DIRECT_MAP)
    return index, {
        "train_vectors": int(sample.shape[0]),
        "train_s": round(time.perf_counter() - started_s, 3),
        "train_device": "gpu" if on_gpu else "cpu",
        "coarse_id": coarse_id(index),
    }


def escalated_template(
    template: faiss.Index,
    params: dict[str, Any],
    sample: np.ndarray,
    largest_shard: int,
    policy: IndexPolicy,
) -> tuple[faiss.Index, dict[str, Any]] | None:
    """SQ8 -> SQfp16 on the same trained coarse quantizer, if the budget allows it.

    8-bit codes cap recall where neighbours are closer than a quantisation step (tight
    clusters, low dims); no nprobe fixes that, 16-bit codes do.
    """
    dim = sample.shape[1]
    if params.get("codes") != "SQ8":
        return None
    if largest_shard * (2 * dim + _ID_BYTES) > policy.memory_budget_bytes:
        return None
    ivf = faiss.extract_index_ivf(template)
    quantizer = faiss.clone_index(ivf.quantizer)
    escalated = faiss.IndexIVFScalarQuantizer(
        quantizer,
        dim,
        int(params["nlist"]),
        faiss.ScalarQuantizer.QT_fp16,
        faiss.METRIC_INNER_PRODUCT,
    )
    escalated.own_fields = True
    quantizer.this.disown()  # type: ignore[attr-defined]
    escalated.train(np.ascontiguousarray(sample[: min(sample.shape[0], 1000)]))  # no k-means
    escalated.set_direct_map_type(_HASHTABLE_DIRECT_MAP)
    new_params = {
        **params,
        "factory": f"IVF{params['nlist']},SQfp16",
        "codes": "SQfp16",
        "escalated_from": "SQ8",
    }
    return escalated, new_params


def shard_index(params: dict[str, Any], template: faiss.Index | None, dim: int) -> faiss.Index:
    """An empty index for one shard: Flat, or a copy of the generation's IVF template."""
    if params["kind"] == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if template is None:
        raise ValueError("an IVF shard needs the generation's trained template")
    index = faiss.clone_index(template)
    faiss.extract_index_ivf(index).set_direct_map_type(_HASHTABLE_DIRECT_MAP)
    return index


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


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    with_ivf = _ivf_or_none(index)
    if with_ivf is not None:
        with_ivf.nprobe = int(nprobe)


def _ivf_or_none(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each exact top-``k`` found in the approximate top-``k``."""
    if approx.shape[0] == 0:
        return 1.0
    hits = 0.0
    for a, e in zip(approx[:, :k], exact[:, :k], strict=True):
        e_valid = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e_valid)) / max(len(e_valid), 1)
    return hits / approx.shape[0]


def exact_top(
    queries: np.ndarray, base: np.ndarray, base_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-``k`` by inner product, padded with (-inf, -1)."""
    n_q = queries.shape[0]
    if base.shape[0] == 0:
        return np.full((n_q, k), -np.inf, np.float32), np.full((n_q, k), -1, np.int64)
    scores, rows = faiss.knn(
        queries, base, min(k, base.shape[0]), metric=faiss.METRIC_INNER_PRODUCT
    )
    ids = np.where(rows >= 0, base_ids[np.maximum(rows, 0)], -1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) into the overall top-``k`` (ties by image id)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((ids, -scores), axis=1)[:, :k] if scores.shape[1] else None
    if order is None:
        return scores, ids
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Drop each query's own id (held-back queries are in the index too)."""
    out = np.full((ids.shape[0], k), -1, np.int64)
    for row in range(ids.shape[0]):
        kept = ids[row][ids[row] != self_ids[row]][:k]
        out[row, : kept.shape[0]] = kept
    return out
