"""Configuration -> a running worker: model, fetcher, decoder, pipeline, ops endpoints.

Brokers and storage are picked in imgfleet/factories.py (re-exported here), which does
not import torch, so the ops commands start quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

from common.brokers.base import Broker, QueueInspector
from common.config import Settings
from common.errors import ConfigError, JobFailure, UnrecoverableError
from common.observability.health import Health
from common.observability.logging import bind_process, get_logger, unbind_process
from common.observability.metrics import Metrics, default_metrics, poll_queue_stats
from common.observability.ops_http import OpsServer
from imgfleet.factories import (
    decode_processes,
    make_broker,
    make_storage,
)
from index.segments import SegmentWriter
from workers.decode.pool import IN_FLIGHT_PER_PROCESS, DecodePool
from workers.decode.preprocess import INPUT_SIZE
from workers.embed.backends import EngineOptions
from workers.embed.embedder import Embedder, usable_cpus
from workers.embed.model import load_model
from workers.embed.model_sources import resolve_model_path
from workers.fetch.fetcher import Fetcher
from workers.pipeline import PipelineSettings, Worker, WorkerStats


def pipeline_settings(settings: Settings) -> PipelineSettings:
    w, b = settings.worker, settings.broker
    processes = decode_processes(settings)
    return PipelineSettings(
        fetch_concurrency=w.fetch_concurrency,
        decode_concurrency=processes * IN_FLIGHT_PER_PROCESS,
        max_batch=w.max_batch,
        max_wait_s=w.max_wait_ms / 1000.0,
        segment_max_records=w.segment_max_records,
        segment_flush_interval_s=w.segment_flush_interval_s,
        stage_queue_size=w.stage_queue_size,
        max_attempts=b.max_attempts,
        retry_base_s=b.retry_base_s,
        retry_max_s=b.retry_max_s,
        shutdown_deadline_s=w.shutdown_deadline_s,
        index_recovered=w.truncated_policy == "index",
        consume_give_up_s=w.broker_give_up_s,
    )


def embed_device(settings: Settings) -> str:
    device = settings.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def embed_threads(settings: Settings, device: str) -> int:
    """Intra-op threads for the embedder: explicit settings win, else fit the machine.

    On a GPU the CPU side only stages batches, so two threads are plenty. On the CPU the
    model and the decode processes share the cores; torch's default (one thread per core)
    oversubscribes them while decode runs, and spinning OpenMP threads steal the decoders'
    time.
    """
    explicit = settings.model.threads or settings.worker.embed_threads
    if explicit:
        return explicit
    cpus = usable_cpus()
    if device.startswith("cuda"):
        return min(2, cpus)
    return embed_threads_for_cpu(cpus, decode_processes(settings))


def embed_threads_for_cpu(cpus: int, decode_procs: int) -> int:
    # Measured on 2 cores (bench/embed.py): all cores for the model is fastest end to end,
    # because decode is the smaller share of the work; above 4 cores keep half the cores
    # for decode, which then is the larger share.
    if cpus <= 4:
        return cpus
    return max(2, cpus - min(decode_procs, cpus // 2))


def make_embedder(settings: Settings) -> Embedder:
    m = settings.model
    device = embed_device(settings)
    path = resolve_model_path(
        m.path,
        cache_dir=m.download_dir,
        s3_endpoint_url=m.s3_endpoint_url,
        s3_region=m.s3_region,
    )
    loaded = load_model(path)
    if loaded.card.input_size != INPUT_SIZE:
        get_logger("wiring").warning(
            "model input size differs from the decode size",
            model_input_size=loaded.card.input_size,
            decode_size=INPUT_SIZE,
        )
    options = EngineOptions(
        backend=m.backend,
        precision=m.precision,
        max_batch=settings.worker.max_batch,
        preferred_batch_sizes=tuple(m.preferred_batch_sizes),
        instances=m.instances,
        in_flight=m.in_flight,
        channels_last=m.channels_last,
        compile_mode=m.compile,
        cuda_graphs=m.cuda_graphs,
        engine_cache_dir=str(m.engine_cache_dir),
        int8_calibration_dir=m.int8_calibration_dir,
    )
    return Embedder(loaded, device=device, threads=embed_threads(settings, device), options=options)


def make_fetcher(settings: Settings) -> Fetcher:
    from workers.fetch.s3 import S3Fetcher

    w = settings.worker
    s3 = S3Fetcher(
        endpoint_url=w.s3_endpoint_url,
        region=w.s3_region,
        access_key_id=w.s3_access_key_id.get_secret_value(),
        secret_access_key=w.s3_secret_access_key.get_secret_value(),
        connect_timeout_s=w.connect_timeout_s,
        read_timeout_s=w.read_timeout_s,
        max_bytes=w.max_download_bytes,
        max_connections=w.fetch_per_host_limit,
    )
    return Fetcher(
        connect_timeout_s=w.connect_timeout_s,
        read_timeout_s=w.read_timeout_s,
        total_timeout_s=w.total_timeout_s,
        max_bytes=w.max_download_bytes,
        max_redirects=w.fetch_max_redirects,
        per_host_limit=w.fetch_per_host_limit,
        total_limit=w.fetch_concurrency,
        allow_networks=w.fetch_allow_networks,
        retries=w.fetch_retries,
        s3=s3,
        allow_file_urls=w.allow_file_urls,
    )


def make_decoder(settings: Settings, pool: DecodePool, log: Any) -> Any:
    """The CPU pool, fronted by the nvJPEG route where CUDA and torchvision are present."""
    from workers.decode.nvjpeg import DecodeRouter, GpuJpegDecoder, gpu_available

    if settings.worker.gpu_decode == "off" or not gpu_available():
        return pool
    from workers.decode.routing import RoutedDecoder

    log.info("GPU JPEG decode on; PNG, WebP and rejected JPEGs go to the CPU pool")
    return RoutedDecoder(
        pool,
        GpuJpegDecoder(),
        DecodeRouter(gpu_available=True),
        max_pixels=settings.worker.max_pixels,
        max_batch=settings.worker.max_batch,
    )


def broker_has_work(broker: QueueInspector) -> bool:
    """Kafka: the group assigned this consumer partitions (a surplus member has no work,
    which makes it unready but is no reason to exit). Other brokers: always."""
    assigned = broker.assigned_partitions
    return assigned is None or assigned > 0


async def connect_broker(broker: Broker, give_up_s: float, log: Any) -> None:
    """Connect, retrying transient failures for up to ``give_up_s``; then unrecoverable.

    Refused credentials and invalid settings are ``ConfigError`` at once: waiting will
    not fix them.
    """
    deadline_s = time.monotonic() + give_up_s
    delay_s = 1.0
    while True:
        try:
            await broker.connect()
            return
        except ConfigError:
            raise
        except (JobFailure, OSError) as exc:
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                raise UnrecoverableError(
                    f"broker unreachable for {give_up_s:.0f} s: {exc}", "broker"
                ) from exc
            log.warning("broker unreachable; retrying", error=str(exc), give_up_in_s=round(left_s))
            await asyncio.sleep(min(delay_s, left_s))
            delay_s = min(delay_s * 2, 10.0)


async def _watch_broker(
    broker: Any,
    worker: Worker,
    health: Health,
    metrics: Metrics,
    *,
    give_up_s: float,
    log: Any,
    interval_s: float = 0.5,
) -> None:
    """Readiness follows the connection (and, on Kafka, the partition assignment); a
    connection down past ``give_up_s`` is fatal."""
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
            worker.fail(UnrecoverableError(f"broker unreachable for {give_up_s:.0f} s", "broker"))
            return
        await asyncio.sleep(interval_s)


async def _poll_gauges(
    broker: Any, embedder: Any, metrics: Metrics, *, queue_interval_s: float, log: Any
) -> None:
    """Queue depth / lag every ``queue_interval_s``; the GPU every few seconds."""
    sample_gpu = getattr(embedder, "gpu_sample", None)
    gpu_interval_s = min(5.0, queue_interval_s)
    next_queue_s = 0.0
    while True:
        now_s = time.monotonic()
        if now_s >= next_queue_s:
            next_queue_s = now_s + queue_interval_s
            try:
                await poll_queue_stats(broker, metrics)
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


async def run_worker(
    settings: Settings,
    *,
    worker_id: str,
    until_idle: bool = False,
    progress_total: int | None = None,
    embedder: Any = None,
    serve_ops: bool = False,
) -> WorkerStats:
    """Run one worker until SIGTERM/SIGINT (or until the queue is drained).

    ``serve_ops`` starts the ops listener (``/metrics``, ``/healthz``, ``/readyz`` on
    ``metrics.host:metrics.port``) for the life of the worker; `imgfleet work` turns it on
    when ``metrics.enabled``. Raises ``UnrecoverableError`` when the worker cannot go on
    (broker unreachable past ``worker.broker_give_up_s``, the model or the decode pool
    failed) and ``ConfigError`` for invalid settings; both after handing back its jobs.
    """
    bind_process(worker_id=worker_id)
    log = get_logger("worker")
    metrics = default_metrics()
    health = Health(settings.metrics.stall_after_s)
    health.on_readiness_change(lambda ready: metrics.worker_ready.set(int(ready)))
    health.set_ready("model", False)
    health.set_ready("broker", False)
    ops: OpsServer | None = None
    if serve_ops:
        m = settings.metrics
        ops = OpsServer(metrics, health, host=m.host, port=m.port, port_file=m.port_file or None)
        ops.start()
    background: list[asyncio.Task[None]] = [
        asyncio.create_task(
            health.beat_event_loop(
                min(1.0, settings.metrics.stall_after_s / 4), on_lag=metrics.event_loop_lag.set
            )
        )
    ]
    try:
        return await _run_worker(
            settings,
            worker_id=worker_id,
            until_idle=until_idle,
            progress_total=progress_total,
            embedder=embedder,
            metrics=metrics,
            health=health,
            background=background,
            log=log,
        )
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        health.set_ready("broker", False)
        metrics.broker_connected.set(0)
        if ops is not None:
            ops.stop()
        unbind_process("worker_id")


async def _run_worker(
    settings: Settings,
    *,
    worker_id: str,
    until_idle: bool,
    progress_total: int | None,
    embedder: Any,
    metrics: Metrics,
    health: Health,
    background: list[asyncio.Task[None]],
    log: Any,
) -> WorkerStats:
    give_up_s = settings.worker.broker_give_up_s
    broker = make_broker(settings)
    await connect_broker(broker, give_up_s, log)
    health.set_ready("broker", broker.is_connected())
    storage = make_storage(settings)
    writer = SegmentWriter(storage, settings.index.n_shards, worker_id)
    pool = DecodePool(
        decode_processes(settings),
        max_pixels=settings.worker.max_pixels,
        recover_truncated=True,
        min_decoded_fraction=settings.worker.recovered_min_fraction,
        max_restarts=settings.worker.decode_pool_max_restarts,
        on_restart=metrics.decode_pool_restarts.inc,
    )
    known = None
    if settings.worker.skip_unchanged:
        from index.known import KnownImages

        known = KnownImages(storage)
    try:
        # Decode processes start while the model loads; both take seconds.
        warm = asyncio.create_task(pool.warm_up())
        try:
            embedder = embedder or await asyncio.to_thread(make_embedder, settings)
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
        health.set_ready("model", True)
        metrics.set_build_info(embedder.model_id)
        async with make_fetcher(settings) as fetcher:
            worker = Worker(
                broker,
                writer,
                fetcher,
                make_decoder(settings, pool, log),
                embedder,
                pipeline_settings(settings),
                worker_id=worker_id,
                progress_total=progress_total,
                known=known,
                metrics=metrics,
                health=health,
            )
            background.append(
                asyncio.create_task(
                    _watch_broker(broker, worker, health, metrics, give_up_s=give_up_s, log=log)
                )
            )
            background.append(
                asyncio.create_task(
                    _poll_gauges(
                        broker,
                        embedder,
                        metrics,
                        queue_interval_s=settings.metrics.queue_poll_interval_s,
                        log=log,
                    )
                )
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, worker.request_stop, sig.name)
            log.info("worker started", model_id=embedder.model_id, broker=repr(broker))
            try:
                stats = await worker.run(until_idle=until_idle)
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
    finally:
        pool.close()
        with contextlib.suppress(Exception):
            # Bounded: a broker that is away must not hold the exit (closing the
            # connection is what returns unacked jobs; a lost one has returned them).
            close_s = 10.0 if broker.is_connected() else 2.0
            await asyncio.wait_for(broker.close(), timeout=close_s)
    log.info("worker stopped", **stats.as_dict())
    return stats
