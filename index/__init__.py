"""Vector index: shard routing, durable vector segments, FAISS generations, search.

Workers append vectors to per-shard segments (``index.segments``); a build turns the segments
into an immutable generation of FAISS shards (``index.build``) and publishes it by writing the
manifest last (``index.manifest``); searchers serve exactly one published generation at a time
(``index.search``).

This package depends on ``common`` only: never torch, never a broker.
"""
