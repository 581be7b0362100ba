"""A small HTTP search endpoint over the serving generation (`imgfleet serve search`).

    GET  /healthz                      -> {"generation", "vectors", "serial"}
    GET  /search?item=ID&k=10          -> similar items to an item (its own images as queries)
    POST /search  {"vector": [...], "k": 10, "exclude_item_ids": [...]}
    POST /search/image?k=10  (body: image bytes) -> embedded with the worker's model

Answers are ``{"generation": N, "hits": [{"item_id", "image_id", "score"}]}``. The searcher
re-reads the manifest every ``index.reload_interval_s`` in the background and swaps the new
state in whole, so a request sees one generation. FAISS releases the GIL, so searches run
in worker threads and the event loop stays responsive.

`imgfleet serve search` also starts the ops listener (``metrics.host:metrics.port``):
``imgfleet_index_generation`` and ``imgfleet_index_shard_vectors`` of the generation it
serves, ``/healthz`` failing when the event loop stops beating, ``/readyz`` once a
generation is loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from common.config import Settings
from common.errors import JobFailure
from common.observability.health import Health
from common.observability.logging import get_logger
from common.observability.metrics import default_metrics
from common.observability.ops_http import serving_ops
from imgfleet.factories import (
    configure_faiss_threads,
    embed_one,
    make_embedder,
    make_storage,
    ops_listen,
)
from index.search import Hit, Searcher

if TYPE_CHECKING:
    from workers.embed.types import Embedder

MAX_K = 1000
MAX_BODY_BYTES = 32 * 2**20

_SEARCHER = web.AppKey("searcher", Searcher)
_EMBED = web.AppKey("embed", object)


def _hits(hits: list[Hit]) -> list[dict[str, Any]]:
    return [
        {"item_id": h.item_id, "image_id": h.image_id, "score": round(h.score, 6)} for h in hits
    ]


def _k(raw: Any) -> int:
    try:
        k = int(raw)
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text="k must be an integer") from exc
    if not 1 <= k <= MAX_K:
        raise web.HTTPBadRequest(text=f"k must be in [1, {MAX_K}]")
    return k


async def healthz(request: web.Request) -> web.Response:
    searcher = request.app[_SEARCHER]
    return web.json_response(
        {"generation": searcher.generation, "vectors": searcher.count()},
        status=200 if searcher.generation is not None else 503,
    )


async def search_item(request: web.Request) -> web.Response:
    searcher = request.app[_SEARCHER]
    item = request.query.get("item")
    if not item:
        raise web.HTTPBadRequest(text="give ?item=ID, or POST a vector")
    k = _k(request.query.get("k", 10))
    hits = await asyncio.to_thread(searcher.search_by_item, item, k)
    if hits is None:
        raise web.HTTPNotFound(text=f"item {item!r} is not in generation {searcher.generation}")
    return web.json_response({"generation": searcher.generation, "hits": _hits(hits)})


async def search_vector(request: web.Request) -> web.Response:
    searcher = request.app[_SEARCHER]
    try:
        body = await request.json()
        vector = np.asarray(body["vector"], dtype=np.float32)
        exclude = {str(i) for i in body.get("exclude_item_ids", [])}
    except (ValueError, KeyError, TypeError) as exc:
        raise web.HTTPBadRequest(text=f"expected JSON {{'vector': [...]}}: {exc}") from exc
    k = _k(body.get("k", 10))
    try:
        (hits,) = await asyncio.to_thread(
            searcher.search, vector.reshape(1, -1), k, True, [exclude]
        )
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    return web.json_response({"generation": searcher.generation, "hits": _hits(hits)})


async def search_image(request: web.Request) -> web.Response:
    searcher = request.app[_SEARCHER]
    embed = request.app[_EMBED]
    k = _k(request.query.get("k", 10))
    data = await request.read()
    if not data:
        raise web.HTTPBadRequest(text="POST the image bytes as the body")
    try:
        vector: np.ndarray = await asyncio.to_thread(embed, data)  # type: ignore[arg-type]
    except JobFailure as exc:
        raise web.HTTPBadRequest(text=f"{exc.reason.value}: {exc}") from exc
    (hits,) = await asyncio.to_thread(searcher.search, np.asarray(vector)[None, :], k)
    return web.json_response({"generation": searcher.generation, "hits": _hits(hits)})


def _image_embedder(settings: Settings) -> Callable[[bytes], np.ndarray]:
    """Decode + embed with the worker's own code and model, loaded on first use."""
    loaded: list[Embedder] = []

    def model() -> Embedder:
        if not loaded:
            loaded.append(make_embedder(settings))
        return loaded[0]

    def embed(data: bytes) -> np.ndarray:
        return embed_one(settings, data, model)

    return embed


def make_app(
    searcher: Searcher,
    *,
    reload_interval_s: float,
    embed: Any = None,
    on_reload: Callable[[Searcher], None] | None = None,
    health: Health | None = None,
) -> web.Application:
    """``on_reload(searcher)`` runs at start and after every reload (gauges, readiness);
    with ``health`` the event loop beats its heartbeat."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_SEARCHER] = searcher
    app[_EMBED] = embed
    log = get_logger("search_server")

    async def reloader(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(reload_interval_s)
                try:
                    if await asyncio.to_thread(searcher.reload_if_changed):
                        log.info("reloaded", generation=searcher.generation)
                        if on_reload is not None:
                            on_reload(searcher)
                except Exception as exc:  # keep serving what is loaded
                    log.error("reload_failed", error=str(exc))

        if on_reload is not None:
            on_reload(searcher)
        tasks = [asyncio.create_task(loop())]
        if health is not None:
            tasks.append(asyncio.create_task(health.beat_event_loop()))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.append(reloader)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/search", search_item)
    app.router.add_post("/search", search_vector)
    if embed is not None:
        app.router.add_post("/search/image", search_image)
    return app


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    configure_faiss_threads(settings)
    searcher = Searcher(make_storage(settings))
    metrics = default_metrics()
    health = Health(settings.metrics.stall_after_s)

    def served(current: Searcher) -> None:
        info = current.info
        if info is not None:
            metrics.set_index_shards(info.generation, {s.shard: s.vectors for s in info.shards})
        health.set_ready("generation", current.generation is not None)

    app = make_app(
        searcher,
        reload_interval_s=settings.index.reload_interval_s,
        embed=_image_embedder(settings),
        on_reload=served,
        health=health,
    )
    host = host or settings.index.serve_host
    port = settings.index.serve_port if port is None else port
    get_logger("search_server").info(
        "serving", host=host, port=port, generation=searcher.generation
    )
    with serving_ops(metrics, health, ops_listen(settings), process="search"):
        web.run_app(app, host=host, port=port, print=None)
    return 0
