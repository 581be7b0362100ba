"""Operations on published generations: status, rollback, prune.

Rollback flips ``current_generation`` to a kept older generation (compare-and-swap, like
every manifest write); live apply then keeps that generation current with CMS changes,
while the rolled-back run's records stay out of it (see ``index.apply``).

Prune keeps the newest ``keep_generations`` generations, any younger than ``keep_days``,
and always the current one. It drops the others from the manifest first, then deletes
their files, then files of kept generations that no manifest entry names any more (older
revisions, leftovers of crashed applies and builds). Files of a generation newer than
every manifest entry belong to a build in progress and are never touched; within a kept
generation only revisions older than the shard's current one are removed, so an apply
writing the next revision is safe. With ``segments=True`` it also deletes segments that
no kept generation can need: older than every kept generation's run.

A generation's catalogue state (``index.lineage``) says whether another may replace it:
``check_replacement`` refuses a build older in catalogue state than the serving generation,
or of another catalogue, unless forced; a rollback is allowed but names what it undoes.

Recall evaluation of a published generation is ``index.evaluation``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import ExitCode, OperatorError
from common.observability.logging import get_logger
from common.storage.base import Storage
from index.lineage import CatalogueState, ReplacementProblem, replacement_problem
from index.manifest import (
    GenerationInfo,
    Manifest,
    key_revision,
    load_versioned,
    update_manifest,
)
from index.runs import RunInfo, RunNotFoundError, list_run_ids, read_run
from index.segments import list_segments, segment_time_ns

GENERATIONS_PREFIX = "generations/"


class GenerationError(OperatorError):
    """No generation is published, or the one asked for is not kept."""

    exit_code = ExitCode.FAILED


def _update_manifest(storage: Storage, change: Callable[[Manifest], Manifest]) -> Manifest:
    """Apply ``change(manifest) -> manifest`` with compare-and-swap, retried on conflict."""

    def published(manifest: Manifest | None) -> Manifest:
        if manifest is None:
            raise GenerationError("no index generation has been published yet")
        return change(manifest)

    return update_manifest(storage, published)


def status(storage: Storage) -> dict[str, Any] | None:
    manifest = load_versioned(storage).manifest
    if manifest is None:
        return None
    return {
        "current_generation": manifest.current_generation,
        "serial": manifest.serial,
        "generations": [_generation_summary(g, manifest) for g in manifest.generations],
    }


def _generation_summary(g: GenerationInfo, manifest: Manifest) -> dict[str, Any]:
    return {
        "generation": g.generation,
        "current": g.generation == manifest.current_generation,
        "run_id": g.run_id,
        "created_at_s": round(g.created_at_s, 3),
        "updated_at_s": round(g.updated_at_s, 3),
        "n_shards": g.n_shards,
        "dim": g.dim,
        "model_id": g.model_id,
        "vectors": g.total_vectors,
        "segments_applied": g.segments_applied_count,
        "shards": [
            {
                "shard": s.shard,
                "revision": s.revision,
                "vectors": s.vectors,
                "factory": s.params.get("factory"),
                "nprobe": s.params.get("nprobe"),
                "recall_at_10": s.recall_at_10,
                "eval_queries": s.eval_queries,
                "delta_rows": s.delta_rows,
                "tombstones": s.tombstones,
            }
            for s in g.shards
        ],
    }


def generation_state(storage: Storage, gen: GenerationInfo) -> CatalogueState:
    """The catalogue state of a published generation (its run file says, for manifests
    written before the generation recorded it)."""
    catalogue, as_of_s = gen.catalogue, gen.catalogue_as_of_s
    if as_of_s is None and gen.run_id is not None:
        try:
            run = read_run(storage, gen.run_id)
        except RunNotFoundError:
            pass  # unknown: never refuses
        else:
            catalogue, as_of_s = run.catalogue or None, run.started_at_s
    return CatalogueState(gen.run_id, catalogue, as_of_s, gen.generation)


def build_state(storage: Storage, run: RunInfo | None) -> CatalogueState:
    """The catalogue state of a generation built from ``run`` (None: a full replay, which
    holds every run's records: as new as the newest run, of no one catalogue)."""
    if run is not None:
        return CatalogueState(run.run_id, run.catalogue or None, run.started_at_s)
    starts = []
    for run_id in list_run_ids(storage):
        try:
            starts.append(read_run(storage, run_id).started_at_s)
        except RunNotFoundError:
            continue  # a broken run file holds no catalogue time
    return CatalogueState(None, None, max(starts) if starts else None)


def check_replacement(
    storage: Storage, candidate: CatalogueState, *, force: bool
) -> ReplacementProblem | None:
    """Raise ``SupersededError`` / ``OtherCatalogueError`` if ``candidate`` would undo the
    serving generation's catalogue state; with ``force``, return what it undoes instead."""
    manifest = load_versioned(storage).manifest
    if manifest is None:
        return None
    problem = replacement_problem(generation_state(storage, manifest.current()), candidate)
    if problem is not None and not force:
        raise problem.refusal()
    return problem


@dataclass(frozen=True)
class RollbackResult:
    generation: int  # serving now
    replaced: int  # serving before
    undoes: str | None  # what serving ``generation`` undoes of ``replaced``, or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "current_generation": self.generation,
            "replaced": self.replaced,
            "undoes": self.undoes,
        }


