"""A worker process's supervision around the pipeline: what `imgfleet work` runs.

``WorkerRuntime.run`` owns what happens around ``workers.pipeline.Worker`` from start to
exit:

- the ops listener (``/metrics``, ``/healthz``, ``/readyz``) and the event-loop heartbeat;
- connect-with-give-up: transient broker failures are retried (waits doubling from 1 s to
  10 s) for ``broker_give_up_s``, then ``UnrecoverableError(..., "broker")``; refused
  credentials and invalid settings (``ConfigError``) are raised at once;
- the broker watch: readiness follows ``is_connected()`` and, on Kafka, the partition
  assignment; a connection down for longer than the give-up time fails the worker;
- gauges: queue depth / lag every ``queue_poll_interval_s``, the embedding GPU every few
  seconds;
- SIGTERM / SIGINT: drain, then return the stats;
- the decode pool's lifecycle: its processes start while the model loads, and it is
  closed, and the broker closed within a bound, however the run ends.

It names no adapter: the composition root (``imgfleet.factories``) hands it the broker and
a ``WorkerParts``, which makes each of the pipeline's parts when the runtime asks for it.
Nothing past the broker is made before the broker is connected, so a worker waiting for
its broker holds no decode pool and no model.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from common.brokers.base import QueueInspector, WorkerBroker
from common.errors import ConfigError, JobFailure, UnrecoverableError
from common.observability.health import Health
from common.observability.logging import bind_process, get_logger, unbind_process
from common.observability.metrics import Metrics, poll_queue_stats
from common.observability.ops_http import OpsListen, serving_ops
from common.retry import retry_until
from workers.decode.types import Decoder, Preprocess
from workers.embed.types import Embedder
from workers.fetch.types import Fetcher
from workers.pipeline import PipelineSettings, Worker, WorkerStats

if TYPE_CHECKING:
    from index.segments import SegmentWriter
    from workers.decode.pool import DecodePool
    from workers.embed.embedder import GpuSample
    from workers.fetch.unchanged import KnownLookup

# Connect-with-give-up waits: 1 s, doubling to at most 10 s between attempts.
_CONNECT_FIRST_DELAY_S = 1.0
_CONNECT_MAX_DELAY_S = 10.0
# Closing is what hands unacked jobs back; a broker that is away must not hold the exit
# (a lost connection has handed them back already).
_CLOSE_CONNECTED_S = 10.0
_CLOSE_DISCONNECTED_S = 2.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SupervisedEmbedder(Embedder, Protocol):
    """An embedder that also reports on its device (the GPU gauges)."""

    def gpu_sample(self) -> GpuSample | None: ...


class WorkerParts(Protocol):
    """The pipeline's parts, each made when the runtime asks for it."""

    def segment_writer(self) -> SegmentWriter: ...

    def known_images(self) -> KnownLookup | None: ...

    def decode_pool(self, on_restart: Callable[[], None]) -> DecodePool: ...

    def load_embedder(self) -> SupervisedEmbedder:
        """Runs in a thread while the decode processes start (both take seconds)."""
        ...

    def fetcher(self) -> AbstractAsyncContextManager[Fetcher]: ...

    def decoder(self, pool: DecodePool, preprocess: Preprocess) -> Decoder:
        """What the pipeline decodes with: the pool, or a route in front of it; both
        decode for the loaded model's ``preprocess``."""
        ...


@dataclass(frozen=True)
class RuntimeSettings:
    worker_id: str
    pipeline: PipelineSettings
    broker_give_up_s: float
    stall_after_s: float
    queue_poll_interval_s: float
    ops: OpsListen | None  # None: no ops listener


def broker_has_work(broker: QueueInspector) -> bool:
    """Kafka: the group assigned this consumer partitions (a surplus member has no work,
    which makes it unready but is no reason to exit). Other brokers: always."""
    assigned = broker.assigned_partitions
    return assigned is None or assigned > 0


