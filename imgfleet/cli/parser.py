"""The argparse pieces every command module uses: global options and subcommands.

A leaf subcommand names its handler (``set_defaults(handler=...)``); ``imgfleet.cli.main``
loads the settings and calls ``args.handler(args, settings)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from common.config import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--config", default=default, help="TOML configuration file")
    parser.add_argument(
        "--log-format", choices=["console", "json"], default=default, help="log line format"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default
    )


def subcommand(
    subparsers: Any, name: str, *, handler: Handler | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand that also takes the global options (`imgfleet demo --log-level warning`).

    Their default is SUPPRESS there, so an option given before the subcommand is not reset.
    A leaf command passes the ``handler`` that runs it.
    """
    shared = argparse.ArgumentParser(add_help=False)
    add_global_options(shared, argparse.SUPPRESS)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[shared], **kwargs)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser
