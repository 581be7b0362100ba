"""`imgfleet produce catalogue SOURCE`: the nightly catalogue run.

Exit codes: 0 published (or a dry run finished); 1 the run could not finish (broker
unreachable or refusing the credentials, storage or catalogue unreadable, a publish not
confirmed): what was published stays published, resume with ``--resume RUN_ID``;
2 usage (nothing to resume, --run-id and --resume naming different runs, an invalid run
id, an unknown format, configuration); 3 the mass-delete guard stopped the run before its
deletes (resume it with ``--allow-mass-delete`` or ``--no-deletes``); 4 the run id exists
already (without ``--resume``) or the run is published already: nothing was published.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from common.errors import ExitCode
from imgfleet.cli.output import error, print_fields, print_json
from imgfleet.cli.parser import non_negative_float, subcommand

if TYPE_CHECKING:
    from common.config import Settings
    from common.observability.health import Health


def register(sub: Any) -> None:
    produce = subcommand(sub, "produce", help="publish jobs")
    produce_sub = produce.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cat = subcommand(
        produce_sub,
        "catalogue",
        handler=_cmd_catalogue,
        help="publish a catalogue (JSONL, CSV, Parquet; local or s3://; gzip)",
        description="Publish one job per catalogue image, resumably; register the run, "
        "and delete images gone since the last published run of the same catalogue.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cat.add_argument("path", metavar="SOURCE", help="a file path or s3://bucket/key")
    cat.add_argument("--run-id", default=None, help="run id (default: generated)")
    cat.add_argument(
        "--resume", metavar="RUN_ID", help="continue a run that stopped, without republishing"
    )
    cat.add_argument("--lane", choices=["bulk", "live"], default="bulk")
    cat.add_argument("--rejects", help="write rejected rows (JSONL: line, reason, raw) here")
    cat.add_argument("--format", help="jsonl, csv or parquet (default: from the name)")
    cat.add_argument(
        "--max-rate",
        type=non_negative_float,
        help="jobs per second (default: producer.max_rate_per_s; 0: unlimited)",
    )
    cat.add_argument(
        "--no-deletes", action="store_true", help="publish no deletes for images that are gone"
    )
    cat.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="publish deletes even beyond producer.max_delete_fraction",
    )
    cat.add_argument(
        "--dry-run", action="store_true", help="read and check the catalogue, publish nothing"
    )
    cat.add_argument("--json", action="store_true", help="print the report as JSON last")


def _cmd_catalogue(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from common.observability.health import Health
    from common.observability.metrics import ProducerMetrics
    from common.observability.ops_http import serving_ops
    from imgfleet.factories import ops_listen

    metrics = ProducerMetrics().with_process_collectors()
    health = Health(settings.metrics.stall_after_s)
    # A dry run publishes nothing and is over in seconds: nothing to scrape, and no
    # reason to open a port on every interface.
    listen = None if args.dry_run else ops_listen(settings)
    with serving_ops(metrics, health, listen, process="producer", optional=True):
        return asyncio.run(_produce_catalogue(args, settings, metrics, health))


def _fail(message: str, code: ExitCode) -> int:
    error(message)
    return code


@contextlib.contextmanager
def _client_libraries_quiet() -> Iterator[None]:
    """The client libraries log each failed connect attempt as an error of their own; the
    adapter retries and this command reports the outcome in one line, so they are muted
    while connecting."""
    import logging

    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika", "kafka")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run_id(args: argparse.Namespace) -> str:
    import uuid

    from index.runs import check_run_id

    if args.resume and args.run_id and args.resume != args.run_id:
        raise ValueError("--run-id and --resume name different runs")
    return check_run_id(args.resume or args.run_id or f"run-{uuid.uuid4().hex[:12]}")


async def _produce_catalogue(
    args: argparse.Namespace, settings: Settings, metrics: Any, health: Health
) -> int:
    """The run; ``/healthz`` fails if its event loop stops beating for
    ``metrics.stall_after_s``, ``/readyz`` is 200 while the broker is connected."""
    import asyncio

    from common.errors import ConfigError, ImgfleetError, TransientError
    from common.schema import Lane
    from imgfleet.factories import make_broker, make_storage, open_catalogue, run_options
    from imgfleet.run_registry import IndexRunRegistry
    from producers.catalogue.reader import CatalogueError
    from producers.nightly.deletes import MassDeleteError
    from producers.nightly.run import CatalogueRun, RunConflictError, dry_run

    try:
        run_id = _run_id(args)
    except ValueError as exc:
        return _fail(str(exc), ExitCode.CONFIG)
    options = run_options(
        settings,
        run_id=run_id,
        source=args.path,
        lane=Lane(args.lane),
        max_rate_per_s=args.max_rate,
        no_deletes=args.no_deletes,
        allow_mass_delete=args.allow_mass_delete,
        resume=bool(args.resume),
        rejects_path=args.rejects,
    )
    storage = make_storage(settings)
    registry = IndexRunRegistry(storage)
    try:
        catalogue = open_catalogue(settings, args.path, format=args.format)
    except (CatalogueError, TransientError) as exc:
        return _fail(str(exc), ExitCode.FAILED)
    except ValueError as exc:
        return _fail(str(exc), ExitCode.CONFIG)

    with catalogue:

        def open_source() -> Any:
            return contextlib.nullcontext(catalogue)

        if args.dry_run:
            report, deletes = await dry_run(
                open_source, options, storage=storage, registry=registry, metrics=metrics
            )
            _print_report(report.as_dict() | deletes, report.rejects, args.json)
            return ExitCode.OK

        broker = make_broker(settings)
        health.set_ready("broker", False)
        beating = asyncio.create_task(health.beat_event_loop())
        try:
            try:
                with _client_libraries_quiet():
                    await broker.connect()
            except (ConfigError, TransientError) as exc:
                return _fail(f"cannot connect to the broker: {exc}", ExitCode.FAILED)
            health.set_ready("broker", True)
            try:
                report = await CatalogueRun(
                    options, broker=broker, storage=storage, registry=registry, metrics=metrics
                ).run(open_source)
            except (RunConflictError, MassDeleteError) as exc:
                # A run id taken (4), nothing to resume (2), the mass-delete guard (3).
                return _fail(str(exc), exc.exit_code)
            except (ImgfleetError, OSError) as exc:
                return _fail(
                    f"run {run_id!r} stopped: {exc}. What was confirmed stays published; "
                    f"continue with --resume {run_id}",
                    ExitCode.FAILED,
                )
            finally:
                health.set_ready("broker", False)
                with contextlib.suppress(Exception):
                    await broker.close()
        finally:
            beating.cancel()
    _print_report(report.as_dict(), report.rejects, args.json)
    return ExitCode.OK


def _print_report(summary: dict[str, Any], rejects: list[Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    print_fields(summary, width=20)
    for reject in rejects[:20]:
        print(f"  line {reject.line}: {reject.reason}")
