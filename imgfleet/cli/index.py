"""`imgfleet index build|apply|finalize|status|rollback|prune|eval`.

The index package never talks to a broker or a model; what it needs from them (the
dead letters of a run, an embedded query image) is fetched here, in the composition root.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from imgfleet.cli.output import print_json, print_result
from imgfleet.cli.parser import non_negative_float, positive_float, positive_int, subcommand
from imgfleet.cli.state import NO_GENERATION, NOTHING_TO_BUILD, read_known_run

if TYPE_CHECKING:
    from common.config import Settings
    from common.storage.base import Storage
    from index.manifest import GenerationInfo


def register(sub: Any) -> None:
    index = subcommand(sub, "index", help="build, update and inspect the FAISS index")
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = subcommand(
        actions, "build", handler=_cmd_build_explained, help="build a new generation and publish it"
    )
    build.add_argument("--run", dest="run_id", help="build from this nightly run's segments")
    build.add_argument(
        "--no-catch-up",
        action="store_true",
        help="publish without first applying segments that landed during the build",
    )
    build.add_argument("--force", action="store_true", help=_FORCE_OLDER)

    apply = subcommand(
        actions,
        "apply",
        handler=_cmd_apply,
        help="apply new segments to the serving generation",
    )
    apply.add_argument("--watch", action="store_true", help="keep applying until interrupted")
    apply.add_argument(
        "--interval-s", type=positive_float, help="seconds between cycles with --watch"
    )

    finalize = subcommand(
        actions,
        "finalize",
        handler=_cmd_finalize,
        help="publish a nightly run once every job is accounted for",
    )
    finalize.add_argument("--run", dest="run_id", required=True)
    finalize.add_argument(
        "--force",
        action="store_true",
        help="finalise even with jobs not accounted for; also " + _FORCE_OLDER,
    )

    status = subcommand(
        actions,
        "status",
        handler=_cmd_status,
        log_level="warning",
        help="generations, shards, vector counts, parameters, recall",
    )

    rollback = subcommand(
        actions,
        "rollback",
        handler=_cmd_rollback,
        help="serve another kept generation (warns when it undoes a newer catalogue state)",
    )
    rollback.add_argument("--to", type=positive_int, dest="to_generation", help="default: previous")

    prune = subcommand(
        actions,
        "prune",
        handler=_cmd_prune,
        help="delete old generations and unreferenced files",
    )
    prune.add_argument("--keep", type=positive_int, help="newest generations to keep")
    prune.add_argument(
        "--keep-days", type=non_negative_float, help="also keep generations younger than this"
    )
    prune.add_argument(
        "--segments", action="store_true", help="also delete segments no kept generation needs"
    )
    prune.add_argument("--dry-run", action="store_true")

    evaluate = subcommand(
        actions,
        "eval",
        handler=_cmd_eval,
        log_level="warning",
        help="recall@k against exact search on a sample",
    )
    evaluate.add_argument("--generation", type=positive_int)
    evaluate.add_argument("-k", type=positive_int, default=10)
    evaluate.add_argument("--queries", type=positive_int, default=500)
    evaluate.add_argument("--nprobe", type=positive_int, help="override the tuned nprobe")

    for parser in (build, apply, finalize, rollback, prune, evaluate):
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    status.add_argument("--json", action="store_true")


_FORCE_OLDER = (
    "publish even when the serving generation holds a newer run of the catalogue (exit 5) "
    "or another catalogue (exit 6): a deliberate rollback; CMS changes are kept"
)


def _warn_undone(undoes: str | None) -> None:
    if undoes:
        print(f"imgfleet: warning: {undoes}", file=sys.stderr)


def _print(result: dict[str, Any], as_json: bool) -> None:
    print_result(result, as_json, width=22)


def _generation_summary(info: Any) -> dict[str, Any]:
    return {
        "generation": info.generation,
        "run_id": info.run_id,
        "n_shards": info.n_shards,
        "dim": info.dim,
        "model_id": info.model_id,
        "vectors": info.total_vectors,
        "vectors_per_shard": info.vector_counts,
        "factories": sorted({s.params.get("factory") for s in info.shards}),
        "recall_at_10": [s.recall_at_10 for s in info.shards],
        "segments_applied": info.segments_applied_count,
        "created_at_s": round(info.created_at_s, 3),
    }


def _cmd_build_explained(args: argparse.Namespace, settings: Settings) -> int:
    """`index build`, saying "nothing to build" where no segment was ever written."""
    from imgfleet.factories import existing_storage
    from index.records import IndexBuildError
    from index.segments import list_segments

    try:
        return _cmd_build(args, settings)
    except IndexBuildError as exc:
        storage = existing_storage(settings)
        if storage is None or not list_segments(storage):
            raise IndexBuildError(NOTHING_TO_BUILD) from exc
        raise


def _build(
    storage: Storage, settings: Settings, *, run_id: str | None, force: bool, catch_up: bool = True
) -> GenerationInfo:
    """Build and publish a generation with ``[index]``'s shards, policy and grace."""
    from imgfleet.factories import configure_faiss_threads, policy_from_config
    from index.publish import build_generation

    configure_faiss_threads(settings)
    c = settings.index
    return build_generation(
        storage,
        c.n_shards,
        run_id=run_id,
        policy=policy_from_config(c),
        grace_s=c.grace_s,
        catch_up=catch_up,
        force=force,
    )


def _cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import make_storage
    from index.generations import build_state, check_replacement

    storage = make_storage(settings)
    run = None if args.run_id is None else read_known_run(storage, args.run_id)
    undone = check_replacement(storage, build_state(storage, run), force=args.force)
    undoes = undone.text if undone else None
    info = _build(
        storage, settings, run_id=args.run_id, force=args.force, catch_up=not args.no_catch_up
    )
    _warn_undone(undoes)
    _print({**_generation_summary(info), "undoes": undoes}, args.json)
    return 0


