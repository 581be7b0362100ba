"""Build, catch up, publish: how a new generation replaces the serving one.

Generation N+1 is built while N serves (``index.build``). Before it is published, the
segments that landed during the build are applied to it (``index.apply``), so a CMS change
made during the rebuild is in N+1. The manifest is written last, by compare-and-swap; a
crash anywhere before leaves N serving and N+1's files unreferenced (the rerun reuses the
number).

A generation older in catalogue state than the serving one, or of another catalogue, is
refused (``index.lineage``): checked before the build starts, so a refusal costs nothing,
and again inside the compare-and-swap publish, so a newer run published while this one
built still wins. ``force`` publishes it anyway (a deliberate rollback), with a warning
naming what it undoes.

This module is the only one that knows both the build and live apply: neither imports
the other.
"""

from __future__ import annotations

from typing import Any

from common.observability.logging import get_logger
from common.storage.base import Storage
from index.apply import Applier
from index.build import build_unpublished
from index.generations import build_state, check_replacement, generation_state
from index.lineage import CatalogueState, ReplacementProblem, replacement_problem
from index.manifest import GenerationInfo, Manifest, update_manifest, with_generation
from index.params import IndexPolicy
from index.records import DEFAULT_GRACE_S
from index.runs import read_run


def build_generation(
    storage: Storage,
    n_shards: int,
    *,
    run_id: str | None = None,
    policy: IndexPolicy | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    catch_up: bool = True,
    force: bool = False,
    log: Any = None,
) -> GenerationInfo:
    """Build every shard, apply what landed meanwhile, then publish as the next generation.

    Raises ``SupersededError`` / ``OtherCatalogueError`` (before building, or at the
    publish) unless ``force``: see ``index.lineage``.
    """
    policy = policy or IndexPolicy()
    log = log or get_logger("index.build")
    run = None if run_id is None else read_run(storage, run_id)
    check_replacement(storage, build_state(storage, run), force=force)
    info = build_unpublished(
        storage, n_shards, run_id=run_id, policy=policy, grace_s=grace_s, log=log
    )
    if catch_up:
        info = Applier(storage, policy=policy, grace_s=grace_s, log=log).catch_up(info)
    publish_generation(storage, info, force=force, log=log)
    return info


def _state(info: GenerationInfo) -> CatalogueState:
    return CatalogueState(info.run_id, info.catalogue, info.catalogue_as_of_s, info.generation)


def publish_generation(
    storage: Storage, info: GenerationInfo, *, force: bool = False, log: Any = None
) -> None:
    """Make ``info`` current with a compare-and-swap manifest write (retried on conflict).

    Only generations may be added here; a concurrent apply to the old generation changes
    another entry, so re-reading and re-adding is always safe. The catalogue-state check
    runs against the manifest each attempt reads.
    """
    log = log or get_logger("index.publish")
    undone: list[ReplacementProblem] = []

    def change(manifest: Manifest | None) -> Manifest:
        undone.clear()
        if manifest is not None:
            replaced = generation_state(storage, manifest.current())
            problem = replacement_problem(replaced, _state(info))
            if problem is not None and not force:
                raise problem.refusal()
            undone.extend([problem] if problem else [])
        return with_generation(manifest, info)

    update_manifest(
        storage, change, conflict="could not publish: the manifest kept changing under us"
    )
    for problem in undone:
        log.warning(
            "forced publish undoes the serving catalogue state",
            generation=info.generation,
            run_id=info.run_id,
            undoes=problem.text,
        )
    log.info(
        "generation_published",
        generation=info.generation,
        shards=info.n_shards,
        vectors=info.total_vectors,
        segments=info.segments_applied_count,
        run_id=info.run_id,
    )
