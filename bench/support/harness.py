"""What the benchmark scripts share: their common flags, their report and the machine figures
(``bench/support/rabbitmq.py``: the RabbitMQ set-up of the queue and producer benchmarks).

Every ``bench/NAME.py`` takes ``--quick`` and ``--json``, prints its figures, and with
``--json`` ends with one line holding one JSON object of the figures and ``ratio``.

Import it after the script has put the repository root first on ``sys.path`` (each
script's first lines), as ``bench.support.harness``: it imports nothing of the project,
since the decode pool's spawned processes re-import the scripts.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Iterable
from typing import Any

import orjson


def bench_parser(
    description: str, *, quick_help: str, json_help: str | None = None
) -> argparse.ArgumentParser:
    """A parser with the two flags every benchmark takes; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help=json_help)
    return parser


def report(result: dict[str, Any], lines: Iterable[str] = (), *, as_json: bool) -> int:
    """Print the figures' lines, then (with ``--json``) ``result`` as the last line; the exit
    status for ``main``."""
    for line in lines:
        print(line)
    if as_json:
        print(orjson.dumps(result).decode())
    return 0


def host_figures() -> dict[str, Any]:
    """``cpus`` and ``machine`` (the architecture), as separate keys."""
    return {"cpus": os.cpu_count(), "machine": platform.machine()}


def machine_summary() -> str:
    """Architecture, CPU count and Python version in one string."""
    return f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}"
