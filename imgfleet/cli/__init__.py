"""The `imgfleet` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import orjson

from common.config import Settings, load_settings, masked_dump
from common.errors import ConfigError, ExitCode, ImgfleetError, JobFailure, OperatorError
from common.observability.logging import configure_logging, settings_secrets
from imgfleet.cli.index import register as register_index_commands
from imgfleet.cli.ops import register as register_ops_commands
from imgfleet.cli.produce import register as register_produce_commands

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

    register_produce_commands(sub, _subcommand)  # produce (imgfleet/cli/produce.py)

    work = _subcommand(sub, "work", help="run a worker until SIGTERM")
    work.add_argument("--worker-id", default=None, help="default: HOST-PID")
    work.add_argument("--until-idle", action="store_true", help="exit once the queue is drained")
    work.add_argument("--json", action="store_true", help="print final stats as JSON")

    register_index_commands(sub, _subcommand)  # index, search, serve (imgfleet/cli/index.py)

    inspect = _subcommand(
        sub, "inspect", help="fetch and decode images and report why each one works or fails"
    )
    inspect.add_argument("inputs", nargs="+", metavar="URL|FILE")
    inspect.add_argument("--json", action="store_true", help="one JSON object per input")

    config = _subcommand(sub, "config", help="configuration")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    _subcommand(config_sub, "show", help="print the effective configuration, secrets masked")

    register_ops_commands(sub, _subcommand)  # status, dlq, requeue, purge (cli_ops.py)
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
        args.log_format or settings.logging.format,
        args.log_level or settings.logging.level,
        secrets=settings_secrets(settings),
    )
    try:
        return int(_dispatch(args, settings) or 0)
    except ConfigError as exc:
        print(f"imgfleet: configuration error: {exc}", file=sys.stderr)
        return 2
    except JobFailure as exc:
        print(f"imgfleet: {exc.reason.value}: {exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
    except OperatorError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except ImgfleetError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
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
        from imgfleet.cli.produce import dispatch as dispatch_produce

        return dispatch_produce(args, settings)
    if command == "work":
        return _cmd_work(args, settings)
    if command in ("index", "search", "serve"):
        from imgfleet.cli.index import dispatch

        return dispatch(args, settings)
    if command == "inspect":
        from imgfleet.inspect import run_inspect

        return run_inspect(args.inputs, settings, as_json=args.json)
    if command == "config":
        print(_toml_like(masked_dump(settings)))
        return 0
    if command in ("status", "dlq", "requeue", "purge"):
        from imgfleet.cli.ops import dispatch as dispatch_ops

        return dispatch_ops(args, settings)
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
    from imgfleet.demo.run import render_summary, run_demo

    summary = asyncio.run(run_demo(settings, args.workdir, args.items, seed=args.seed))
    print(render_summary(summary))
    if args.json:
        _print_json(summary.as_dict())
    return 0 if summary.accounted else 1


def _cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    """Exit codes (common.errors.ExitCode): 0 drained on SIGTERM or --until-idle, 1
    unrecoverable (broker gone past worker.broker_give_up_s, model or decode pool failed),
    2 configuration, 130 SIGINT (after draining like SIGTERM)."""
    from common.errors import UnrecoverableError
    from common.observability.logging import get_logger
    from imgfleet.wiring import run_worker

    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        stats = asyncio.run(
            run_worker(
                settings,
                worker_id=worker_id,
                until_idle=args.until_idle,
                serve_ops=settings.metrics.enabled,
            )
        )
    except UnrecoverableError as exc:
        get_logger("worker").error(
            "worker exiting: unrecoverable",
            component=exc.component,
            error=str(exc),
            exit_code=int(ExitCode.UNRECOVERABLE),
        )
        return ExitCode.UNRECOVERABLE
    if args.json:
        _print_json(stats.as_dict())
    return ExitCode.INTERRUPTED if stats.stopped_by == "SIGINT" else ExitCode.OK
