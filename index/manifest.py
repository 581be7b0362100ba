"""The manifest: which generation serves, which files make up each shard, what is applied.

Publishing is one write of ``manifest.json``, done after every file it names exists: a
build or apply that dies earlier leaves the manifest, and so what searchers serve,
untouched. Builds and live apply may run at the same time, so every write is a
compare-and-swap against the manifest that was read (``common.storage.cas``): a writer that lost
the race re-reads and redoes its small change.

The manifest stays small however long the index lives: old generations are pruned by
policy, and the record of applied segments is a timestamp watermark plus the few keys
above it (segment keys start with their flush time, see ``index.segments``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import ExitCode, OperatorError
from common.storage.base import Storage
from common.storage.cas import read_versioned, write_if_unchanged
from index.segments import segment_time_ns

MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT_VERSION = 2
# A lost compare-and-swap is re-read and redone this many times, this far apart: writers
# change small parts of the manifest, so a conflict clears on the next attempt.
CAS_ATTEMPTS = 20
CAS_RETRY_S = 0.05


class ManifestConflictError(OperatorError):
    """Another writer moved the manifest on; the build may simply be run again."""

    exit_code = ExitCode.FAILED


def generation_prefix(generation: int) -> str:
    return f"generations/{generation:06d}/"


def _shard_stem(generation: int, shard: int, revision: int, kind: str, tag: str) -> str:
    # Revisions > 0 carry a random tag: two appliers racing on one revision number write
    # different keys, so the loser can never overwrite the files the winner published.
    suffix = "" if revision == 0 else f".{kind}{revision:06d}" + (f"-{tag}" if tag else "")
    return f"{generation_prefix(generation)}shard-{shard:04d}{suffix}"


def shard_index_key(generation: int, shard: int, revision: int = 0, tag: str = "") -> str:
    return _shard_stem(generation, shard, revision, "r", tag) + ".faiss"


def shard_items_key(generation: int, shard: int, revision: int = 0, tag: str = "") -> str:
    return _shard_stem(generation, shard, revision, "c", tag) + ".items.npz"


def shard_vectors_key(generation: int, shard: int, revision: int = 0, tag: str = "") -> str:
    return _shard_stem(generation, shard, revision, "c", tag) + ".vectors.npy"


def shard_delta_key(generation: int, shard: int, revision: int, tag: str = "") -> str:
    return _shard_stem(generation, shard, revision, "r", tag) + ".delta.npz"


def key_revision(key: str) -> int:
    """The revision number in a shard file key (0 for the files a build wrote)."""
    name = key.rsplit("/", 1)[-1]
    parts = name.split(".")
    if len(parts) > 2 and parts[1][:1] in ("r", "c") and parts[1][1:7].isdigit():
        return int(parts[1][1:7])
    return 0


class ShardInfo(BaseModel):
    """One shard of a generation at its latest revision (0 = as built)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard: int = Field(ge=0)
    revision: int = Field(default=0, ge=0)
    index_key: str
    items_key: str
    vectors_key: str | None
    delta_key: str | None = None
    vectors: int = Field(ge=0)  # live vectors in the FAISS index
    tombstones: int = Field(default=0, ge=0)  # deleted ids remembered for ordering
    delta_rows: int = Field(default=0, ge=0)
    base_rows: int = Field(default=0, ge=0)
    changed_since_train: int = Field(default=0, ge=0)  # live adds + removes
    params: dict[str, Any] = Field(default_factory=dict)
    recall_at_10: float | None = None
    eval_queries: int = 0
    build_s: float = 0.0