class WorkerRuntime:
    """One worker process's run: ``await WorkerRuntime(...).run()``.

    ``run`` raises ``UnrecoverableError`` when the worker cannot go on (broker unreachable
    past ``broker_give_up_s``, the model or the decode pool failed) and ``ConfigError``
    for invalid settings; both after handing back its jobs.
    """

    def __init__(
        self,
        broker: WorkerBroker,
        parts: WorkerParts,
        settings: RuntimeSettings,
        *,
        metrics: Metrics,
    ) -> None:
        self.broker = broker
        self.parts = parts
        self.settings = settings
        self.metrics = metrics
        self.health = Health(settings.stall_after_s)
        self.log = get_logger("worker")
        self._background: list[asyncio.Task[None]] = []

    async def run(
        self, *, until_idle: bool = False, progress_total: int | None = None
    ) -> WorkerStats:
        """Run until SIGTERM/SIGINT (or, with ``until_idle``, until the queue is drained)."""
        s = self.settings
        bind_process(worker_id=s.worker_id)
        metrics, health = self.metrics, self.health
        health.on_readiness_change(lambda ready: metrics.worker_ready.set(int(ready)))
        health.set_ready("model", False)
        health.set_ready("broker", False)
        with serving_ops(metrics, health, s.ops, process="worker"):
            self._start(health.beat_event_loop(on_lag=metrics.event_loop_lag.set))
            try:
                return await self._connect_and_work(until_idle, progress_total)
            finally:
                for task in self._background:
                    task.cancel()
                await asyncio.gather(*self._background, return_exceptions=True)
                self._background.clear()
                health.set_ready("broker", False)
                metrics.broker_connected.set(0)
                unbind_process("worker_id")

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._background.append(asyncio.create_task(coroutine))

    async def _connect(self) -> None:
        """Connect, retrying transient failures for up to ``broker_give_up_s``; then
        unrecoverable. Refused credentials and invalid settings are ``ConfigError`` at
        once: waiting will not fix them."""
        give_up_s = self.settings.broker_give_up_s

        def retrying(exc: BaseException, wait_s: float, left_s: float) -> None:
            self.log.warning(
                "broker unreachable; retrying", error=str(exc), give_up_in_s=round(left_s)
            )

        try:
            await retry_until(
                self.broker.connect,
                retry_on=(JobFailure, OSError),
                stop_on=(ConfigError,),
                give_up_after_s=give_up_s,
                first_delay_s=_CONNECT_FIRST_DELAY_S,
                max_delay_s=_CONNECT_MAX_DELAY_S,
                on_retry=retrying,
            )
        except (JobFailure, OSError) as exc:
            raise UnrecoverableError(
                f"broker unreachable for {give_up_s:.0f} s: {exc}", "broker"
            ) from exc

    async def _connect_and_work(self, until_idle: bool, progress_total: int | None) -> WorkerStats:
        broker, parts, health, log = self.broker, self.parts, self.health, self.log
        await self._connect()
        health.set_ready("broker", broker.is_connected())
        writer = parts.segment_writer()
        pool = parts.decode_pool(self.metrics.decode_pool_restarts.inc)
        known = parts.known_images()
        try:
            embedder = await self._load_model(pool)
            async with parts.fetcher() as fetcher:
                worker = Worker(
                    broker,
                    writer,
                    fetcher,
                    parts.decoder(pool, embedder.preprocess),
                    embedder,
                    self.settings.pipeline,
                    worker_id=self.settings.worker_id,
                    progress_total=progress_total,
                    known=known,
                    metrics=self.metrics,
                    health=health,
                )
                self._start(self._watch_broker(worker))
                self._start(self._poll_gauges(embedder))
                with _stop_on_signals(worker):
                    log.info("worker started", model_id=embedder.model_id, broker=repr(broker))
                    stats = await worker.run(until_idle=until_idle)
        finally:
            pool.close()
            with contextlib.suppress(Exception):
                close_s = _CLOSE_CONNECTED_S if broker.is_connected() else _CLOSE_DISCONNECTED_S
                await asyncio.wait_for(broker.close(), timeout=close_s)
        log.info("worker stopped", **stats.as_dict())
        return stats

    async def _load_model(self, pool: DecodePool) -> SupervisedEmbedder:
        """The model, loaded while the decode processes start; both must be up."""
        warm = asyncio.create_task(pool.warm_up())
        try:
            embedder = await asyncio.to_thread(self.parts.load_embedder)
        except ConfigError:
            raise
        except Exception as exc:
            raise UnrecoverableError(
                f"the model failed to load: {type(exc).__name__}: {exc}", "model"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                await warm
        if pool.failed:
            raise UnrecoverableError("the decode pool could not be started", "decode_pool")
        self.health.set_ready("model", True)
        self.metrics.set_build_info(embedder.model_id)
        return embedder

    async def _watch_broker(self, worker: Worker, interval_s: float = 0.5) -> None:
        """Readiness follows the connection (and, on Kafka, the partition assignment); a
        connection down past ``broker_give_up_s`` is fatal."""
        broker, health, metrics, log = self.broker, self.health, self.metrics, self.log
        give_up_s = self.settings.broker_give_up_s
        down_since_s: float | None = None
        while True:
            connected = broker.is_connected()
            health.set_ready("broker", connected and broker_has_work(broker))
            metrics.broker_connected.set(int(connected))
            now_s = time.monotonic()
            if connected and down_since_s is not None:
                log.info("broker connection back; ready", down_s=round(now_s - down_since_s, 1))
                down_since_s = None
            elif not connected and down_since_s is None:
                log.warning("broker connection lost; not ready", give_up_s=give_up_s)
                down_since_s = now_s
            elif down_since_s is not None and now_s - down_since_s > give_up_s:
                worker.fail(
                    UnrecoverableError(f"broker unreachable for {give_up_s:.0f} s", "broker")
                )
                return
            await asyncio.sleep(interval_s)

    async def _poll_gauges(self, embedder: SupervisedEmbedder) -> None:
        """Queue depth / lag every ``queue_poll_interval_s``; the GPU every few seconds."""
        metrics, log = self.metrics, self.log
        queue_interval_s = self.settings.queue_poll_interval_s
        sample_gpu: Callable[[], GpuSample | None] | None = embedder.gpu_sample
        gpu_interval_s = min(5.0, queue_interval_s)
        next_queue_s = 0.0
        while True:
            now_s = time.monotonic()
            if now_s >= next_queue_s:
                next_queue_s = now_s + queue_interval_s
                try:
                    await poll_queue_stats(self.broker, metrics)
                except Exception as exc:  # the broker may be away; readiness says so already
                    log.debug("queue gauges not updated", error=str(exc))
            if sample_gpu is not None:
                try:
                    sample = await asyncio.to_thread(sample_gpu)
                except Exception as exc:
                    log.debug("GPU gauges not updated", error=str(exc))
                    sample = None
                    sample_gpu = None  # do not retry a device query that fails
                if sample is not None:
                    metrics.set_gpu(
                        str(sample.index),
                        utilization=sample.utilization,
                        used_bytes=sample.used_bytes,
                        total_bytes=sample.total_bytes,
                    )
            await asyncio.sleep(min(gpu_interval_s, max(next_queue_s - time.monotonic(), 0.1)))


@contextlib.contextmanager
def _stop_on_signals(worker: Worker) -> Iterator[None]:
    """SIGTERM and SIGINT drain the worker (``stopped_by`` names the signal)."""
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.request_stop, sig.name)
    try:
        yield
    finally:
        for sig in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
