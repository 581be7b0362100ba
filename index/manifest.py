"""The manifest: which generation is live and which files and segments make it up.

Publishing a generation is one atomic ``Storage.put`` of ``manifest.json``, done after every
shard file of that generation exists; a build that dies earlier leaves the manifest, and so
what searchers serve, untouched.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.storage import Storage

MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


def generation_prefix(generation: int) -> str:
    return f"generations/{generation:06d}/"


def shard_index_key(generation: int, shard: int) -> str:
    return f"{generation_prefix(generation)}shard-{shard:04d}.faiss"


def shard_items_key(generation: int, shard: int) -> str:
    return f"{generation_prefix(generation)}shard-{shard:04d}.items.npz"


class GenerationInfo(BaseModel):
    """One immutable generation; list index ``k`` of each list is shard ``k``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(ge=1)
    created_at_s: float
    n_shards: int = Field(ge=1)
    dim: int = Field(ge=1)
    model_id: str | None
    shard_keys: list[str]
    item_keys: list[str]
    vector_counts: list[int]
    segments_applied: list[str]
    index_params: dict[str, Any]

    @property
    def total_vectors(self) -> int:
        return sum(self.vector_counts)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = MANIFEST_FORMAT_VERSION
    current_generation: int
    generations: list[GenerationInfo]

    def current(self) -> GenerationInfo:
        return self.get(self.current_generation)

    def get(self, generation: int) -> GenerationInfo:
        for info in self.generations:
            if info.generation == generation:
                return info
        raise KeyError(f"manifest has no generation {generation}")


def load_manifest(storage: Storage) -> Manifest | None:
    """The published manifest, or None before the first generation is published."""
    if not storage.exists(MANIFEST_KEY):
        return None
    return Manifest.model_validate_json(storage.get(MANIFEST_KEY))


def write_manifest(storage: Storage, manifest: Manifest) -> None:
    """Publish. Call only once every file the manifest names is in storage."""
    storage.put(MANIFEST_KEY, manifest.model_dump_json(indent=2).encode("utf-8"))


def with_generation(previous: Manifest | None, info: GenerationInfo) -> Manifest:
    """``previous`` plus ``info``, made current."""
    kept = [] if previous is None else list(previous.generations)
    kept = [g for g in kept if g.generation != info.generation]
    return Manifest(current_generation=info.generation, generations=[*kept, info])
