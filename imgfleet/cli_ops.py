"""Ops commands: `imgfleet status`, `imgfleet dlq list|show`, `imgfleet requeue`, `purge`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from typing import Any

import orjson

from common.config import Settings
from common.errors import ImgfleetError


def register(sub: Any, subcommand: Any) -> None:
    dlq = subcommand(sub, "dlq", help="dead-lettered jobs")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = subcommand(dlq_sub, "list", help="dead-lettered jobs by reason")
    dlq_list.add_argument("--reason", help="only this reason code")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_list.add_argument("--json", action="store_true")


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_cmd_dlq(args, settings))


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


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
