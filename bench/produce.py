"""Catalogue producer throughput: `imgfleet produce catalogue` against a naive loop, same run.

A generated JSONL catalogue (1M rows; ``--quick``: 200k) goes to confirmed jobs on the
RabbitMQ server on 127.0.0.1:5672 (fresh queues per side, deleted afterwards).

- Project: the producer's ``CatalogueRun`` (what the CLI runs: reader thread, image
  de-duplication, deterministic job ids, run registration, checkpoints, publish ledger,
  image snapshot), batches of 500 jobs with 4 awaiting confirms, 100 jobs per message.
- Naive: ``json.loads`` per line, a check of the two fields, one aio-pika publish per job
  awaiting each confirm; no de-duplication, checkpoints or ledger. It runs on a prefix of
  the rows (it would take hours on all of them); rates are compared.

Each side runs in its own subprocess so its memory high-water mark (``ru_maxrss``) is its
own. The project side imports the producer modules directly: the `imgfleet` CLI also
imports the worker stack on start-up (torch), which is start-up time and memory outside
the producer.

    python bench/produce.py [--quick] [--json]

The last line with --json is one JSON object; ``ratio`` is project rows/s ÷ naive rows/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run with bench/ first on sys.path (bench/queue.py shadows the standard library's
# queue module): swap bench/ for the repository root before anything imports it.
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH_DIR.parent)] + [
    p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR
]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

from bench.support.harness import bench_parser, machine_summary, report  # noqa: E402
from bench.support.rabbitmq import RABBITMQ_URL, fresh_topology, naive_queue  # noqa: E402


def write_catalogue(path: Path, rows: int) -> int:
    """``rows`` rows: 1-2 images per item, 1% broken rows, 1% repeated rows. Returns jobs."""
    jobs = 0
    written = 0
    with path.open("wb") as fh:
        i = 0
        while written < rows:
            images = 1 + i % 2
            row = orjson.dumps(
                {
                    "item_id": f"sku-{i:08d}",
                    "image_urls": [f"https://cdn.example/img/{i}/{k}.jpg" for k in range(images)],
                    "version": 1 + i % 7,
                }
            )
            fh.write(row + b"\n")
            written += 1
            jobs += images
            if i % 100 == 50 and written < rows:
                fh.write(row + b"\n")  # a repeated row: no new job
                written += 1
            if i % 100 == 99 and written < rows:
                fh.write(b'{"item_id": "broken", "image_urls": 7}\n')
                written += 1
            i += 1
    return jobs


def _prefix_file(source: Path, target: Path, rows: int) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        for n, line in enumerate(src):
            if n >= rows:
                break
            dst.write(line)


# -- the two sides, each run as `python bench/produce.py --child SIDE FILE WORKDIR` ----------


async def _project_child(catalogue: Path, workdir: Path) -> dict[str, Any]:
    from common.brokers.rabbitmq.broker import RabbitMQBroker
    from common.config import load_settings
    from common.storage.local import LocalStorage
    from producers.catalogue.reader import open_catalogue
    from producers.nightly.run import CatalogueRun, RunOptions
    from producers.nightly.run_record import RunRecord

    class Registry:  # the run file is the index's business; a dict is enough here
        def __init__(self) -> None:
            self.records: dict[str, RunRecord] = {}

        def load(self, run_id: str) -> RunRecord | None:
            return self.records.get(run_id)

        def save(self, record: RunRecord) -> None:
            self.records[record.run_id] = record

        def last_published(self, catalogue: str, *, exclude_run_id: str) -> RunRecord | None:
            return None

    settings = load_settings(
        broker={
            "kind": "rabbitmq",
            "url": RABBITMQ_URL,
            "name_prefix": f"bp-{uuid.uuid4().hex[:8]}",
        },
        logging={"level": "warning"},
    )
    from common.observability.logging import configure_logging

    configure_logging("console", "warning")
    storage = LocalStorage(workdir / "store")
    p = settings.producer
    async with fresh_topology(RabbitMQBroker(settings.broker)) as broker:
        # Everything imported and connected: what the run adds on top is its own memory.
        baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run_report = await CatalogueRun(
            RunOptions(
                run_id="bench",
                source=str(catalogue),
                batch_size=p.batch_size,
                in_flight=p.publish_in_flight,
                checkpoint_interval_s=p.checkpoint_interval_s,
                progress_interval_s=3600.0,
            ),
            broker=broker,
            storage=storage,
            registry=Registry(),
        ).run(lambda: open_catalogue(catalogue))
        elapsed = time.perf_counter() - start
        depth = sum((await broker.depths()).values())
    snapshot = storage.local_path("runs/bench/images.npz")
    return {
        "rows": run_report.rows,
        "jobs": run_report.jobs,
        "elapsed_s": elapsed,
        "queued_messages": depth,
        "snapshot_bytes": snapshot.stat().st_size if snapshot else 0,
        "baseline_maxrss_mb": baseline_kb / 1024,
    }


async def _naive_child(catalogue: Path) -> dict[str, Any]:
    import json

    rows = jobs = 0
    async with naive_queue() as naive:
        start = time.perf_counter()
        with catalogue.open() as fh:
            for line in fh:
                rows += 1
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                urls = row.get("image_urls")
                if not isinstance(row.get("item_id"), str) or not isinstance(urls, list):
                    continue
                for key, url in enumerate(urls):
                    body = json.dumps(
                        {
                            "job_id": uuid.uuid4().hex,
                            "item_id": row["item_id"],
                            "image_key": str(key),
                            "url": url,
                            "version": row.get("version", 0),
                        }
                    ).encode()
                    await naive.publish(body)
                    jobs += 1
        elapsed = time.perf_counter() - start
    return {"rows": rows, "jobs": jobs, "elapsed_s": elapsed}


def _child(side: str, catalogue: Path, workdir: Path) -> None:
    if side == "project":
        result = asyncio.run(_project_child(catalogue, workdir))
    else:
        result = asyncio.run(_naive_child(catalogue))
    print(orjson.dumps(result).decode())


def _run_side(side: str, catalogue: Path, workdir: Path) -> dict[str, Any]:
    """Run one side in a subprocess; its figures plus its own ru_maxrss."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", side, str(catalogue), str(workdir)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} side failed with exit code {proc.returncode}")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    result["maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], quick_help="200k rows, done in ~2 minutes")
    parser.add_argument("--rows", type=int, help="catalogue rows (default 1M; --quick 200k)")
    parser.add_argument(
        "--child", nargs=3, metavar=("SIDE", "FILE", "WORKDIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        side, file, workdir = args.child
        _child(side, Path(file), Path(workdir))
        return 0

    rows = args.rows or (200_000 if args.quick else 1_000_000)
    naive_rows = 1_500 if args.quick else 4_000
    with tempfile.TemporaryDirectory(prefix="bench-produce-") as tmp:
        root = Path(tmp)
        catalogue = root / "catalogue.jsonl"
        write_catalogue(catalogue, rows)
        prefix = root / "prefix.jsonl"
        _prefix_file(catalogue, prefix, naive_rows)
        project = _run_side("project", catalogue, root / "project")
        naive = _run_side("naive", prefix, root / "naive")
        catalogue_mb = catalogue.stat().st_size / 2**20

    result: dict[str, Any] = {
        "bench": "produce",
        "quick": args.quick,
        "machine": machine_summary(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rows": project["rows"],
        "catalogue_mb": round(catalogue_mb, 1),
        "project_jobs": project["jobs"],
        "project_rows_per_s": project["rows"] / project["elapsed_s"],
        "project_jobs_per_s": project["jobs"] / project["elapsed_s"],
        "project_maxrss_mb": project["maxrss_mb"],
        "project_baseline_maxrss_mb": project["baseline_maxrss_mb"],
        "project_run_bytes_per_row": (project["maxrss_mb"] - project["baseline_maxrss_mb"])
        * 2**20
        / project["rows"],
        "project_snapshot_bytes_per_row": project["snapshot_bytes"] / project["rows"],
        "naive_rows": naive["rows"],
        "naive_rows_per_s": naive["rows"] / naive["elapsed_s"],
        "naive_jobs_per_s": naive["jobs"] / naive["elapsed_s"],
        "naive_maxrss_mb": naive["maxrss_mb"],
    }
    result["ratio"] = result["project_rows_per_s"] / result["naive_rows_per_s"]
    lines = [
        f"project: {result['rows']:,} rows -> {result['project_jobs']:,} confirmed jobs, "
        f"{result['project_rows_per_s']:,.0f} rows/s ({result['project_jobs_per_s']:,.0f} jobs/s), "
        f"max RSS {result['project_maxrss_mb']:,.0f} MB "
        f"({result['project_run_bytes_per_row']:.0f} bytes/row above start-up)",
        f"naive:   {result['naive_rows']:,} rows, {result['naive_rows_per_s']:,.0f} rows/s "
        f"({result['naive_jobs_per_s']:,.0f} jobs/s), max RSS {result['naive_maxrss_mb']:,.0f} MB",
        f"ratio (rows/s): {result['ratio']:.1f}x",
    ]
    return report(result, lines, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
