"""The argparse pieces every command module uses: the parser, global options, subcommands,
and the argument types that refuse a bad value while parsing.

A leaf subcommand names its handler (``set_defaults(handler=...)``); ``imgfleet.cli.main``
loads the settings and calls ``args.handler(args, settings)``.

Every usage error is one line on stderr, ``imgfleet <command>: error: ...``, exit 2: an
unknown option is reported by the subcommand it was given to, with the closest option
it has ("did you mean --json?"). This module imports nothing heavy: ``--help`` and usage
errors must stay cheap (no pydantic, structlog or numpy; see ``imgfleet.cli``).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from common.config import Settings

Handler = Callable[[argparse.Namespace, "Settings"], int]

# The namespace attribute naming the deepest subcommand parser that took part in a parse:
# unknown options are reported against it, not against `imgfleet` as a whole.
_PARSER_ATTR = "_cli_parser"
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)")
_REQUIRED = ("the following arguments are required", "is required")


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a suggestion, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given: list[str] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        owner: CliParser = parsed.__dict__.pop(_PARSER_ATTR, self)
        if extras:
            owner.error(owner.unknown_message(extras))
        return parsed

    def unknown_message(self, extras: Sequence[str]) -> str:
        message = f"unrecognized arguments: {' '.join(extras)}"
        for extra in extras:
            close = self.closest_option(extra)
            if close:
                return f"{message} (did you mean {close}?)"
        return message

    def closest_option(self, given: str) -> str | None:
        if not given.startswith("-"):
            return None
        flag = given.split("=", 1)[0]
        options = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
        return close[0] if close else None

    def _unknown_given(self) -> list[str]:
        """Options given to this (leaf) parser that it does not know, prefixes allowed."""
        if any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return []  # the rest of the line belongs to a subcommand
        known = list(self._option_string_actions)
        unknown = []
        for arg in self._given:
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if not flag.startswith("-") or _is_number(flag):
                continue
            if not any(option.startswith(flag) for option in known):
                unknown.append(arg)
        return unknown

    def error(self, message: str) -> NoReturn:
        # A typo that also leaves a required option out: the typo is the news.
        if any(marker in message for marker in _REQUIRED):
            unknown = self._unknown_given()
            if unknown:
                message = self.unknown_message(unknown)
        choice = _INVALID_CHOICE.search(message)
        if choice:
            choices = re.findall(r"'([^']*)'", choice["choices"])
            close = difflib.get_close_matches(choice["value"], choices, n=1, cutoff=0.6)
            if close:
                message = f"{message}; did you mean {close[0]!r}?"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--config", default=default, help="TOML configuration file")
    parser.add_argument(
        "--log-format", choices=["console", "json"], default=default, help="log line format"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more log lines (-v: info, -vv: debug); one-shot commands otherwise log "
        "warnings and errors only",
    )


def subcommand(
    subparsers: Any,
    name: str,
    *,
    handler: Handler | None = None,
    log_level: str | None = None,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand that also takes the global options (`imgfleet demo --log-level warning`).

    Their default is SUPPRESS there, so an option given before the subcommand is not reset.
    A leaf command passes the ``handler`` that runs it, and ``log_level`` when it logs at
    another level than ``logging.level`` unless told (-v, --log-level): the one-shot
    commands a person reads (search, status, ...) show warnings and errors only.
    """
    shared = argparse.ArgumentParser(add_help=False)
    add_global_options(shared, argparse.SUPPRESS)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[shared], **kwargs)
    parser.set_defaults(**{_PARSER_ATTR: parser})
    if handler is not None:
        parser.set_defaults(handler=handler, default_log_level=log_level)
    return parser


# -- argument types: a bad value is a usage error (exit 2) while parsing --------------------


def _number(text: str, kind: Callable[[str], Any], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}")
    return value


def _checked(
    kind: Callable[[str], Any], what: str, ok: Callable[[Any], bool], rule: str
) -> Callable[[str], Any]:
    """An argparse ``type=``: ``what`` parsed with ``kind``, refused unless ``ok``."""

    def parse(text: str) -> Any:
        value = _number(text, kind, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, "a whole number", lambda v: v >= 1, "must be at least 1")
non_negative_int = _checked(int, "a whole number", lambda v: v >= 0, "must be 0 or more")
positive_float = _checked(float, "a number", lambda v: v > 0, "must be above 0")
non_negative_float = _checked(float, "a number", lambda v: v >= 0, "must be 0 or more")
port = _checked(int, "a port number", lambda v: 0 <= v <= 65535, "a port is 0 to 65535")