def _cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import configure_faiss_threads, make_applier

    if args.watch:
        return _watch_apply(args, settings)
    configure_faiss_threads(settings)
    _print(make_applier(settings).apply_once().as_dict(), args.json)
    return 0


def _watch_apply(args: argparse.Namespace, settings: Settings) -> int:
    """The live apply loop, with the ops listener; SIGTERM ends it after the cycle.

    /healthz answers while the process runs (a retrain may legitimately take long, so no
    stall check); /readyz is 200 once a cycle succeeded and until one fails.
    """
    import signal
    import threading

    from common.observability.health import Health
    from common.observability.metrics import default_metrics
    from common.observability.ops_http import serving_ops
    from imgfleet.factories import configure_faiss_threads, make_applier, ops_listen

    health = Health(settings.metrics.stall_after_s)
    configure_faiss_threads(settings)
    applier = make_applier(settings, health=health)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serving_ops(default_metrics(), health, ops_listen(settings), process="index-apply"):
        applier.watch(args.interval_s or settings.index.apply_interval_s, stop)
    return 0


async def _dead_letters_of_run(settings: Settings, run_id: str) -> tuple[list[int], int]:
    """(image ids of the run's dead-lettered jobs, letters whose job could not be read)."""
    from imgfleet.factories import read_dead_letters
    from producers.ops.dead_letters import run_dead_letters

    dead = run_dead_letters(await read_dead_letters(settings), run_id)
    return sorted(dead.image_ids), dead.unreadable


def _cmd_finalize(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import make_storage
    from index.generations import build_state, check_replacement
    from index.runs import (
        RunStillPublishingError,
        account_run,
        ensure_published,
        write_finalization,
    )

    storage = make_storage(settings)
    run = read_known_run(storage, args.run_id)
    try:
        ensure_published(run)  # even --force: the expected job count is not known yet
    except RunStillPublishingError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return 1
    # Before the accounting: a superseded run is refused at once (exit 5, not 1), so the
    # nightly script stops instead of waiting hours for a run it must not publish.
    undone = check_replacement(storage, build_state(storage, run), force=args.force)
    undoes = undone.text if undone else None
    import asyncio

    dead_ids, unreadable = asyncio.run(_dead_letters_of_run(settings, args.run_id))
    accounting = account_run(
        storage, run, dead_lettered_jobs=unreadable, dead_lettered_image_ids=dead_ids
    )
    report = accounting.as_dict()
    if not accounting.complete and not args.force:
        report["finalized"] = False
        report["hint"] = "wait for the workers, check `imgfleet dlq list`, or use --force"
        _print(report, args.json)
        if not args.json:
            print(
                f"imgfleet: run {run.run_id!r} is missing {accounting.missing_jobs} jobs; "
                "not finalised (use --force to publish anyway)",
                file=sys.stderr,
            )
        return 1
    info = _build(storage, settings, run_id=run.run_id, force=args.force)
    record = write_finalization(
        storage,
        accounting,
        forced=not accounting.complete,
        generation=info.generation,
        undoes=undoes,
    )
    _warn_undone(undoes)
    _print({**record, "finalized": True}, args.json)
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import existing_storage
    from index.generations import status

    storage = existing_storage(settings)  # reading creates nothing
    result = None if storage is None else status(storage)
    if result is None:
        print(f"imgfleet: {NO_GENERATION}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
        return 0
    print(
        f"current generation {result['current_generation']}  (manifest serial {result['serial']})"
    )
    for g in result["generations"]:
        mark = "*" if g["current"] else " "
        print(
            f"{mark} generation {g['generation']:>4}  run={g['run_id'] or '-'}  "
            f"shards={g['n_shards']}  dim={g['dim']}  vectors={g['vectors']}  "
            f"segments_applied={g['segments_applied']}  model={g['model_id']}"
        )
        for s in g["shards"]:
            print(
                f"      shard {s['shard']:>3}  rev {s['revision']:>4}  vectors {s['vectors']:>9}  "
                f"{s['factory']}  nprobe={s['nprobe']}  recall@10={s['recall_at_10']}  "
                f"delta={s['delta_rows']}  tombstones={s['tombstones']}"
            )
    return 0


def _cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import make_storage
    from index.generations import GenerationError, rollback

    try:
        result = rollback(make_storage(settings), args.to_generation)
    except GenerationError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return 1
    if result.undoes:
        _warn_undone(
            f"{result.undoes}. CMS changes are kept: live apply brings generation "
            f"{result.generation} up to date with them, and with no other run's records"
        )
    _print(result.as_dict(), args.json)
    return 0


def _cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import make_storage
    from index.generations import prune

    c = settings.index
    report = prune(
        make_storage(settings),
        keep_generations=args.keep or c.keep_generations,
        keep_days=c.keep_days if args.keep_days is None else args.keep_days,
        segments=args.segments,
        dry_run=args.dry_run,
    )
    _print(report.as_dict(), args.json)
    return 0


def _cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from imgfleet.factories import configure_faiss_threads, existing_storage
    from index.evaluation import evaluate_generation
    from index.generations import GenerationError

    storage = existing_storage(settings)  # reading creates nothing
    if storage is None:
        print(f"imgfleet: {NO_GENERATION}", file=sys.stderr)
        return 1
    configure_faiss_threads(settings)
    try:
        result = evaluate_generation(
            storage,
            generation=args.generation,
            k=args.k,
            queries=args.queries,
            nprobe=args.nprobe,
        )
    except GenerationError as exc:
        print(f"imgfleet: {exc}", file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0
