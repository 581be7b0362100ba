"""Configuration -> concrete broker and storage adapters.

The only module that picks a broker or storage kind. It imports no torch and no decoder,
so the ops commands (status, dlq, requeue) and the producers start in well under a second.
"""

from __future__ import annotations

import os

from common.brokers.base import Broker, DeadLetter
from common.brokers.local.broker import LocalBroker
from common.config import Settings
from common.errors import ConfigError
from common.storage.base import LocalStorage, Storage


def broker_prefetch(settings: Settings) -> int:
    """Jobs a worker holds unsettled: what its stages can work on or queue at once.

    More only waits in memory (and, on RabbitMQ, counts toward consumer_timeout); less
    starves a stage.
    """
    if settings.broker.prefetch:
        return settings.broker.prefetch
    from workers.decode.pool import IN_FLIGHT_PER_PROCESS  # the pool's depth per process

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
        from common.brokers.rabbitmq.broker import RabbitMQBroker

        return RabbitMQBroker.from_config(b, prefetch=broker_prefetch(settings))
    if b.kind == "kafka":
        from common.brokers.kafka.broker import KafkaBroker

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
        from common.storage.s3 import S3Storage

        return S3Storage.from_config(s)
    raise ConfigError(f"unknown storage.kind={s.kind!r}")


def decode_processes(settings: Settings) -> int:
    return settings.worker.decode_processes or max(os.cpu_count() or 1, 1)
