"""The CMS intake: item upserts and deletes over HTTP, published to the live lane.

    POST   /v1/items               {"items": [change, ...]}        batch
    PUT    /v1/items/{item_id}     {"image_urls": [...], "version": N}
    DELETE /v1/items/{item_id}?version=N
    GET    /healthz   the process is alive
    GET    /readyz    the broker is connected (503 otherwise, and while shutting down)
    GET    /metrics   Prometheus text format

A request is all or nothing: it is validated whole and nothing is published unless every
change in it is valid. A 202 is sent only after the broker has confirmed every job of the
request (persistent, publisher confirms); a broker that is down or slower than
``cms.publish_timeout_s`` gives 503 with Retry-After and nothing is claimed done. With an
``Idempotency-Key`` the same request sent again is answered from the store without being
published again (see ``producers.cms.idempotency``); job ids derive from the key, so a retry
after a crash between publishing and recording publishes the same job ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from common.brokers.base import IntakeBroker
from common.observability.logging import get_logger
from common.observability.metrics import IntakeMetrics
from common.schema import Job, Op
from common.storage.base import Storage
from producers.cms.idempotency import (
    Claim,
    IdempotencyStore,
    InProgress,
    KeyReused,
    Replay,
    key_hash,
    key_problem,
)
from producers.cms.runtime import BrokerLink, IntakeSettings
from producers.cms.schema import (
    MAX_PROBLEMS,
    Change,
    Problem,
    RequestInvalid,
    fingerprint,
    jobs_for_change,
    parse_batch,
    parse_delete,
    parse_upsert,
)

REALM = 'Bearer realm="imgfleet-cms"'
BROKER_RETRY_AFTER_S = 2
IN_PROGRESS_RETRY_AFTER_S = 1
LEASE_MARGIN_S = 30.0  # an idempotency claim outlives the publish timeout by this much
PURGE_INTERVAL_S = 600.0

log = get_logger("cms_intake")


@dataclass
class _Access:
    """What one request's access-log line says beyond method, path and status."""

    request_id: str
    items: int | None = None
    jobs: int | None = None
    replayed: bool = False
    key_hash: str | None = None


# Set by the middleware for the request's task; handlers fill it in.
_ACCESS: ContextVar[_Access] = ContextVar("cms_access")