class GenerationInfo(BaseModel):
    """One generation; ``shards[k]`` is shard ``k``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(ge=1)
    created_at_s: float
    updated_at_s: float = 0.0
    n_shards: int = Field(ge=1)
    dim: int = Field(ge=1)
    model_id: str | None
    run_id: str | None = None
    # Its catalogue state (``index.lineage``): the run's catalogue_name and start; None in
    # manifests written before they were recorded (then the run file says), and for a
    # full replay's catalogue (it holds every catalogue's records).
    catalogue: str | None = None
    catalogue_as_of_s: float | None = None
    shards: list[ShardInfo]
    # Every segment with a key timestamp <= applied_through_ns is accounted for (replayed
    # by the build, applied live, or older than the run the generation was built from);
    # of the newer ones, exactly those in applied_after are.
    applied_through_ns: int = 0
    applied_after: list[str] = Field(default_factory=list)
    segments_applied_count: int = 0
    index_params: dict[str, Any] = Field(default_factory=dict)

    @property
    def shard_keys(self) -> list[str]:
        return [s.index_key for s in self.shards]

    @property
    def item_keys(self) -> list[str]:
        return [s.items_key for s in self.shards]

    @property
    def vector_counts(self) -> list[int]:
        return [s.vectors for s in self.shards]

    @property
    def total_vectors(self) -> int:
        return sum(self.vector_counts)

    def is_applied(self, segment_key: str) -> bool:
        if segment_time_ns(segment_key) <= self.applied_through_ns:
            return True
        return segment_key in set(self.applied_after)

    def pending(self, segment_keys: list[str]) -> list[str]:
        """The keys of ``segment_keys`` this generation has not applied, in order."""
        done = set(self.applied_after)
        return [
            k
            for k in segment_keys
            if segment_time_ns(k) > self.applied_through_ns and k not in done
        ]

    def files(self) -> set[str]:
        keys: set[str] = set()
        for s in self.shards:
            keys.update(k for k in (s.index_key, s.items_key, s.vectors_key, s.delta_key) if k)
        return keys


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = MANIFEST_FORMAT_VERSION
    serial: int = 0  # +1 on every write: a cheap "did anything change" for readers
    current_generation: int
    generations: list[GenerationInfo]

    def current(self) -> GenerationInfo:
        return self.get(self.current_generation)

    def get(self, generation: int) -> GenerationInfo:
        for info in self.generations:
            if info.generation == generation:
                return info
        raise KeyError(f"manifest has no generation {generation}")

    def has(self, generation: int) -> bool:
        return any(g.generation == generation for g in self.generations)

    @property
    def latest_generation(self) -> int:
        return max(g.generation for g in self.generations)


@dataclass(frozen=True)
class VersionedManifest:
    """A manifest with the token a compare-and-swap write must match."""

    manifest: Manifest | None
    token: str | None


def decode_manifest(data: bytes) -> Manifest:
    return Manifest.model_validate_json(data)


def load_manifest(storage: Storage) -> Manifest | None:
    """The published manifest, or None before the first generation is published."""
    return load_versioned(storage).manifest


def load_versioned(storage: Storage) -> VersionedManifest:
    data, token = read_versioned(storage, MANIFEST_KEY)
    return VersionedManifest(manifest=None if data is None else decode_manifest(data), token=token)


def write_manifest(storage: Storage, manifest: Manifest, expected_token: str | None) -> bool:
    """Publish if the stored manifest is still the one read with ``expected_token``.

    Call only once every file the manifest names is in storage. False: someone else
    wrote first; re-read and retry.
    """
    bumped = manifest.model_copy(update={"serial": manifest.serial + 1})
    data = bumped.model_dump_json(indent=1).encode("utf-8")
    return write_if_unchanged(storage, MANIFEST_KEY, data, expected_token)


def update_manifest(
    storage: Storage,
    change: Callable[[Manifest | None], Manifest],
    *,
    conflict: str = "the manifest kept changing under us",
) -> Manifest:
    """Write ``change(manifest)`` by compare-and-swap, re-reading and redoing it on conflict.

    ``change`` may raise to refuse (it sees ``None`` before the first publish). A change
    that changes nothing is not written. ``conflict`` is the error's message when every
    attempt lost the race.
    """
    for _ in range(CAS_ATTEMPTS):
        versioned = load_versioned(storage)
        updated = change(versioned.manifest)
        if updated == versioned.manifest:
            return updated
        if write_manifest(storage, updated, versioned.token):
            return updated
        time.sleep(CAS_RETRY_S)
    raise ManifestConflictError(conflict)


def with_generation(previous: Manifest | None, info: GenerationInfo) -> Manifest:
    """``previous`` plus ``info``, made current."""
    kept = [] if previous is None else list(previous.generations)
    kept = [g for g in kept if g.generation != info.generation]
    return Manifest(
        serial=0 if previous is None else previous.serial,
        current_generation=info.generation,
        generations=sorted([*kept, info], key=lambda g: g.generation),
    )


def with_updated_generation(manifest: Manifest, info: GenerationInfo) -> Manifest:
    """``manifest`` with generation ``info.generation`` replaced; current unchanged."""
    return manifest.model_copy(
        update={
            "generations": [
                info if g.generation == info.generation else g for g in manifest.generations
            ]
        }
    )
