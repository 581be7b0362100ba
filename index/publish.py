"""Build, catch up, publish: how a new generation replaces the serving one.

Generation N+1 is built while N serves (``index.build``). Before it is published, the
segments that landed during the build are applied to it (``index.apply``), so a CMS change
made during the rebuild is in N+1. The manifest is written last, by compare-and-swap; a
crash anywhere before leaves N serving and N+1's files unreferenced (the rerun reuses the
number).

This module is the only one that knows both the build and live apply: neither imports
the other.
"""

from __future__ import annotations

from typing import Any

from common.observability.logging import get_logger
from common.storage.base import Storage
from index.apply import Applier
from index.build import build_unpublished
from index.manifest import GenerationInfo, update_manifest, with_generation
from index.params import IndexPolicy
from index.records import DEFAULT_GRACE_S


def build_generation(
    storage: Storage,
    n_shards: int,
    *,
    run_id: str | None = None,
    policy: IndexPolicy | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    catch_up: bool = True,
    log: Any = None,
) -> GenerationInfo:
    """Build every shard, apply what landed meanwhile, then publish as the next generation."""
    policy = policy or IndexPolicy()
    log = log or get_logger("index.build")
    info = build_unpublished(
        storage, n_shards, run_id=run_id, policy=policy, grace_s=grace_s, log=log
    )
    if catch_up:
        info = Applier(storage, policy=policy, grace_s=grace_s, log=log).catch_up(info)
    publish_generation(storage, info, log=log)
    return info


def publish_generation(storage: Storage, info: GenerationInfo, *, log: Any = None) -> None:
    """Make ``info`` current with a compare-and-swap manifest write (retried on conflict).

    Only generations may be added here; a concurrent apply to the old generation changes
    another entry, so re-reading and re-adding is always safe.
    """
    log = log or get_logger("index.publish")
    update_manifest(
        storage,
        lambda manifest: with_generation(manifest, info),
        conflict="could not publish: the manifest kept changing under us",
    )
    log.info(
        "generation_published",
        generation=info.generation,
        shards=info.n_shards,
        vectors=info.total_vectors,
        segments=info.segments_applied_count,
        run_id=info.run_id,
    )
