"""The trained part of a generation: one IVF template shared by every shard.

The IVF shards of one generation share one trained *template*: one coarse quantizer (and
one scalar quantiser), trained once on a sample drawn across all shards and copied into
every shard. A searcher then assigns a query batch to its ``nprobe`` lists once and each
shard scans only its own part of those lists, so a query costs what it costs on one index
of the same size, however many shards there are (``index.search``). Separately trained
shards would each pay for their own quantizer and need more lists probed for the same
recall.

IVF shards keep a hash-table direct map so live apply can remove and reconstruct ids
without scanning every list.

Which template (factory, list count, codes) comes from ``index.params``; this module
trains it and makes the empty per-shard indexes from it.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from index.faiss_io import coarse_id
from index.params import ID_BYTES, IndexPolicy

_HASHTABLE_DIRECT_MAP = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


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
    if largest_shard * (2 * dim + ID_BYTES) > policy.memory_budget_bytes:
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
