"""`imgfleet work`: one worker, until SIGTERM (``workers.runtime`` supervises it).

Exit codes (common.errors.ExitCode): 0 drained on SIGTERM or --until-idle, 1 unrecoverable
(broker gone past worker.broker_give_up_s, model or decode pool failed), 2 configuration,
130 SIGINT (after draining like SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import TYPE_CHECKING, Any

from common.errors import ExitCode, UnrecoverableError
from imgfleet.cli.output import print_json
from imgfleet.cli.parser import subcommand

if TYPE_CHECKING:
    from common.config import Settings


def register(sub: Any) -> None:
    work = subcommand(sub, "work", handler=_cmd_work, help="run a worker until SIGTERM")
    work.add_argument("--worker-id", default=None, help="default: HOST-PID")
    work.add_argument("--until-idle", action="store_true", help="exit once the queue is drained")
    work.add_argument("--json", action="store_true", help="print final stats as JSON")


def _cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from common.observability.logging import get_logger
    from imgfleet.factories import run_worker

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
        print_json(stats.as_dict())
    return ExitCode.INTERRUPTED if stats.stopped_by == "SIGINT" else ExitCode.OK
