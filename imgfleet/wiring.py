"""Configuration -> concrete adapters. The only module that picks a broker or storage kind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from common.broker import Broker, DeadLetter
from common.config import Settings
from common.errors import ConfigError
from common.local_broker import LocalBroker
from common.logging import get_logger
from common.storage import LocalStorage, Storage
from index.segments import SegmentWriter
from workers.backends import EngineOptions
from workers.decode_pool import IN_FLIGHT_PER_PROCESS, DecodePool
from workers.embedder import Embedder, usable_cpus
from workers.fetch import Fetcher
from workers.model import load_model
from workers.model_sources import resolve_model_path
from workers.pipeline import PipelineSettings, Worker, WorkerStats
from workers.preprocess import INPUT_SIZE


def broker_prefetch(settings: Settings) -> int:
    """Jobs a worker holds unsettled: what its stages can work on or queue at once.

    More only waits in memory (and, on RabbitMQ, counts toward consumer_timeout); less
    starves a stage.
    """
    if settings.broker.prefetch:
        return settings.broker.prefetch
    w = settings.worker
    return (
        w.fetch_concurrency
        + IN_FLIGHT_PER_PROCESS * decode_processes(settings)
        + 3 * w.stage_queue_size
        + 2 * w.max_batch
    )


def make_broker(settings: Settings) -> Broker:
    b = settings.broker
    if b.kind == "local":
        return LocalBroker(
            b.local_path,
            prefetch=broker_prefetch(settings),
            visibility_timeout_s=b.visibility_timeout_s,
            poll_interval_s=b.poll_interval_s,
        )
    if b.kind == "rabbitmq":
        from common.rabbitmq_broker import RabbitMQBroker

        return RabbitMQBroker.from_config(b, prefetch=broker_prefetch(settings))
    if b.kind == "kafka":
        from common.kafka_broker import KafkaBroker

        return KafkaBroker.from_config(b)
    raise ConfigError(f"unknown broker.kind={b.kind!r}")


async def read_dead_letters(settings: Settings, limit: int = 10**9) -> list[DeadLetter]:
    """Every dead-lettered job the configured broker holds, read without removing any."""
    broker = make_broker(settings)
    await broker.connect()
    try:
        return await broker.dead_letters(limit=limit)
    finally:
        await broker.close()


def make_storage(settings: Settings) -> Storage:
    s = settings.storage
    if s.kind == "local":
        return LocalStorage(s.root)
    if s.kind == "s3":
        from common.s3_storage import S3Storage

        return S3Storage.from_config(s)
    raise ConfigError(f"unknown storage.kind={s.kind!r}")


def decode_processes(settings: Settings) -> int:
    return settings.worker.decode_processes or max(os.cpu_count() or 1, 1)


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
    from workers.s3_fetch import S3Fetcher

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
    from workers.gpu_decode import DecodeRouter, GpuJpegDecoder, gpu_available

    if settings.worker.gpu_decode == "off" or not gpu_available():
        return pool
    from workers.routed_decode import RoutedDecoder

    log.info("GPU JPEG decode on; PNG, WebP and rejected JPEGs go to the CPU pool")
    return RoutedDecoder(
        pool,
        GpuJpegDecoder(),
        DecodeRouter(gpu_available=True),
        max_pixels=settings.worker.max_pixels,
        max_batch=settings.worker.max_batch,
    )


async def run_worker(
    settings: Settings,
    *,
    worker_id: str,
    until_idle: bool = False,
    progress_total: int | None = None,
    embedder: Any = None,
) -> WorkerStats:
    """Run one worker until SIGTERM/SIGINT (or until the queue is drained)."""
    log = get_logger("worker", worker_id=worker_id)
    broker = make_broker(settings)
    await broker.connect()
    storage = make_storage(settings)
    writer = SegmentWriter(storage, settings.index.n_shards, worker_id)
    pool = DecodePool(
        decode_processes(settings),
        max_pixels=settings.worker.max_pixels,
        recover_truncated=True,
        min_decoded_fraction=settings.worker.recovered_min_fraction,
    )
    known = None
    if settings.worker.skip_unchanged:
        from index.known import KnownImages

        known = KnownImages(storage)
    try:
        # Decode processes start while the model loads; both take seconds.
        warm = asyncio.create_task(pool.warm_up())
        embedder = embedder or await asyncio.to_thread(make_embedder, settings)
        await warm
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
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, worker.request_stop)
            log.info("worker started", model_id=embedder.model_id, broker=repr(broker))
            stats = await worker.run(until_idle=until_idle)
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    finally:
        pool.close()
        await broker.close()
    log.info("worker stopped", **stats.as_dict())
    return stats