class ApiError(Exception):
    """An error answer: status, a stable code, a message, problems, extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: list[Problem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems or []
        self.headers = headers or {}

    def response(self, request_id: str) -> web.Response:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.problems:
            body["errors"] = [p.as_dict() for p in self.problems[:MAX_PROBLEMS]]
            body["error_count"] = len(self.problems)
        body["request_id"] = request_id
        return _json(self.status, body, self.headers)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


class Intake:
    """The intake's state and handlers; ``make_app`` wires them into aiohttp.

    ``/metrics`` serves ``metrics`` (default: a fresh registry of the intake's metrics).
    """

    def __init__(
        self,
        broker: IntakeBroker,
        storage: Storage,
        settings: IntakeSettings,
        metrics: IntakeMetrics | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.metrics = metrics or IntakeMetrics()
        self.link = BrokerLink(broker)
        self.store = IdempotencyStore(
            storage,
            ttl_s=settings.idempotency_ttl_s,
            lease_s=settings.publish_timeout_s + LEASE_MARGIN_S,
        )
        self.draining = False
        self._tokens = [t.encode("utf-8") for t in settings.tokens]
        self._connector: asyncio.Task[None] | None = None

    # -- wiring ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        # aiohttp enforces the body limit while reading, chunked bodies included.
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._access_and_errors, self._authenticate],
        )
        app.router.add_post("/v1/items", self.post_items)
        app.router.add_put("/v1/items/{item_id}", self.put_item)
        app.router.add_delete("/v1/items/{item_id}", self.delete_item)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.serve_metrics)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application) -> Any:
        self._connector = asyncio.create_task(self.link.keep_connecting())
        purger = asyncio.create_task(self._purge_forever())
        yield
        # In-flight requests have finished (or the shutdown timeout passed) by now.
        for task in (self._connector, purger):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.broker.close()
        log.info("broker closed")

    async def connector_failed(self) -> BaseException:
        """Wait until the background connect fails for good; return why."""
        if self._connector is None:
            raise RuntimeError("the app has not started (runner.setup() runs its startup)")
        try:
            await self._connector
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return exc
        await asyncio.Event().wait()  # connected: never fails after that
        raise AssertionError("unreachable")

    async def _purge_forever(self) -> None:
        interval_s = min(PURGE_INTERVAL_S, max(self.settings.idempotency_ttl_s / 4, 1.0))
        while True:
            await asyncio.sleep(interval_s)
            try:
                purged = await asyncio.to_thread(self.store.purge_expired)
                if purged:
                    log.info("expired idempotency keys purged", keys=purged)
            except Exception as exc:
                log.warning("could not purge idempotency keys", error=str(exc))

    # -- middlewares -------------------------------------------------------------------

    @web.middleware
    async def _access_and_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request_id = _request_id(request)
        access = _Access(request_id)
        _ACCESS.set(access)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response(request_id)
        except web.HTTPException as exc:
            response = _http_error(exc, request_id)
        except Exception:
            log.exception("request failed", request_id=request_id, path=request.path)
            internal = ApiError(500, "internal_error", "internal error; the request failed")
            response = internal.response(request_id)
        response.headers["X-Request-Id"] = request_id
        self.metrics.requests.labels(status=str(response.status)).inc()
        if request.path not in ("/healthz", "/readyz", "/metrics") or response.status >= 500:
            log.info(
                "request",
                request_id=request_id,
                method=request.method,
                path=request.path,
                status=response.status,
                items=access.items,
                jobs=access.jobs,
                replayed=access.replayed,
                idempotency_key_hash=access.key_hash,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
                remote=request.remote,
            )
        return response

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/v1/") and self._tokens:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if not header or scheme.lower() != "bearer" or not token.strip():
                raise ApiError(
                    401,
                    "unauthorized",
                    "send Authorization: Bearer <token>",
                    headers={"WWW-Authenticate": REALM},
                )
            if not self._token_matches(token.strip().encode("utf-8")):
                raise ApiError(
                    401,
                    "unauthorized",
                    "the token is not accepted",
                    headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
                )
        return await handler(request)

    def _token_matches(self, presented: bytes) -> bool:
        # Compare against every token, without stopping early, in constant time each.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched

    # -- the API -----------------------------------------------------------------------

    async def post_items(self, request: web.Request) -> web.Response:
        body = await self._read_json(request, required=True)
        if isinstance(body, dict) and isinstance(body.get("items"), list):
            _ACCESS.get().items = len(body["items"])  # for the access log, valid or not
        changes = self._validated(
            lambda: parse_batch(
                body,
                max_items=self.settings.max_items_per_request,
                max_images=self.settings.max_images_per_item,
            )
        )
        return await self._accept(request, changes)

    async def put_item(self, request: web.Request) -> web.Response:
        body = await self._read_json(request, required=True)
        item_id = request.match_info["item_id"]
        change = self._validated(
            lambda: parse_upsert(item_id, body, max_images=self.settings.max_images_per_item)
        )
        return await self._accept(request, [change])

    async def delete_item(self, request: web.Request) -> web.Response:
        body = await self._read_json(request, required=False)
        item_id = request.match_info["item_id"]
        change = self._validated(lambda: parse_delete(item_id, request.query.get("version"), body))
        return await self._accept(request, [change])

    @staticmethod
    def _validated(parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except RequestInvalid as exc:
            raise ApiError(exc.status, exc.code, exc.summary(), exc.problems) from exc

    async def _read_json(self, request: web.Request, *, required: bool) -> Any:
        declared = request.headers.get("Content-Type")
        if declared is not None and request.can_read_body:
            mime = request.content_type
            if mime != "application/json" and not mime.endswith("+json"):
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"send Content-Type: application/json, not {mime!r}",
                )
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _too_large(None, limit) from exc
        if not raw.strip():
            if not required:
                return None
            raise ApiError(400, "invalid_json", "the body is empty; send a JSON object")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc

    async def _accept(self, request: web.Request, changes: list[Change]) -> web.Response:
        access = _ACCESS.get()
        access.items = len(changes)
        key = request.headers.get("Idempotency-Key")
        claim: Claim | None = None
        if key is None:
            scope = f"cms:{uuid.uuid4().hex}"
        else:
            problem = key_problem(key)
            if problem:
                raise ApiError(400, "invalid_idempotency_key", f"Idempotency-Key {problem}")
            access.key_hash = key_hash(key)[:16]
            claim, replay = await self._claim(key, fingerprint(changes))
            if replay is not None:
                access.replayed = True
                return web.Response(
                    status=replay.status,
                    body=replay.body,
                    content_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )
            scope = f"cms:{key_hash(key)}"
        jobs_by_change = [
            jobs_for_change(c, self.settings.max_images_per_item, scope) for c in changes
        ]
        jobs = [job for group in jobs_by_change for job in group]
        access.jobs = len(jobs)
        try:
            await self._publish(jobs)
        except BaseException:
            if claim is not None:
                await self._abandon(claim)
            raise
        body = orjson.dumps(_accepted(access.request_id, changes, jobs_by_change))
        if claim is not None:
            try:
                await asyncio.to_thread(self.store.complete, claim, 202, body)
            except Exception as exc:
                # The jobs are durable; a retry within the lease gets 409, then republishes
                # the same job ids once the lease is over.
                log.error("could not record the idempotent response", error=str(exc))
        for change in changes:
            self.metrics.changes.labels(op=change.op.value).inc()
        return web.Response(status=202, body=body, content_type="application/json")

    async def _claim(self, key: str, print_: str) -> tuple[Claim | None, Replay | None]:
        try:
            outcome = await asyncio.to_thread(self.store.begin, key, print_)
        except Exception as exc:
            log.error("idempotency store unavailable", error=str(exc))
            raise ApiError(
                503,
                "storage_unavailable",
                "the idempotency store is unavailable; nothing was published",
                headers={"Retry-After": str(BROKER_RETRY_AFTER_S)},
            ) from exc
        if isinstance(outcome, Replay):
            return None, outcome
        if isinstance(outcome, KeyReused):
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request; use a new key "
                "for new changes",
            )
        if isinstance(outcome, InProgress):
            raise ApiError(
                409,
                "idempotency_key_in_progress",
                "a request with this Idempotency-Key is being handled; retry shortly",
                headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER_S)},
            )
        return outcome, None

    async def _abandon(self, claim: Claim) -> None:
        try:
            await asyncio.shield(asyncio.to_thread(self.store.abandon, claim))
        except BaseException as exc:
            # The claim's lease runs out by itself; a retry gets 409 until then.
            log.warning("could not release an idempotency claim", error=str(exc))

    async def _publish(self, jobs: list[Job]) -> None:
        unavailable = {"Retry-After": str(BROKER_RETRY_AFTER_S)}
        if not self.link.connected:
            raise ApiError(
                503,
                "broker_unavailable",
                "not connected to the broker yet; nothing was published",
                headers=unavailable,
            )
        timeout_s = self.settings.publish_timeout_s
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.broker.publish(jobs), timeout_s)
        except TimeoutError as exc:
            log.warning("publish not confirmed in time", jobs=len(jobs), timeout_s=timeout_s)
            raise ApiError(
                503,
                "broker_unavailable",
                f"the broker did not confirm within {timeout_s:g} s; the request was not "
                "accepted (retry it with the same Idempotency-Key)",
                headers=unavailable,
            ) from exc
        except Exception as exc:
            log.warning("publish failed", jobs=len(jobs), error=str(exc))
            raise ApiError(
                503,
                "broker_unavailable",
                f"the broker did not take the jobs ({type(exc).__name__}); the request was "
                "not accepted (retry it with the same Idempotency-Key)",
                headers=unavailable,
            ) from exc
        self.metrics.publish_seconds.observe(time.perf_counter() - started)

    # -- operations ----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return _json(503, {"ready": False, "reason": "shutting down"})
        ok, why = await self.link.ready()
        return _json(200 if ok else 503, {"ready": ok, **({"reason": why} if why else {})})

    async def serve_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})


def _accepted(
    request_id: str, changes: list[Change], jobs_by_change: list[list[Job]]
) -> dict[str, Any]:
    items = []
    for change, jobs in zip(changes, jobs_by_change, strict=True):
        items.append(
            {
                "item_id": change.item_id,
                "op": change.op.value,
                "version": change.version,
                "images": len(change.image_urls),
                "job_ids": [job.job_id for job in jobs],
            }
        )
    upserts = sum(1 for c in changes if c.op is Op.UPSERT)
    return {
        "request_id": request_id,
        "accepted": {
            "changes": len(changes),
            "upserts": upserts,
            "deletes": len(changes) - upserts,
            "jobs": sum(len(jobs) for jobs in jobs_by_change),
        },
        "items": items,
    }


def _too_large(size: int | None, limit: int) -> ApiError:
    said = f"{size} bytes" if size is not None else "more"
    return ApiError(
        413,
        "body_too_large",
        f"the body is {said}; at most {limit} bytes (cms.max_body_bytes): split the batch",
    )


def _http_error(exc: web.HTTPException, request_id: str) -> web.Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = ApiError(exc.status, codes.get(exc.status, "http_error"), exc.reason)
    response = error.response(request_id)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


async def serve(
    intake: Intake,
    host: str,
    port: int,
    *,
    stop: asyncio.Event,
    on_listening: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully.

    Shutdown: readiness turns 503, the listener closes, in-flight requests finish (up to
    the publish timeout and a margin), then the broker is closed.
    """
    runner = web.AppRunner(
        intake.make_app(),
        access_log=None,  # the middleware logs one structured line per request
        shutdown_timeout=intake.settings.publish_timeout_s + 5.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info(
            "listening",
            host=host,
            port=bound,
            auth="bearer" if intake.settings.tokens else "none (insecure, loopback only)",
        )
        if on_listening is not None:
            on_listening(bound)
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(intake.connector_failed())
        done, _ = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, failed):
            task.cancel()
        if failed in done and not failed.cancelled():
            raise failed.result()
        log.info("stopping: finishing in-flight requests")
        intake.draining = True
    finally:
        await runner.cleanup()
    log.info("stopped")
