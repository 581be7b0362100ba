"""The RabbitMQ publish ledger: a bounded queue per run holding copies of its job messages.

A job message published with a ledger carries a ``BCC`` header naming the run's ledger
queue (sender-selected distribution on the default exchange): RabbitMQ routes the one
message to the lane queue and to the ledger queue, strips ``BCC`` from both copies, and
confirms it once both queues have it. A message the producer saw confirmed is therefore
in both; one lost with a killed producer mid-publish is in both or in neither, because
the server routes a message it has received whole to all its queues at once.

The ledger is a classic durable queue with ``x-max-length`` (oldest dropped first): the
producer writes a checkpoint before more messages than ``capacity`` went out since the
last one, so everything published after the checkpoint is still in the ledger. Nobody
consumes it; a resume reads it without acking (the channel is closed afterwards, which
puts the messages back) and the run drops it once published.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any

import aiormq.exceptions
import orjson
from aio_pika.abc import AbstractRobustConnection

from common.brokers.rabbitmq.publish import unpack

MAX_QUEUE_NAME_BYTES = 255


def ledger_queue(prefix: str, ledger: str) -> str:
    name = f"{prefix}.ledger.{ledger}"
    if len(name.encode()) > MAX_QUEUE_NAME_BYTES:
        # A long run id still gets a stable, short queue name of its own.
        name = f"{prefix}.ledger.{hashlib.blake2b(ledger.encode(), digest_size=16).hexdigest()}"
    return name


def ledger_arguments(max_messages: int) -> dict[str, Any]:
    # Classic, not quorum: a bounded scratch queue needs neither replication nor the
    # quorum queue's per-message log, and drop-head keeps the newest messages.
    return {"x-queue-type": "classic", "x-max-length": max_messages, "x-overflow": "drop-head"}


def bcc_headers(queue: str) -> dict[str, Any]:
    return {"BCC": [queue]}


def capacity_calls(
    *, max_messages: int, publish_window: int, jobs_per_message: int, batch_jobs: int, lanes: int
) -> int:
    """Publish calls of up to ``batch_jobs`` jobs the ledger surely keeps.

    A call packs each lane's jobs into messages of ``jobs_per_message``; a window of
    messages is kept spare because a message republished after a lost confirm may be in
    the ledger twice.
    """
    per_call = math.ceil(batch_jobs / jobs_per_message) + lanes - 1
    return max((max_messages - publish_window) // per_call, 0)


async def read_job_ids(connection: AbstractRobustConnection, queue: str) -> set[str]:
    """Job ids in the ledger queue, read without removing any (a missing queue: none)."""
    channel = await connection.channel(publisher_confirms=False)
    ids: set[str] = set()
    try:
        try:
            source = await channel.declare_queue(queue, passive=True, robust=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return ids
        while True:
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                break
            for body in unpack(message.body, message.content_type):
                job_id = orjson.loads(body).get("job_id")
                if isinstance(job_id, str):
                    ids.add(job_id)
    finally:
        # Closing the channel hands every message read back to the ledger, unacked.
        with contextlib.suppress(Exception):
            await channel.close()
    return ids
