"""`imgfleet demo`: the whole pipeline on a synthetic catalogue (``imgfleet.demo.run``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgfleet.cli.output import print_json
from imgfleet.cli.parser import non_negative_int, positive_int, subcommand

if TYPE_CHECKING:
    from common.config import Settings


def register(sub: Any) -> None:
    demo = subcommand(
        sub,
        "demo",
        handler=_cmd_demo,
        help="run the whole pipeline on a synthetic catalogue (no servers needed)",
        description="Generate a synthetic catalogue, serve it over loopback HTTP, publish it "
        "to the local broker, run a worker until drained, build the index and report.",
    )
    demo.add_argument(
        "--items", type=positive_int, default=200, help="catalogue items (default 200)"
    )
    demo.add_argument("--workdir", type=Path, default=Path("imgfleet-demo"))
    demo.add_argument("--seed", type=non_negative_int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON last")


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from imgfleet.demo.run import render_summary, run_demo

    summary = asyncio.run(run_demo(settings, args.workdir, args.items, seed=args.seed))
    print(render_summary(summary))
    if args.json:
        print_json(summary.as_dict())
    return 0 if summary.accounted else 1
