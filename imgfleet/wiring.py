"""Configuration -> concrete adapters. The only module that picks a broker or storage kind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from common.broker import Broker
from common.config import Settings
from common.errors import ConfigError
from common.local_broker import LocalBroker
from common.logging import get_logger
from common.storage import LocalStorage, Storage
from index.segments import SegmentWriter
from workers.decode_pool import DecodePool
from workers.embedder import Embedder
from workers.fetch import Fetcher
from workers.model import load_model
from workers.pipeline import PipelineSettings, Worker, WorkerStats


def make_broker(settings: Settings) -> Broker:
    b = settings.broker
    if b.kind == "local":
        return LocalBroker(
            b.local_path,
            prefetch=b.prefetch,
            visibility_timeout_s=b.visibility_timeout_s,
            poll_interval_s=b.poll_interval_s,
        )
    raise ConfigError(f"broker.kind={b.kind!r} is not available in this version; use 'local'")


def make_storage(settings: Settings) -> Storage:
    s = settings.storage
    if s.kind == "local":
        return LocalStorage(s.root)
    raise ConfigError(f"storage.kind={s.kind!r} is not available in this version; use 'local'")


def decode_processes(settings: Settings) -> int:
    return settings.worker.decode_processes or max(os.cpu_count() or 1, 1)


def pipeline_settings(settings: Settings) -> PipelineSettings:
    w, b = settings.worker, settings.broker
    processes = decode_processes(settings)
    return PipelineSettings(
        fetch_concurrency=w.fetch_concurrency,
        decode_concurrency=processes * 2,  # one decoding, one queued per process
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


def make_embedder(settings: Settings) -> Embedder:
    device = settings.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = settings.worker.embed_threads or None
    return Embedder(load_model(settings.model.path), device=device, threads=threads)


def make_fetcher(settings: Settings) -> Fetcher:
    w = settings.worker
    return Fetcher(
        connect_timeout_s=w.connect_timeout_s,
        read_timeout_s=w.read_timeout_s,
        total_timeout_s=w.total_timeout_s,
        max_bytes=w.max_download_bytes,
        total_limit=w.fetch_concurrency,
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
    )
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
                pool,
                embedder,
                pipeline_settings(settings),
                worker_id=worker_id,
                progress_total=progress_total,
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
