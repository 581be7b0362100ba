"""The `imgfleet` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from common.config import Settings, load_settings, masked_dump
from common.errors import ConfigError, ImgfleetError
from common.logging import configure_logging
from imgfleet.cli_index import register as register_index_commands

EPILOG = """\
configuration: a TOML file (--config or IMGFLEET_CONFIG) plus environment overrides named
IMGFLEET_<SECTION>__<KEY>, e.g. IMGFLEET_WORKER__MAX_BATCH=64. See `imgfleet config show`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfleet",
        description="Keep a sharded FAISS visual-search index of a product catalogue current.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _subcommand(
        sub,
        "demo",
        help="run the whole pipeline on a synthetic catalogue (no servers needed)",
        description="Generate a synthetic catalogue, serve it over loopback HTTP, publish it "
        "to the local broker, run a worker until drained, build the index and report.",
    )
    demo.add_argument("--items", type=int, default=200, help="catalogue items (default 200)")
    demo.add_argument("--workdir", type=Path, default=Path("imgfleet-demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON last")

    produce = _subcommand(sub, "produce", help="publish jobs")
    produce_sub = produce.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cat = _subcommand(produce_sub, "catalogue", help="publish a JSONL or CSV catalogue file")
    cat.add_argument("path", type=Path)
    cat.add_argument("--run-id", default=None, help="run id (default: generated)")
    cat.add_argument("--lane", choices=["bulk", "live"], default="bulk")
    cat.add_argument("--rejects", type=Path, help="append rejected rows (JSONL) here")
    cat.add_argument("--json", action="store_true")

    work = _subcommand(sub, "work", help="run a worker until SIGTERM")
    work.add_argument("--worker-id", default=None, help="default: HOST-PID")
    work.add_argument("--until-idle", action="store_true", help="exit once the queue is drained")
    work.add_argument("--json", action="store_true", help="print final stats as JSON")

    register_index_commands(sub, _subcommand)  # index, search, serve (imgfleet/cli_index.py)

    inspect = _subcommand(
        sub, "inspect", help="fetch and decode images and report why each one works or fails"
    )
    inspect.add_argument("inputs", nargs="+", metavar="URL|FILE")
    inspect.add_argument("--json", action="store_true", help="one JSON object per input")

    config = _subcommand(sub, "config", help="configuration")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    _subcommand(config_sub, "show", help="print the effective configuration, secrets masked")

    dlq = _subcommand(sub, "dlq", help="dead-lettered jobs")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = _subcommand(dlq_sub, "list", help="dead-lettered jobs by reason")
    dlq_list.add_argument("--reason", help="only this reason code")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_list.add_argument("--json", action="store_true")
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--config", default=default, help="TOML configuration file")
    parser.add_argument(
        "--log-format", choices=["console", "json"], default=default, help="log line format"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default
    )


def _subcommand(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand that also takes the global options (`imgfleet demo --log-level warning`).

    Their default is SUPPRESS there, so an option given before the subcommand is not reset.
    """
    shared = argparse.ArgumentParser(add_help=False)
    _add_global_options(shared, argparse.SUPPRESS)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[shared], **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        args.log_format or settings.logging.format, args.log_level or settings.logging.level
    )
    try:
        return int(_dispatch(args, settings) or 0)
    except ConfigError as exc:
        print(f"imgfleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except ImgfleetError as exc:
        print(f"imgfleet: {exc.reason.value}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "demo":
        return _cmd_demo(args, settings)
    if command == "produce":
        return asyncio.run(_cmd_produce(args, settings))
    if command == "work":
        return _cmd_work(args, settings)
    if command in ("index", "search", "serve"):
        from imgfleet.cli_index import dispatch

        return dispatch(args, settings)
    if command == "inspect":
        from imgfleet.inspect import run_inspect

        return run_inspect(args.inputs, settings, as_json=args.json)
    if command == "config":
        print(_toml_like(masked_dump(settings)))
        return 0
    if command == "dlq":
        return asyncio.run(_cmd_dlq(args, settings))
    raise AssertionError(command)


def _toml_like(data: dict[str, Any]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {orjson.dumps(value).decode()}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.demo import render_summary, run_demo

    summary = asyncio.run(run_demo(settings, args.workdir, args.items, seed=args.seed))
    print(render_summary(summary))
    if args.json:
        _print_json(summary.as_dict())
    return 0 if summary.accounted else 1


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


def _cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.wiring import run_worker

    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    stats = asyncio.run(run_worker(settings, worker_id=worker_id, until_idle=args.until_idle))
    if args.json:
        _print_json(stats.as_dict())
    return 0


async def _cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from common.schema import decode_job
    from imgfleet.wiring import read_dead_letters

    letters = await read_dead_letters(settings)
    if args.reason:
        letters = [d for d in letters if d.reason == args.reason]
    counts = Counter(d.reason for d in letters)
    rows = []
    for letter in letters[: args.limit]:
        try:
            job = decode_job(letter.body)
            url = job.url
        except ImgfleetError:
            url = None
        rows.append(
            {
                "dlq_id": letter.dlq_id,
                "reason": letter.reason,
                "error": letter.error,
                "attempts": letter.attempts,
                "run_id": letter.run_id,
                "item_id": letter.item_id,
                "url": url,
            }
        )
    if args.json:
        _print_json({"counts": dict(counts), "jobs": rows})
        return 0
    print(f"{sum(counts.values())} dead-lettered jobs")
    for reason, n in counts.most_common():
        print(f"  {reason:<20}{n}")
    for row in rows:
        print(
            f"  [{row['reason']}] item={row['item_id']} attempts={row['attempts']} {row['error']}"
        )
    return 0
