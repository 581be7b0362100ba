"""`imgfleet produce ...`: publish jobs from a catalogue."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from common.config import Settings


def register(sub: Any, subcommand: Any) -> None:
    produce = subcommand(sub, "produce", help="publish jobs")
    produce_sub = produce.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cat = subcommand(produce_sub, "catalogue", help="publish a JSONL or CSV catalogue file")
    cat.add_argument("path", type=Path)
    cat.add_argument("--run-id", default=None, help="run id (default: generated)")
    cat.add_argument("--lane", choices=["bulk", "live"], default="bulk")
    cat.add_argument("--rejects", type=Path, help="append rejected rows (JSONL) here")
    cat.add_argument("--json", action="store_true")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_cmd_produce(args, settings))


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from common.schema import Lane
    from imgfleet.wiring import make_broker, make_storage
    from index.runs import RunInfo, write_run
    from producers.publish import publish_catalogue

    run_id = args.run_id or f"run-{uuid.uuid4().hex[:12]}"
    lane = Lane(args.lane)
    storage = make_storage(settings)
    started_at_s = time.time()

    def register(expected_jobs: int) -> None:
        # A bulk run is a nightly run: `index finalize --run` builds its generation once
        # every job is accounted for. Live-lane jobs are applied live, so no run is registered.
        if lane is Lane.BULK:
            info = RunInfo(run_id, str(args.path), expected_jobs, started_at_s)
            write_run(storage, info)

    broker = make_broker(settings)
    await broker.connect()
    try:
        register(0)  # the start time first: workers may write segments at once
        report = await publish_catalogue(
            broker, args.path, run_id=run_id, lane=lane, rejects_path=args.rejects
        )
        register(report.jobs)
    finally:
        await broker.close()
    if args.json:
        _print_json(report.as_dict())
    else:
        for key, value in report.as_dict().items():
            print(f"{key:<18}{value}")
        for reject in report.rejects[:20]:
            print(f"  line {reject.line}: {reject.reason}")
    return 0
