"""The `imgfleet` command line: the parser, and ``main``, which runs one command.

Each command module registers its subcommands, and each leaf subcommand names its handler
(``imgfleet.cli.parser.subcommand(..., handler=...)``). ``main`` loads the settings once,
configures logging and calls the handler; errors that reach it are printed as one
``imgfleet: ...`` line with their exit code (``common.errors.ExitCode``).

Start-up cost: building the parser imports argparse and the command modules only; each
handler imports what it needs (pydantic settings, structlog, asyncio, brokers, numpy)
when it runs. Measured on the 2-core dev box (best of 15, `python -m imgfleet`): --help
0.44 s -> 0.09 s, `search -k 0` 0.65 s -> 0.08 s; a bare interpreter starts in 0.03 s.
`-X importtime` had pydantic settings at 225 ms and structlog at 76 ms of the 0.44 s,
imported only to print help.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, ExitCode, ImgfleetError, JobFailure, OperatorError
from imgfleet.cli import config, demo, index, inspect, ops, produce, search, serve, work
from imgfleet.cli.parser import CliParser, add_global_options

if TYPE_CHECKING:
    from common.config import Settings

EPILOG = """\
configuration: a TOML file (--config or IMGFLEET_CONFIG) plus environment overrides named
IMGFLEET_<SECTION>__<KEY>, e.g. IMGFLEET_WORKER__MAX_BATCH=64. See `imgfleet config show`.
"""

_VERBOSITY = {1: "info", 2: "debug"}


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
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


def log_level(args: argparse.Namespace, settings: Settings) -> str:
    """--log-level, else -v / -vv, else the command's own default, else logging.level."""
    if args.log_level:
        return str(args.log_level)
    if args.verbose:
        return _VERBOSITY[min(args.verbose, 2)]
    return getattr(args, "default_log_level", None) or settings.logging.level


def _said(exc: ImgfleetError) -> str:
    """A command's error in one line; exit codes: ``OperatorError.exit_code``, else 1."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, JobFailure):
        return exc.message  # what happened; the reason code is the DLQ's vocabulary
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.config import load_settings
    from common.observability.logging import configure_logging, settings_secrets

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    level = log_level(args, settings)
    configure_logging(
        args.log_format or settings.logging.format, level, secrets=settings_secrets(settings)
    )
    try:
        return int(args.handler(args, settings) or 0)
    except ImgfleetError as exc:
        print(f"imgfleet: {_said(exc)}", file=sys.stderr)
        return int(exc.exit_code if isinstance(exc, OperatorError) else ExitCode.FAILED)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except ValueError as exc:
        if not _is_refused_value(exc, args, debug=level == "debug"):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        place = "/".join(Path(where.filename).parts[-2:])
        print(
            f"imgfleet {args.command}: error: {exc} (raised at {place}:{where.lineno}; "
            "--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return int(ExitCode.CONFIG)


def _is_refused_value(exc: ValueError, args: argparse.Namespace, *, debug: bool) -> bool:
    """The safety net behind the parser's argument types: a library refused a value.

    Only a plain ``ValueError`` (what argument checks raise: ``k must be >= 1``) from a
    one-shot command is caught. Its subclasses (a JSON or Unicode decode error) and every
    other exception are bugs or data problems and keep their traceback, and so does a
    ValueError in a long-running service (``imgfleet work``, ``serve``), whose log needs
    the stack. The one line still names where it was raised, so a bug that happens to be
    a ValueError is not mistaken for a typo; ``--log-level debug`` shows the traceback.
    """
    return type(exc) is ValueError and not debug and args.command not in ("work", "serve")
