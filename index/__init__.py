"""Vector index: shard routing, durable vector segments, FAISS generations, search.

Workers append vectors to per-shard segments (``index.segments``); a build turns the segments
into an immutable generation of FAISS shards (``index.build``); ``index.publish`` catches it
up with what landed meanwhile (``index.apply``) and publishes it by writing the manifest
last (``index.manifest``); searchers serve exactly one published generation at a time
(``index.search``).

Layers; each imports only the ones before it:

- formats and pure policy: ``routing``, ``npz``, ``segments``, ``shardfiles``,
  ``manifest``, ``runs``, ``records`` (record resolution), ``params`` (index choice),
  ``faiss_io`` (FAISS in and out of storage);
- the read path: ``reader`` (the one revision-aware shard cache), ``search``, ``known``;
- operations on published generations: ``generations`` (status, rollback, prune) and
  ``evaluation`` (recall against exact search, also used to tune a build);
- the write path: ``training``, ``shardset``, ``build``, ``apply``, and ``publish``, the
  only module that knows both the build and live apply.

This package depends on ``common`` only: never torch, never a broker.
"""
