"""`imgfleet produce catalogue SOURCE`: the nightly catalogue run.

Exit codes: 0 published (or a dry run finished); 1 the run could not finish (broker
unreachable or refusing the credentials, storage or catalogue unreadable, a publish not
confirmed): what was published stays published, resume with ``--resume RUN_ID``;
2 usage (a run id that exists, nothing to resume, an unknown format, configuration);
3 the mass-delete guard stopped the run before its deletes (resume it with
``--allow-mass-delete`` or ``--no-deletes``); 4 the run id exists already (without
``--resume``) or the run is published already: nothing was published.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from common.config import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MASS_DELETE = 3
EXIT_RUN_EXISTS = 4

# Fault injection for the crash tests: SIGKILL this process right after the broker
# confirmed the batch that brings the run's confirmed jobs to at least this many, before
# any checkpoint records them.
KILL_AFTER_JOBS_ENV = "IMGFLEET_FAULT_KILL_AFTER_CONFIRMED_JOBS"


def register(sub: Any, subcommand: Any) -> None:
    produce = subcommand(sub, "produce", help="publish jobs")
    produce_sub = produce.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cat = subcommand(
        produce_sub,
        "catalogue",
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
        "--max-rate", type=float, help="jobs per second (default: producer.max_rate_per_s)"
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


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    with _metrics_listener(settings):
        return asyncio.run(_cmd_produce(args, settings))


@contextlib.contextmanager
def _metrics_listener(settings: Settings) -> Iterator[None]:
    """Serve the producer's metrics (`imgfleet_producer_*`) on metrics.port for the run.

    A nightly run is a batch job: a taken port costs it its metrics, not the run.
    """
    from prometheus_client import start_http_server

    from common.observability.logging import get_logger

    m = settings.metrics
    if not m.enabled:
        yield
        return
    try:
        server, thread = start_http_server(m.port, addr=m.host)
    except OSError as exc:
        get_logger("producer").warning(
            "metrics listener not started", host=m.host, port=m.port, error=str(exc)
        )
        yield
        return
    port = int(server.server_address[1])
    if m.port_file:
        from pathlib import Path

        from common.observability.ops_http import write_port_file

        write_port_file(Path(m.port_file), port)
    get_logger("producer").info("metrics listening", host=m.host, port=port, path="/metrics")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int) -> int:
    print(f"imgfleet: {message}", file=sys.stderr)
    return code


class IndexRunRegistry:
    """``producers.nightly.run_record.RunRegistry`` over the index's run files (``index.runs``)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def load(self, run_id: str) -> Any:
        from index.runs import read_run, run_key

        if not self.storage.exists(run_key(run_id)):
            return None
        return _record_of(read_run(self.storage, run_id))

    def save(self, record: Any) -> None:
        from index.runs import RunInfo, write_run

        write_run(
            self.storage,
            RunInfo(
                run_id=record.run_id,
                source=record.source,
                expected_jobs=record.expected_jobs,
                started_at_s=record.started_at_s,
                catalogue=record.catalogue,
                state=record.state,
                published_jobs=record.published_jobs,
                deleted_jobs=record.deleted_jobs,
                rejected_rows=record.rejected_rows,
                duplicate_images=record.duplicate_images,
                finished_at_s=record.finished_at_s,
            ),
        )

    def last_published(self, catalogue: str, *, exclude_run_id: str) -> Any:
        from index.runs import RUN_PUBLISHED, list_runs

        runs = [
            r
            for r in list_runs(self.storage)
            if r.catalogue == catalogue and r.state == RUN_PUBLISHED and r.run_id != exclude_run_id
        ]
        return _record_of(runs[-1]) if runs else None


def _record_of(info: Any) -> Any:
    from producers.nightly.run_record import RunRecord

    return RunRecord(
        run_id=info.run_id,
        source=info.source,
        catalogue=info.catalogue,
        state=info.state,
        started_at_s=info.started_at_s,
        expected_jobs=info.expected_jobs,
        published_jobs=info.published_jobs,
        deleted_jobs=info.deleted_jobs,
        rejected_rows=info.rejected_rows,
        duplicate_images=info.duplicate_images,
        finished_at_s=info.finished_at_s,
    )


