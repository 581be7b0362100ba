"""Ops commands: `imgfleet status`, `imgfleet dlq list|show`, `imgfleet requeue`, `purge`.

The 3 a.m. path: `status` (is it moving? what failed?), `dlq list` (why?), fix the cause,
`requeue --reason R` (try those again), `purge` what can never work. OpsBroker figures come
through the OpsBroker roles, run figures from index run accounting; both are composed
here, the one place that knows about brokers and the index at once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from common.errors import ConfigError, ExitCode, TransientError
from imgfleet.cli.output import error, print_json
from imgfleet.cli.parser import non_negative_int, positive_float, positive_int, subcommand
from imgfleet.cli.state import read_known_run
from producers.ops.filters import check_reason, format_duration, parse_age

if TYPE_CHECKING:
    from common.brokers.base import DeadLetter, OpsBroker
    from common.config import Settings
    from producers.ops.dead_letters import MoveReport
    from producers.ops.filters import LetterFilter
    from producers.ops.run_status import RunFigures, RunSample

# More letters than this to move asks for confirmation (--yes skips; no terminal refuses).
CONFIRM_ABOVE = 1000
ALL_LETTERS = 10**12
DEFAULT_WATCH_S = 5.0
# How long a command that only reads the broker (status, dlq, a dry run) keeps trying to
# connect, at most: an operator asking during an outage gets the answer (and the run
# figures, which come from storage) in seconds, not after broker.*.connect_timeout_s
# (10 s by default, the right patience for a worker starting beside its broker). A
# reachable broker answers in milliseconds on a LAN; 3 s leaves room for a TLS handshake.
READ_ONLY_CONNECT_TIMEOUT_S = 3.0


# -- arguments ----------------------------------------------------------------------------


def _age(text: str) -> str:
    try:
        parse_age(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _reason(text: str) -> str:
    try:
        return check_reason(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which dead letters")
    group.add_argument(
        "--reason",
        action="append",
        default=[],
        type=_reason,
        metavar="R",
        help="reason code (repeatable): http_404, timeout, ... (see `imgfleet dlq list`)",
    )
    group.add_argument("--run", dest="run_id", metavar="RUN_ID", help="jobs of this run")
    group.add_argument(
        "--older-than", type=_age, metavar="AGE", help="failed at least AGE ago (90s, 30m, 2h, 1d)"
    )
    group.add_argument("--newer-than", type=_age, metavar="AGE", help="failed at most AGE ago")
    group.add_argument(
        "--item",
        dest="items",
        action="append",
        default=[],
        metavar="ID",
        help="item id (repeatable)",
    )
    group.add_argument("--items-file", type=Path, metavar="PATH", help="item ids, one per line")


def _add_move_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter (no filter)")
    parser.add_argument(
        "--dry-run", action="store_true", help=f"show what would be {verb}d; move nothing"
    )
    parser.add_argument(
        "--yes", action="store_true", help=f"do not ask before moving more than {CONFIRM_ABOVE}"
    )
    parser.add_argument("--limit", type=positive_int, metavar="N", help=f"{verb} at most N letters")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub: Any) -> None:
    status = subcommand(
        sub,
        "status",
        handler=_cmd_status,
        log_level="error",
        help="queue figures per lane and progress of the newest runs",
        description="Queue figures per lane (ready, in flight, consumers, lag) and, per "
        "nightly run, expected / indexed / failed / remaining jobs, failures by reason, "
        "rate and ETA.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object per sample")
    status.add_argument(
        "--watch",
        nargs="?",
        type=positive_float,
        const=DEFAULT_WATCH_S,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; the rate "
        "is then measured between samples",
    )
    status.add_argument("--run", dest="run_id", metavar="RUN_ID", help="only this run")
    status.add_argument(
        "--runs", type=non_negative_int, default=5, metavar="N", help="newest N runs (5)"
    )

    dlq = subcommand(sub, "dlq", help="dead-lettered jobs")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = subcommand(
        dlq_sub,
        "list",
        handler=_cmd_dlq_list,
        log_level="error",
        help="dead-lettered jobs grouped by reason",
    )
    _add_filters(dlq_list)
    order = dlq_list.add_mutually_exclusive_group()
    order.add_argument("--newest", dest="newest_first", action="store_true", default=True)
    order.add_argument("--oldest", dest="newest_first", action="store_false")
    dlq_list.add_argument(
        "--limit", type=non_negative_int, default=20, help="letters listed (default 20)"
    )
    dlq_list.add_argument("--json", action="store_true")
    dlq_show = subcommand(
        dlq_sub, "show", handler=_cmd_dlq_show, log_level="error", help="one dead letter in full"
    )
    dlq_show.add_argument("ident", metavar="ID", help="DLQ id, job id or item id")
    dlq_show.add_argument("--json", action="store_true")

    requeue = subcommand(
        sub,
        "requeue",
        handler=_cmd_move,
        log_level="error",
        help="put dead-lettered jobs back on the live lane",
        description="Republish matching dead-lettered jobs on the live lane with a fresh set "
        "of attempts (their failure kept in the job's history), then remove them from the "
        "DLQ. Letters whose body is not a job stay; remove them with `purge`.",
    )
    _add_filters(requeue)
    _add_move_flags(requeue, "requeue")

    purge = subcommand(
        sub,
        "purge",
        handler=_cmd_move,
        log_level="error",
        help="remove dead letters for good (archived to a JSONL file first)",
    )
    _add_filters(purge)
    _add_move_flags(purge, "purge")
    purge.add_argument(
        "--archive",
        type=Path,
        metavar="PATH",
        help="JSONL file the purged letters are written to first "
        "(default ./imgfleet-purged-<timestamp>.jsonl)",
    )
    purge.add_argument("--no-archive", action="store_true", help="purge without an archive")


# -- handlers -----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_client_libraries(args)
    try:
        return _run(_status(args, _read_only(settings)))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how --watch ends


def _cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_client_libraries(args)
    flt = _filter_from(args)
    if flt is None:
        return ExitCode.CONFIG
    return _run(_dlq_list(args, _read_only(settings), flt))


def _cmd_dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_client_libraries(args)
    return _run(_dlq_show(args, _read_only(settings)))


def _cmd_move(args: argparse.Namespace, settings: Settings) -> int:
    """`requeue` and `purge` (``args.command`` says which)."""
    _quiet_client_libraries(args)
    flt = _filter_from(args)
    if flt is None:
        return ExitCode.CONFIG
    if flt.is_empty and not args.all:
        error(
            f"{args.command} needs a filter (--reason, --run, --older-than, --newer-than, "
            "--item, --items-file) or --all"
        )
        return ExitCode.CONFIG
    if args.command == "purge" and args.archive and args.no_archive:
        error("--archive and --no-archive contradict each other")
        return ExitCode.CONFIG
    return _run(_move(args, _read_only(settings) if args.dry_run else settings, flt))


def _run(main: Coroutine[Any, Any, int]) -> int:
    import asyncio  # here, not at import: `--help` and usage errors stay cheap

    return asyncio.run(main)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(function, *args)


def _quiet_client_libraries(args: argparse.Namespace) -> None:
    """Ops commands report for themselves: no connection chatter around their output.

    They log errors only (``log_level="error"`` at registration), and the client
    libraries' own error lines for each failed connect attempt are muted too, so a broker
    that cannot be reached ends in one `imgfleet: ...` line rather than a page of
    retries; `--log-level info` or `-v` brings the logs back.
    """
    if args.log_level is not None or args.verbose:
        return  # an explicit level wins
    import logging

    for name in ("aiormq", "aio_pika", "kafka"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _read_only(settings: Settings) -> Settings:
    """The settings for a command that only reads the broker: it gives up connecting
    after READ_ONLY_CONNECT_TIMEOUT_S at most."""
    b = settings.broker

    def sooner(section: Any) -> Any:
        timeout_s = min(section.connect_timeout_s, READ_ONLY_CONNECT_TIMEOUT_S)
        return section.model_copy(update={"connect_timeout_s": timeout_s})

    broker = b.model_copy(update={"rabbitmq": sooner(b.rabbitmq), "kafka": sooner(b.kafka)})
    return settings.model_copy(update={"broker": broker})


def _filter_from(args: argparse.Namespace) -> LetterFilter | None:
    from producers.ops.filters import LetterFilter

    try:
        return LetterFilter.build(
            now_s=time.time(),
            reasons=args.reason,
            run_id=args.run_id,
            older_than=args.older_than,
            newer_than=args.newer_than,
            item_ids=args.items,
            items_file=args.items_file,
        )
    except ConfigError as exc:
        error(str(exc))
        return None


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[OpsBroker | None]:
    """The connected broker; None where the local queue was never created (nothing was
    ever published, so there is nothing to read, and reading must not create it)."""
    from imgfleet.factories import make_broker, missing_local_queue

    if missing_local_queue(settings) is not None:
        yield None
        return
    broker = make_broker(settings)
    try:
        await broker.connect()
        yield broker
    finally:
        await broker.close()


async def _all_letters(broker: OpsBroker | None) -> list[DeadLetter]:
    return [] if broker is None else await broker.dead_letters(limit=ALL_LETTERS)


# -- dlq list / show ----------------------------------------------------------------------


async def _dlq_list(args: argparse.Namespace, settings: Settings, flt: LetterFilter) -> int:
    from producers.ops.dead_letters import group_by_reason, letter_summary, ordered

    async with _connected(settings) as broker:
        letters = [d for d in await _all_letters(broker) if flt.matches(d)]
    now_s = flt.now_s
    groups = group_by_reason(letters)
    rows = [
        letter_summary(d, now_s)
        for d in ordered(letters, newest_first=args.newest_first)[: max(args.limit, 0)]
    ]
    if args.json:
        print_json(
            {
                "total": len(letters),
                "filter": flt.as_dict(),
                "counts": {g.reason: g.count for g in groups},
                "by_reason": [g.as_dict(now_s) for g in groups],
                "jobs": rows,
            }
        )
        return 0
    print(f"{len(letters)} dead-lettered jobs ({flt.describe()})")
    if broker is None:
        print(_no_queue_yet(settings))
    if not letters:
        return 0
    print(f"  {'reason':<20}{'jobs':>8}  {'newest':>8}  {'oldest':>8}  example error")
    for g in groups:
        print(
            f"  {g.reason:<20}{g.count:>8}  {_ago(now_s, g.newest_failed_at_s):>8}  "
            f"{_ago(now_s, g.oldest_failed_at_s):>8}  {_clip(g.example_error, 60)}"
        )
    if rows:
        which = "newest" if args.newest_first else "oldest"
        print(f"\n{which} {len(rows)} (imgfleet dlq show ID for one in full):")
        for row in rows:
            print(
                f"  {row['dlq_id']:<34} {_ago(now_s, row['failed_at_s']):>7}  "
                f"{row['reason']:<16} run={row['run_id'] or '-'} item={row['item_id'] or '-'} "
                f"attempts={row['attempts']}  {_clip(row['error'], 70)}"
            )
    print("\nrequeue with: imgfleet requeue --reason R [--run RUN_ID] [--dry-run]")
    return 0


async def _dlq_show(args: argparse.Namespace, settings: Settings) -> int:
    from producers.ops.dead_letters import find_letters, letter_detail

    async with _connected(settings) as broker:
        found = find_letters(await _all_letters(broker), args.ident)
    if not found:
        if broker is None:
            error(f"no dead letter has the id {args.ident!r}: {_no_queue_yet(settings)}")
        else:
            error(f"no dead letter has the DLQ id, job id or item id {args.ident!r}")
        return 1
    now_s = time.time()
    details = [letter_detail(d, now_s) for d in found]
    if args.json:
        print_json({"letters": details})
        return 0
    for i, detail in enumerate(details):
        if i:
            print()
        _print_detail(detail, now_s)
    return 0


def _print_detail(d: dict[str, Any], now_s: float) -> None:
    job = d.get("job") or {}
    fields = [
        ("dlq id", d["dlq_id"]),
        ("job id", d["job_id"] or "-"),
        ("reason", d["reason"]),
        ("error", d["error"]),
        ("attempts", d["attempts"]),
        ("failed", f"{_when(d['failed_at_s'])} ({_ago(now_s, d['failed_at_s'])} ago)"),
        ("run", d["run_id"] or "-"),
        ("item", f"{d['item_id'] or '-'}" + (f" image {job['image_key']}" if job else "")),
        ("url", d["url"] or "-"),
    ]
    if job:
        fields += [("version", job["version"]), ("op", job["op"]), ("lane", job["lane"])]
    fields.append(("requeueable", "yes" if d["requeueable"] else "no (the body is not a job)"))
    for name, value in fields:
        print(f"{name:<12}{value}")
    history = d["history"]
    print(f"{'history':<12}{len(history)} earlier failure(s)")
    for n, h in enumerate(history, 1):
        print(
            f"  {n}. {h['reason']} after {h['attempts']} attempt(s), failed "
            f"{_when(h['failed_at_s'])}, requeued {_when(h['requeued_at_s'])}: "
            f"{_clip(h['error'], 100)}"
        )
    body = d.get("body")
    print(f"{'body':<12}{body if body is not None else '(base64) ' + d['body_b64']}")


# -- requeue / purge ----------------------------------------------------------------------


def confirm(
    verb: str,
    count: int,
    what: str,
    *,
    yes: bool,
    threshold: int = CONFIRM_ABOVE,
    stdin: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> bool:
    """Whether to go ahead: small moves and --yes go; larger ones ask on a terminal."""
    if count <= threshold or yes:
        return True
    stdin = stdin or sys.stdin
    stderr = stderr or sys.stderr
    if not stdin.isatty():
        print(
            f"imgfleet: {verb} would move {count} dead letters ({what}), more than "
            f"{threshold}; pass --yes to confirm (there is no terminal to ask on)",
            file=stderr,
        )
        return False
    print(f"{verb} {count} dead letters ({what})? type yes to go on: ", end="", file=stderr)
    stderr.flush()
    return stdin.readline().strip().lower() in ("y", "yes")


async def _move(args: argparse.Namespace, settings: Settings, flt: LetterFilter) -> int:
    from producers.ops.dead_letters import (
        LetterArchive,
        plan,
        purge_dead_letters,
        requeue_dead_letters,
    )

    verb = args.command
    async with _connected(settings) as broker:
        planned = plan(await _all_letters(broker), flt, verb, args.limit)
        if broker is None or args.dry_run or planned.total == 0:
            _print_move(planned, flt, args.json)
            if broker is None and not args.json:
                print(_no_queue_yet(settings))
            return 0
        if not confirm(verb, planned.total, flt.describe(), yes=args.yes, threshold=CONFIRM_ABOVE):
            return 1
        # Never more than was shown and confirmed: letters that fail meanwhile wait.
        report: MoveReport
        if verb == "requeue":
            report = await requeue_dead_letters(broker, flt, now_s=time.time(), limit=planned.total)
        else:
            archive = None if args.no_archive else LetterArchive(args.archive or _archive_path())
            report = await purge_dead_letters(broker, flt, archive=archive, limit=planned.total)
    if verb == "requeue" and not report.not_requeueable:
        report.not_requeueable = planned.not_requeueable
    _print_move(report, flt, args.json)
    return 0


def _no_queue_yet(settings: Settings) -> str:
    return (
        f"nothing yet: there is no local queue at {settings.broker.local.path} "
        "(a producer or `imgfleet demo` creates it)"
    )


def _archive_path() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"imgfleet-purged-{stamp}.jsonl")


def _print_move(report: MoveReport, flt: LetterFilter, as_json: bool) -> None:
    if as_json:
        print_json({**report.as_dict(), "filter": flt.as_dict()})
        return
    verb = report.action
    done = {"requeue": "requeued", "purge": "purged"}[verb]
    if report.dry_run:
        head = f"dry run: would {verb} {report.total} dead letters ({flt.describe()})"
        if verb == "requeue":
            head += " onto the live lane"
        print(head + "; nothing was moved")
    elif verb == "requeue":
        print(f"{done} {report.total} jobs onto the live lane ({flt.describe()})")
    else:
        print(f"{done} {report.total} dead letters ({flt.describe()})")
    for reason, n in report.moved.most_common():
        print(f"  {reason:<20}{n:>8}")
    if report.archive:
        print(f"archived to {report.archive}")
    skipped = sum(report.not_requeueable.values())
    if skipped:
        reasons = " ".join(f"--reason {r}" for r in sorted(report.not_requeueable))
        print(
            f"{skipped} matching letters are not jobs and stay in the DLQ "
            f"({_counts(report.not_requeueable)}); remove them with: imgfleet purge {reasons}"
        )


# -- status -------------------------------------------------------------------------------


class _BrokerLink:
    """The status command's broker connection: opened when a sample needs it, dropped
    when the broker goes away, and the reason it is not there (``problem``).

    Run figures come from storage, so a broker outage costs a sample its queue and
    dead-letter figures only; --watch reconnects on the next sample.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: OpsBroker | None = None
        self.problem: str | None = None

    async def read(self) -> tuple[list[Any], list[DeadLetter]] | None:
        """(lane figures, dead letters); None while the broker cannot be reached."""
        from imgfleet.factories import make_broker, missing_local_queue

        if missing_local_queue(self.settings) is not None:
            self.problem = None
            return [], []  # nothing was ever published: no lanes, no letters
        try:
            if self.broker is None:
                broker = make_broker(self.settings)
                try:
                    await broker.connect()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await broker.close()
                    raise
                self.broker = broker
            lanes = await self.broker.lane_stats()
            letters = await self.broker.dead_letters(limit=ALL_LETTERS)
        except (TransientError, OSError) as exc:
            self.problem = exc.message if isinstance(exc, TransientError) else str(exc)
            await self.close()
            return None
        self.problem = None
        return lanes, letters

    async def close(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.close()


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import existing_storage

    storage = existing_storage(settings)  # reading creates nothing
    if args.run_id:
        read_known_run(storage, args.run_id)  # an unknown id: one line naming the known ones
    previous: dict[str, RunSample] = {}
    redraw = args.watch is not None and not args.json and sys.stdout.isatty()
    link = _BrokerLink(settings)
    reported: str | None = None
    try:
        while True:
            snapshot, previous = await status_snapshot(link, storage, settings, args, previous)
            if args.json:
                print_json(snapshot)
            else:
                if redraw:
                    sys.stdout.write("\x1b[H\x1b[2J")
                _print_status(snapshot, watching=args.watch is not None)
                sys.stdout.flush()
            if link.problem and link.problem != reported:
                error(f"broker unreachable, so no queue or dead-letter figures: {link.problem}")
            reported = link.problem
            if args.watch is None:
                return ExitCode.FAILED if link.problem else ExitCode.OK
            await _sleep(max(args.watch, 0.5))
    finally:
        await link.close()


async def status_snapshot(
    link: _BrokerLink,
    storage: Any,
    settings: Settings,
    args: argparse.Namespace,
    previous: dict[str, RunSample],
) -> tuple[dict[str, Any], dict[str, RunSample]]:
    """One sample of queue and run figures, and the run samples the next one compares to.

    ``previous`` holds the last sample's run samples (empty: rates since each run's start).
    Without the broker the run figures still come (from storage), with their failure
    counts, remaining jobs, rate and ETA unknown (None), and ``previous`` is kept.
    """
    from producers.ops.dead_letters import group_by_reason

    at_s = time.time()
    read = await link.read()
    lanes, letters = read if read is not None else ([], None)
    runs = []
    if storage is not None:
        runs = await _in_thread(_run_figures, storage, args, letters or [], at_s, previous)
    b = settings.broker
    snapshot = {
        "at_s": round(at_s, 3),
        "broker": {
            "kind": b.kind,
            "name_prefix": b.name_prefix,
            "reachable": read is not None,
            "error": link.problem,
        },
        "lanes": [asdict(lane) for lane in lanes],
        "dead_letters": None
        if letters is None
        else {
            "total": len(letters),
            "by_reason": {g.reason: g.count for g in group_by_reason(letters)},
        },
        "runs": [fig.as_dict() if letters is not None else _without_failures(fig) for fig in runs],
    }
    if letters is None:
        return snapshot, previous
    return snapshot, {fig.run_id: fig.sample() for fig in runs}


def _without_failures(figure: RunFigures) -> dict[str, Any]:
    """A run's figures when the dead letters could not be read: what depends on them
    (failed, remaining, rate, ETA) is unknown rather than a wrong number."""
    unknown = ("failed", "remaining", "failures_by_reason", "rate_per_s", "eta_s")
    return {**figure.as_dict(), **dict.fromkeys(unknown), "rate_source": None}


def _run_figures(
    storage: Any,
    args: argparse.Namespace,
    letters: list[DeadLetter],
    at_s: float,
    previous: dict[str, RunSample],
) -> list[RunFigures]:
    from index.runs import account_run, list_runs, read_finalization, read_run
    from producers.ops.dead_letters import RunDeadLetters, dead_letters_by_run
    from producers.ops.run_status import RunFigures, run_state

    if args.run_id:
        runs = [read_run(storage, args.run_id)]
    else:
        runs = list(reversed(list_runs(storage)))[: max(args.runs, 0)]
    by_run = dead_letters_by_run(letters)
    figures = []
    for run in runs:
        dead = by_run.get(run.run_id, RunDeadLetters())
        accounting = account_run(
            storage,
            run,
            dead_lettered_jobs=dead.unreadable,
            dead_lettered_image_ids=dead.image_ids,
        )
        state = run_state(
            getattr(run, "state", None),
            finalized=read_finalization(storage, run.run_id) is not None,
            expected=run.expected_jobs,
        )
        expected = accounting.expected_jobs
        if state == "publishing":
            # The final count comes when the producer is done; until then, what it has
            # published so far is the best lower bound.
            so_far = getattr(run, "published_jobs", 0) + getattr(run, "deleted_jobs", 0)
            expected = max(expected, so_far)
        figure = RunFigures(
            run_id=run.run_id,
            state=str(state),
            expected=expected,
            expected_final=state != "publishing",
            indexed=accounting.indexed_jobs,
            failed=accounting.dead_lettered_jobs,
            started_at_s=run.started_at_s,
            at_s=at_s,
            failures_by_reason=dead.reasons(),
        )
        figures.append(figure.with_rate(previous.get(run.run_id)))
    return figures


def _print_status(s: dict[str, Any], *, watching: bool) -> None:
    broker = s["broker"]
    print(f"imgfleet status  {_when(s['at_s'])}  broker {broker['kind']} ({broker['name_prefix']})")
    print()
    dead = s["dead_letters"]
    if not broker["reachable"]:
        print("  queue: the broker is unreachable (no lane or dead-letter figures)")
    elif not s["lanes"]:
        print("  queue: nothing yet (nothing was ever published to this broker)")
    else:
        print(f"  {'lane':<8}{'ready':>10}{'in flight':>11}{'consumers':>11}{'lag':>10}  unit")
    for lane in s["lanes"]:
        print(
            f"  {lane['lane']:<8}{lane['ready']:>10}{_dash(lane['in_flight']):>11}"
            f"{_dash(lane['consumers']):>11}{_dash(lane['lag']):>10}  {lane['unit']}"
        )
    if dead is not None:
        print()
        print(
            f"dead letters: {dead['total']}"
            + (f"  ({_counts(dead['by_reason'])})" if dead["total"] else "")
        )
    runs = s["runs"]
    if not runs:
        print("\nno nightly runs recorded")
        if dead and dead["total"]:
            print("why they failed: imgfleet dlq list; after a fix: imgfleet requeue --reason R")
        return
    print()
    print(
        f"  {'run':<24}{'state':<12}{'age':>9}{'expected':>10}{'indexed':>10}{'failed':>9}"
        f"{'remaining':>11}{'rate/s':>10}  eta"
    )
    sources = set()
    for r in runs:
        rate = "-" if r["rate_per_s"] is None else f"{r['rate_per_s']:.1f}"
        # A run still publishing is not done at 0 remaining: its expected count grows, or
        # its producer stopped (a truncated file) and the run waits for --resume.
        eta = (
            "-"
            if r["eta_s"] is None or (r["remaining"] == 0 and not r["expected_final"])
            else ("done" if r["remaining"] == 0 else format_duration(r["eta_s"]))
        )
        failed, remaining = _dash(r["failed"], "?"), _dash(r["remaining"], "?")
        started = _ago(s["at_s"], r["started_at_s"])
        expected = f"{r['expected']}{'' if r['expected_final'] else '+'}"
        print(
            f"  {r['run_id']:<24}{r['state']:<12}{started:>9}{expected:>10}"
            f"{r['indexed']:>10}{failed:>9}{remaining:>11}{rate:>10}  {eta}"
        )
        if r["failures_by_reason"]:
            print(f"      failures: {_counts(r['failures_by_reason'])}")
        if r["rate_source"]:
            sources.add((r["rate_source"], r["rate_window_s"]))
    print()
    if any(not r["expected_final"] for r in runs):
        print(
            "expected+: the run is still publishing, or its producer stopped; continue a "
            "stopped one with: imgfleet produce catalogue SOURCE --resume RUN"
        )
    if dead is None:
        print("failed, remaining, rate and ETA need the dead letters: back with the broker")
    elif any(src == "between_samples" for src, _ in sources):
        windows = sorted({w for src, w in sources if w})
        print(
            "rate: settled jobs per second between the last two samples "
            f"({format_duration(windows[-1])} apart)"
        )
    else:
        hint = "" if watching else "; --watch measures the current rate"
        print(f"rate: average settled jobs per second since each run started{hint}")
    if dead and dead["total"]:
        print("why they failed: imgfleet dlq list; after a fix: imgfleet requeue --reason R")


# -- formatting ---------------------------------------------------------------------------


def _dash(value: Any, unknown: str = "-") -> str:
    return unknown if value is None else str(value)


def _counts(counts: Any) -> str:
    items = counts.most_common() if hasattr(counts, "most_common") else counts.items()
    return ", ".join(f"{reason} {n}" for reason, n in items)


def _clip(text: str, n: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def _ago(now_s: float, at_s: float) -> str:
    return format_duration(now_s - at_s) if at_s > 0 else "?"


def _when(at_s: float) -> str:
    if not at_s:
        return "-"
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
