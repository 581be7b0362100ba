"""`imgfleet demo`: the whole pipeline end to end on the embedded default.

Makes a synthetic catalogue (good, broken and near-duplicate images), serves it over HTTP
on loopback, publishes it to the local broker, runs a worker until the queue drains, builds
the index and checks it: every job accounted for, each broken image dead-lettered with the
reason the corpus expects, and near-duplicate copies finding their originals.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.brokers.base import DeadLetter
from common.config import Settings
from common.errors import JobFailure
from common.identity import image_id_for
from common.observability.logging import get_logger
from common.schema import decode_job
from imgfleet.demo.corpus import Corpus, make_corpus
from imgfleet.demo.image_server import ImageServer
from imgfleet.factories import make_broker, make_storage, run_worker
from index.publish import build_generation
from index.search import Searcher
from producers.nightly.upserts import publish_catalogue


@dataclass
class DemoSummary:
    jobs: int = 0
    model_id: str = ""  # what embedded the run: the generation's model
    indexed: int = 0
    recovered: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0
    near_duplicate_top1: float = 0.0
    near_duplicate_pairs: int = 0
    unexpected_outcomes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def accounted(self) -> bool:
        return self.indexed + sum(self.dead_lettered.values()) == self.jobs

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "jobs": self.jobs,
            "indexed": self.indexed,
            "recovered": self.recovered,
            "dead_lettered": dict(sorted(self.dead_lettered.items())),
            "images_per_s": round(self.images_per_s, 2),
            "near_duplicate_top1": round(self.near_duplicate_top1, 4),
            "near_duplicate_pairs": self.near_duplicate_pairs,
            "all_accounted_for": self.accounted,
            "unexpected_outcomes": self.unexpected_outcomes,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def demo_settings(base: Settings, workdir: Path) -> Settings:
    """The base settings with queue and storage moved into the demo's work directory."""
    return base.model_copy(
        update={
            "broker": base.broker.model_copy(
                update={
                    "kind": "local",
                    "local": base.broker.local.model_copy(
                        update={"path": workdir / "queue.sqlite3"}
                    ),
                }
            ),
            "storage": base.storage.model_copy(update={"kind": "local", "root": workdir / "store"}),
            # The demo's image server is on loopback, which the SSRF guard refuses by default.
            "worker": base.worker.model_copy(
                update={"fetch_allow_networks": [*base.worker.fetch_allow_networks, "127.0.0.1/32"]}
            ),
        }
    )


async def run_demo(base: Settings, workdir: Path, n_items: int, seed: int = 0) -> DemoSummary:
    log = get_logger("demo", workdir=str(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    # A demo run starts clean: only what the demo itself made is removed.
    for stale in ("queue.sqlite3", "queue.sqlite3-wal", "queue.sqlite3-shm", "store", "corpus"):
        path = workdir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    settings = demo_settings(base, workdir)
    summary = DemoSummary()

    t0 = time.monotonic()
    corpus = make_corpus(workdir / "corpus", n_items, seed=seed)
    summary.seconds["make_corpus"] = time.monotonic() - t0
    log.info("corpus ready", items=len(corpus.items))

    with ImageServer(corpus.root) as server:
        catalogue = corpus.write_catalogue_jsonl(workdir / "catalogue.jsonl", server.base_url)
        broker = make_broker(settings)
        await broker.connect()
        t0 = time.monotonic()
        report = await publish_catalogue(broker, catalogue, run_id=f"demo-{seed}")
        summary.seconds["publish"] = time.monotonic() - t0
        summary.jobs = report.jobs

        t0 = time.monotonic()
        stats = await run_worker(
            settings, worker_id="demo-worker", until_idle=True, progress_total=report.jobs
        )
        work_s = time.monotonic() - t0
        summary.seconds["work"] = work_s
        summary.recovered = stats.recovered
        dead = await broker.dead_letters(limit=10**9)
        await broker.close()

    storage = make_storage(settings)
    t0 = time.monotonic()
    generation = build_generation(storage, settings.index.n_shards)
    summary.model_id = generation.model_id or ""
    summary.seconds["index_build"] = time.monotonic() - t0
    searcher = Searcher(storage)
    summary.indexed = searcher.count()
    summary.images_per_s = summary.indexed / max(work_s, 1e-9)
    summary.dead_lettered = dict(Counter(d.reason for d in dead))
    indexed_ids = {int(i) for i in searcher.image_ids()}
    summary.unexpected_outcomes = check_outcomes(corpus, indexed_ids, dead)
    hits, pairs = near_duplicate_top1(corpus, searcher)
    summary.near_duplicate_pairs = pairs
    summary.near_duplicate_top1 = hits / pairs if pairs else 0.0
    return summary


def check_outcomes(corpus: Corpus, indexed: set[int], dead: list[DeadLetter]) -> list[str]:
    """Compare each image's fate with what the corpus says it should be (empty: all good)."""
    expected_failures = corpus.expected_failures()
    dead_by_key: dict[str, str] = {}
    for letter in dead:
        try:
            job = decode_job(letter.body)
        except JobFailure:  # a malformed body has no key to compare
            continue
        dead_by_key[f"{job.item_id}/{job.image_key}"] = letter.reason
    problems = []
    for item in corpus.items:
        for image in item.images:
            key = f"{item.item_id}/{image.image_key}"
            in_index = image_id_for(item.item_id, image.image_key) in indexed
            want = expected_failures.get(key)
            got = dead_by_key.get(key)
            if want is None and not in_index:
                problems.append(f"{key}: expected indexed, got {got or 'nothing'}")
            elif want == "truncated" and not (in_index or got == "truncated"):
                problems.append(f"{key}: expected recovered or truncated, got {got or 'nothing'}")
            elif want not in (None, "truncated") and got != want:
                problems.append(f"{key}: expected {want}, got {got or 'indexed'}")
    return problems


def near_duplicate_top1(corpus: Corpus, searcher: Searcher) -> tuple[int, int]:
    """How often a near-duplicate copy's best hit among other items is its original."""
    hits = pairs = 0
    for dup_item, original in corpus.near_duplicates.items():
        vector = searcher.vector_of(image_id_for(dup_item, "0"))
        if vector is None:
            continue
        pairs += 1
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        results = searcher.search(query, k=5, exclude_item_ids=[{dup_item}])
        if results[0] and results[0][0].item_id == original:
            hits += 1
    return hits, pairs


def render_summary(summary: DemoSummary) -> str:
    d = summary.as_dict()
    lines = [
        "imgfleet demo summary",
        f"  model             {d['model_id']}",
        f"  jobs              {d['jobs']}",
        f"  indexed           {d['indexed']}  (recovered truncated JPEGs: {d['recovered']})",
        f"  dead-lettered     {sum(d['dead_lettered'].values())}",
    ]
    lines += [f"    {reason:<16}{n}" for reason, n in d["dead_lettered"].items()]
    lines += [
        f"  accounted for     {'yes' if d['all_accounted_for'] else 'NO'}",
        f"  images/s          {d['images_per_s']}",
        f"  near-dup top-1    {d['near_duplicate_top1']:.3f}"
        f" over {d['near_duplicate_pairs']} pairs",
    ]
    if d["unexpected_outcomes"]:
        lines.append("  unexpected outcomes:")
        lines += [f"    {p}" for p in d["unexpected_outcomes"][:20]]
    return "\n".join(lines)
