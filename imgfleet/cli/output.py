"""How commands print: one JSON document per line, or aligned ``key  value`` rows.

``--json`` output is one compact JSON object (or list) per line on stdout, flushed at once
so a pipe sees each line when it is written (``status --watch --json``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def print_json(obj: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def print_fields(fields: Mapping[str, Any], *, width: int) -> None:
    """One ``key value`` row per field, the values starting at column ``width``."""
    for key, value in fields.items():
        print(f"{key:<{width}}{value}")


def print_result(result: Mapping[str, Any], as_json: bool, *, width: int) -> None:
    """``--json``: the result as one JSON line; otherwise its fields as rows."""
    if as_json:
        print_json(result)
        return
    print_fields(result, width=width)


def error(message: str) -> None:
    """A one-line ``imgfleet: ...`` message on stderr (what a command could not do)."""
    print(f"imgfleet: {message}", file=sys.stderr)
