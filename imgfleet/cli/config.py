"""`imgfleet config show`: the effective configuration, secrets masked."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from common.config import Settings, masked_dump
from imgfleet.cli.parser import subcommand


def register(sub: Any) -> None:
    config = subcommand(sub, "config", help="configuration")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    subcommand(
        actions, "show", handler=_cmd_show, help="print the effective configuration, secrets masked"
    )


def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    print(toml_like(masked_dump(settings)))
    return 0


def toml_like(data: dict[str, Any]) -> str:
    """``[section]`` then ``key = <JSON value>`` lines: TOML for the values settings hold."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {orjson.dumps(value).decode()}")
        lines.append("")
    return "\n".join(lines).rstrip()
