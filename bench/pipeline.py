"""Pipeline throughput: imgfleet's worker against a naive loop, same corpus, same run.

The project side publishes the demo corpus to the local broker and runs a worker until the
queue drains (fetch over loopback HTTP, decode pool, dynamic batches, segments, acks). The
baseline is a plain loop over the same URLs: fetch, Pillow open + convert + resize, and the
same model, called one batch at a time with no overlap between stages.

    python bench/pipeline.py [--quick] [--json] [--items N]

The last line with --json is one JSON object; ``ratio`` is project images/s ÷ baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run with bench/ first on sys.path, and bench/queue.py is named like the standard
# library's queue module: swap bench/ for the repository root before anything imports it.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH_DIR.parent)] + [
    p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR
]

import asyncio  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench.support.harness import bench_parser, host_figures, report  # noqa: E402

# Project imports live inside functions: the decode pool spawns processes that re-import
# this module, and they must not pay for torch.


def _serve_images(root: str, port_q: Any, stop: Any) -> None:
    from imgfleet.demo.image_server import ImageServer

    with ImageServer(Path(root)) as server:
        port_q.put(server.base_url)
        stop.wait()


class OriginProcess:
    """The image server in its own process, like a CDN: it must not share our GIL."""

    def __init__(self, root: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._q = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve_images, args=(str(root), self._q, self._stop))

    def __enter__(self) -> str:
        self._proc.start()
        return str(self._q.get(timeout=60))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)


def embed_in_batches(embedder: Any, images: Iterable[np.ndarray], batch_size: int) -> int:
    """The baselines' embedding: ``images`` taken one at a time, each ``batch_size`` of them
    embedded as soon as they are there (no overlap between stages), the rest at the end;
    returns how many were embedded."""
    done = 0
    pending: list[np.ndarray] = []
    for pixels in images:
        pending.append(pixels)
        if len(pending) >= batch_size:
            embedder.embed(np.stack(pending))
            done += len(pending)
            pending = []
    if pending:
        embedder.embed(np.stack(pending))
        done += len(pending)
    return done


def naive_loop(catalogue: Path, embedder: Any, batch_size: int) -> tuple[int, float]:
    from PIL import Image

    from producers.catalogue.reader import CatalogueItem, read_catalogue

    side = embedder.card.input_size

    def fetched() -> Iterator[np.ndarray]:
        for entry in read_catalogue(catalogue):
            if not isinstance(entry, CatalogueItem):
                continue
            for url in entry.image_urls:
                try:
                    with urllib.request.urlopen(url, timeout=30) as resp:
                        data = resp.read()
                    img = Image.open(io.BytesIO(data)).convert("RGB").resize((side, side))
                except Exception:
                    continue
                yield np.asarray(img)

    t0 = time.perf_counter()
    done = embed_in_batches(embedder, fetched(), batch_size)
    return done, time.perf_counter() - t0


async def project_run(
    settings: Any, catalogue: Path, *, name: str = "bench", embedder: Any = None
) -> tuple[int, float]:
    """The catalogue published to the local broker as run ``name``, then a worker of that
    name run until the queue drains (with ``embedder``, if given, instead of the wiring's
    own); returns (images indexed, seconds the worker took)."""
    from imgfleet.factories import make_broker, run_worker
    from producers.nightly.upserts import publish_catalogue

    broker = make_broker(settings)
    await broker.connect()
    published = await publish_catalogue(broker, catalogue, run_id=name)
    await broker.close()
    t0 = time.perf_counter()
    stats = await run_worker(
        settings,
        worker_id=name,
        until_idle=True,
        progress_total=published.jobs,
        embedder=embedder,
    )
    return stats.indexed, time.perf_counter() - t0


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], quick_help="small corpus, done in ~1 minute")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--baseline-batch", type=int, default=32)
    args = parser.parse_args()
    from common.config import load_settings
    from common.observability.logging import configure_logging
    from imgfleet.demo.corpus import make_corpus
    from imgfleet.demo.run import demo_settings
    from imgfleet.factories import make_embedder

    n_items = args.items or (250 if args.quick else 1000)
    configure_logging("console", os.environ.get("BENCH_LOG_LEVEL", "warning"))

    with tempfile.TemporaryDirectory(prefix="imgfleet-bench-") as tmp:
        workdir = Path(tmp)
        corpus = make_corpus(workdir / "corpus", n_items, seed=1)
        settings = demo_settings(load_settings(), workdir)
        embedder = make_embedder(settings)
        with OriginProcess(corpus.root) as base_url:
            catalogue = corpus.write_catalogue_jsonl(workdir / "cat.jsonl", base_url)
            # Warm both paths (model first call, page cache) outside the timings.
            embedder.embed(np.zeros((2, 224, 224, 3), np.uint8))
            base_n, base_s = naive_loop(catalogue, embedder, args.baseline_batch)
            proj_n, proj_s = asyncio.run(project_run(settings, catalogue))

    base_rate = base_n / base_s
    proj_rate = proj_n / proj_s
    result = {
        "bench": "pipeline",
        "items": n_items,
        "project_images": proj_n,
        "project_s": round(proj_s, 2),
        "project_images_per_s": round(proj_rate, 2),
        "baseline_images": base_n,
        "baseline_s": round(base_s, 2),
        "baseline_images_per_s": round(base_rate, 2),
        "baseline_batch": args.baseline_batch,
        "ratio": round(proj_rate / base_rate, 3),
        **host_figures(),
    }
    lines = [
        f"project : {proj_n} images in {proj_s:.1f} s = {proj_rate:.1f} images/s",
        f"baseline: {base_n} images in {base_s:.1f} s = {base_rate:.1f} images/s",
        f"ratio   : {result['ratio']}x",
    ]
    return report(result, lines, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
