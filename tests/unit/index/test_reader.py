"""The revision-aware shard cache: keep what did not move, reload the rest; no cycles."""

from __future__ import annotations

import grimp

from index.manifest import GenerationInfo, ShardInfo
from index.reader import ShardCache, ShardTables
from index.shardfiles import empty_rows


def _shard(shard: int, revision: int = 0) -> ShardInfo:
    return ShardInfo(
        shard=shard,
        revision=revision,
        index_key=f"g/shard-{shard}.r{revision}.faiss",
        items_key=f"g/shard-{shard}.c{revision}.items.npz",
        vectors_key=None,
        vectors=0,
    )


def _generation(generation: int, revisions: list[int]) -> GenerationInfo:
    return GenerationInfo(
        generation=generation,
        created_at_s=0.0,
        n_shards=len(revisions),
        dim=4,
        model_id=None,
        shards=[_shard(k, r) for k, r in enumerate(revisions)],
    )


class _Loads:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, gen: GenerationInfo, info: ShardInfo) -> ShardTables:
        self.calls.append((gen.generation, info.shard, info.revision))
        return ShardTables(info=info, base=empty_rows(gen.dim), delta=empty_rows(gen.dim))


def test_keeps_shards_whose_revision_did_not_move() -> None:
    loads = _Loads()
    cache = ShardCache(loads)
    first = _generation(1, [0, 0, 0])
    kept = [cache.get(first, k) for k in range(3)]
    assert [cache.get(first, k) for k in range(3)] == kept  # no second load
    assert len(loads.calls) == 3

    applied = _generation(1, [0, 1, 0])  # live apply moved shard 1
    cache.retain(applied)
    again = [cache.get(applied, k) for k in range(3)]
    assert again[0] is kept[0] and again[2] is kept[2]
    assert again[1] is not kept[1] and again[1].info.revision == 1
    assert loads.calls[3:] == [(1, 1, 1)]

    rebuilt = _generation(2, [0, 0, 0])  # a new generation is loaded whole
    cache.retain(rebuilt)
    for k in range(3):
        cache.get(rebuilt, k)
    assert loads.calls[4:] == [(2, 0, 0), (2, 1, 0), (2, 2, 0)]


def test_take_leaves_the_cache_until_put_back() -> None:
    loads = _Loads()
    cache = ShardCache(loads)
    gen = _generation(3, [0, 0])
    loaded = cache.get(gen, 0)
    taken = cache.take(gen, 0)
    assert taken is loaded
    assert cache.take(gen, 0) is not loaded  # it was out: loaded again
    changed = ShardTables(info=_shard(0, 1), base=taken.base, delta=taken.delta)
    cache.put(3, changed)
    assert cache.get(_generation(3, [1, 0]), 0) is changed  # its new revision is published
    cache.forget(3)
    cache.get(_generation(3, [1, 0]), 0)
    assert len(loads.calls) == 3


def test_index_has_no_cycles_and_the_read_path_never_imports_the_write_path() -> None:
    graph = grimp.build_graph("index", cache_dir=None)
    assert graph.chain_exists(importer="index.publish", imported="index.apply")  # a real graph
    modules = {m for m in graph.modules if m.startswith("index.")}
    for module in modules:
        for other in graph.find_modules_directly_imported_by(module) & modules:
            assert not graph.chain_exists(importer=other, imported=module), (module, other)
    for reader in ("index.search", "index.known", "index.reader"):
        for writer in ("index.build", "index.apply", "index.publish"):
            assert not graph.chain_exists(importer=reader, imported=writer), (reader, writer)