def rollback(storage: Storage, to_generation: int | None = None) -> RollbackResult:
    """Serve ``to_generation`` (default: the newest kept one older than current).

    Allowed whatever the catalogue states, but what it undoes is logged and returned: a
    target older in catalogue state than the serving generation serves its older
    catalogue again (the newer runs' deletes and bumps stay undone, as live apply applies
    no other run's records), while CMS changes are kept: live apply applies to it every
    CMS segment it has not applied, those made while the newer generation served included.
    """
    seen: list[RollbackResult] = []

    def change(manifest: Manifest) -> Manifest:
        target = to_generation
        if target is None:
            older = [
                g.generation
                for g in manifest.generations
                if g.generation < manifest.current_generation
            ]
            if not older:
                raise GenerationError("no older generation is kept to roll back to")
            target = max(older)
        if not manifest.has(target):
            kept = [g.generation for g in manifest.generations]
            raise GenerationError(f"generation {target} is not kept (kept: {kept})")
        current = manifest.current()
        problem = replacement_problem(
            generation_state(storage, current), generation_state(storage, manifest.get(target))
        )
        seen[:] = [RollbackResult(target, current.generation, problem.text if problem else None)]
        return manifest.model_copy(update={"current_generation": target})

    _update_manifest(storage, change)
    result = seen[0]
    log = get_logger("index.generations")
    if result.undoes:
        log.warning("rolled back to an older catalogue state", **result.as_dict())
    else:
        log.info("rolled_back", **result.as_dict())
    return result


@dataclass
class PruneReport:
    dropped_generations: list[int] = field(default_factory=list)
    kept_generations: list[int] = field(default_factory=list)
    deleted_files: int = 0
    deleted_segments: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kept(manifest: Manifest, keep_generations: int, keep_days: float, now_s: float) -> set[int]:
    newest = sorted((g.generation for g in manifest.generations), reverse=True)
    kept = set(newest[:keep_generations]) | {manifest.current_generation}
    kept |= {
        g.generation for g in manifest.generations if now_s - g.created_at_s <= keep_days * 86_400
    }
    return kept


def _generation_of_key(key: str) -> int | None:
    part = key[len(GENERATIONS_PREFIX) :].split("/", 1)[0]
    return int(part) if part.isdigit() else None


def prune(
    storage: Storage,
    *,
    keep_generations: int,
    keep_days: float,
    segments: bool = False,
    dry_run: bool = False,
    now_s: float | None = None,
) -> PruneReport:
    now_s = time.time() if now_s is None else now_s
    report = PruneReport(dry_run=dry_run)
    manifest = load_versioned(storage).manifest
    if manifest is None:
        return report
    kept = _kept(manifest, keep_generations, keep_days, now_s)
    report.dropped_generations = sorted(
        g.generation for g in manifest.generations if g.generation not in kept
    )
    if not dry_run and report.dropped_generations:
        manifest = _update_manifest(
            storage,
            lambda m: m.model_copy(
                update={
                    "generations": [
                        g
                        for g in m.generations
                        if g.generation in _kept(m, keep_generations, keep_days, now_s)
                    ]
                }
            ),
        )
    report.kept_generations = sorted(g.generation for g in manifest.generations)
    latest = max(g.generation for g in manifest.generations)
    by_generation = {g.generation: g for g in manifest.generations}

    doomed: list[str] = []
    for key in storage.list(GENERATIONS_PREFIX):
        number = _generation_of_key(key)
        if number is None or number > latest:
            continue  # a build in progress writes generation latest + 1
        info = by_generation.get(number)
        if info is None or number in report.dropped_generations:
            doomed.append(key)
            continue
        if key in info.files():
            continue
        shard = _shard_of_file(key)
        if (
            shard is not None
            and shard < info.n_shards
            and key_revision(key) < info.shards[shard].revision
        ):
            doomed.append(key)
    report.deleted_files = len(doomed)

    doomed_segments: list[str] = []
    if segments:
        doomed_segments = _unneeded_segments(storage, manifest)
    report.deleted_segments = len(doomed_segments)
    if not dry_run:
        for key in [*doomed, *doomed_segments]:
            storage.delete(key)
    get_logger("index.generations").info("pruned", **report.as_dict())
    return report


def _shard_of_file(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    if not name.startswith("shard-"):
        return None
    digits = name[len("shard-") : len("shard-") + 4]
    return int(digits) if digits.isdigit() else None


def _unneeded_segments(storage: Storage, manifest: Manifest) -> list[str]:
    """Segments older than the start of every kept generation's run (none for a generation
    built by full replay: it may need to be rebuilt from everything)."""
    floors = []
    for g in manifest.generations:
        if g.run_id is None:
            return []
        floors.append(min(read_run(storage, g.run_id).earliest_segment_ns, g.applied_through_ns))
    floor_ns = min(floors)
    return [k for k in list_segments(storage) if segment_time_ns(k) < floor_ns]
