"""RabbitMQ for the queue and producer benchmarks (``bench/queue.py``, ``bench/produce.py``):
the server's address, the project adapter on fresh queues, and the naive side's plain
aio-pika connection and queue.

The server is ``IMGFLEET_BENCH_RABBITMQ_URL``, by default the one on 127.0.0.1:5672.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

RABBITMQ_URL = os.environ.get("IMGFLEET_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@asynccontextmanager
async def fresh_topology(broker: Any) -> AsyncIterator[Any]:
    """A project broker adapter connected, its queues deleted and connection closed after."""
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.delete_topology()
        await broker.close()


@dataclass(frozen=True)
class NaiveQueue:
    """The naive side's aio-pika connection, confirming channel and fresh quorum queue."""

    connection: Any
    channel: Any
    queue: Any

    async def publish(self, body: bytes) -> None:
        """One persistent message to the queue through the default exchange, returning once
        the broker has confirmed it (the channel has publisher confirms)."""
        import aio_pika

        await self.channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.queue.name,
        )


@asynccontextmanager
async def naive_queue() -> AsyncIterator[NaiveQueue]:
    """Plain aio-pika, as an application without the adapter would: one connection, a channel
    with publisher confirms, a durable quorum queue of its own (deleted afterwards)."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        f"bench-naive-{uuid.uuid4().hex[:8]}", durable=True, arguments={"x-queue-type": "quorum"}
    )
    try:
        yield NaiveQueue(connection, channel, queue)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()