@contextlib.contextmanager
def _client_libraries_quiet() -> Iterator[None]:
    """The client libraries log each failed connect attempt as an error of their own; the
    adapter retries and this command reports the outcome in one line, so they are muted
    while connecting."""
    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika", "kafka")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _kill_hook() -> Any:
    raw = os.environ.get(KILL_AFTER_JOBS_ENV)
    if not raw:
        return None
    limit = int(raw)
    confirmed = [0]

    def after_confirm(jobs: list[Any]) -> None:
        confirmed[0] += len(jobs)
        if confirmed[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_confirm


def _run_id(args: argparse.Namespace) -> str:
    from index.runs import check_run_id

    if args.resume and args.run_id and args.resume != args.run_id:
        raise ValueError("--run-id and --resume name different runs")
    return check_run_id(args.resume or args.run_id or f"run-{uuid.uuid4().hex[:12]}")


async def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from common.errors import ConfigError, ImgfleetError, TransientError
    from common.schema import Lane
    from imgfleet.factories import make_broker, make_storage
    from producers.catalogue.reader import (
        CatalogueError,
        ColumnMapping,
        open_catalogue,
        s3_client_from_config,
    )
    from producers.catalogue.sources import is_s3_url
    from producers.nightly.deletes import MassDeleteError
    from producers.nightly.run import (
        CatalogueRun,
        RunConflictError,
        RunExistsError,
        RunOptions,
        dry_run,
    )

    p = settings.producer
    try:
        run_id = _run_id(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    options = RunOptions(
        run_id=run_id,
        source=args.path,
        catalogue=p.catalogue_name,
        lane=Lane(args.lane),
        batch_size=p.batch_size,
        in_flight=p.publish_in_flight,
        checkpoint_interval_s=p.checkpoint_interval_s,
        progress_interval_s=p.progress_interval_s,
        max_rate_per_s=p.max_rate_per_s if args.max_rate is None else args.max_rate,
        delete_missing=p.delete_missing and not args.no_deletes,
        max_delete_fraction=p.max_delete_fraction,
        allow_mass_delete=args.allow_mass_delete,
        resume=bool(args.resume),
        rejects_path=args.rejects,
    )
    storage = make_storage(settings)
    registry = IndexRunRegistry(storage)
    s3_client = s3_client_from_config(settings.storage) if is_s3_url(args.path) else None
    try:
        catalogue = open_catalogue(
            args.path, ColumnMapping.from_config(p), s3_client=s3_client, format=args.format
        )
    except (CatalogueError, TransientError) as exc:
        return _fail(str(exc), EXIT_FAILED)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)

    with catalogue:

        def open_source() -> Any:
            return contextlib.nullcontext(catalogue)

        if args.dry_run:
            report, deletes = await dry_run(
                open_source, options, storage=storage, registry=registry
            )
            _print_report(report.as_dict() | deletes, report.rejects, args.json)
            return EXIT_OK

        broker = make_broker(settings)
        try:
            with _client_libraries_quiet():
                await broker.connect()
        except (ConfigError, TransientError) as exc:
            return _fail(f"cannot connect to the broker: {exc}", EXIT_FAILED)
        try:
            report = await CatalogueRun(
                options,
                broker=broker,
                storage=storage,
                registry=registry,
                on_confirmed=_kill_hook(),
            ).run(open_source)
        except RunExistsError as exc:
            return _fail(str(exc), EXIT_RUN_EXISTS)
        except RunConflictError as exc:
            return _fail(str(exc), EXIT_USAGE)
        except MassDeleteError as exc:
            return _fail(str(exc), EXIT_MASS_DELETE)
        except (ImgfleetError, OSError) as exc:
            return _fail(
                f"run {run_id!r} stopped: {exc}. What was confirmed stays published; "
                f"continue with --resume {run_id}",
                EXIT_FAILED,
            )
        finally:
            with contextlib.suppress(Exception):
                await broker.close()
    _print_report(report.as_dict(), report.rejects, args.json)
    return EXIT_OK


def _print_report(summary: dict[str, Any], rejects: list[Any], as_json: bool) -> None:
    if as_json:
        _print_json(summary)
        return
    for key, value in summary.items():
        print(f"{key:<20}{value}")
    for reject in rejects[:20]:
        print(f"  line {reject.line}: {reject.reason}")
