"""The `imgfleet` command line: the parser, and ``main``, which runs one command.

Each command module registers its subcommands, and each leaf subcommand names its handler
(``imgfleet.cli.parser.subcommand(..., handler=...)``). ``main`` loads the settings once,
configures logging and calls the handler; errors that reach it are printed as one
``imgfleet: ...`` line with their exit code (``common.errors.ExitCode``).
"""

from __future__ import annotations

import argparse
import sys

from common.config import load_settings
from common.errors import ConfigError, ExitCode, ImgfleetError, JobFailure, OperatorError
from common.observability.logging import configure_logging, settings_secrets
from imgfleet.cli import config, demo, index, inspect, ops, produce, search, serve, work
from imgfleet.cli.parser import add_global_options

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
    add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of `imgfleet --help`.
    for module in (demo, produce, work, index, search, serve, inspect, config, ops):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    configure_logging(
        args.log_format or settings.logging.format,
        args.log_level or settings.logging.level,
        secrets=settings_secrets(settings),
    )
    try:
        return int(args.handler(args, settings) or 0)
    except ConfigError as exc:
        print(f"imgfleet: configuration error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
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
        return int(ExitCode.INTERRUPTED)
