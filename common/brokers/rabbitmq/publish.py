"""Confirmed publishing with a window of messages in flight, and multi-job messages.

Awaiting each confirm before the next publish caps a producer at one round trip per
message; a window of unconfirmed publishes and several jobs per message remove both
limits. Every message is still confirmed: one that is nacked, returned or lost with its
connection is published again, and what cannot be confirmed after the retries is
reported, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractRobustChannel

from common.errors import Reason, TransientError
from common.observability.logging import get_logger
from common.retry import backoff_delay_s

PACKED_CONTENT_TYPE = "application/x-ndjson"  # one job per line
JOB_CONTENT_TYPE = "application/json"
RAW_CONTENT_TYPE = "application/octet-stream"
JOBS_HEADER = "x-imgfleet-jobs"

_PUBLISH_ERRORS = (
    aio_pika.exceptions.DeliveryError,  # nacked by the broker
    aio_pika.exceptions.PublishError,  # returned: no queue took it
    aiormq.exceptions.AMQPError,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for a channel that is reopening
)

log = get_logger("rabbitmq")


@dataclass
class Outgoing:
    """One AMQP message to publish through the default exchange."""

    routing_key: str
    body: bytes
    content_type: str = JOB_CONTENT_TYPE
    jobs: int = 1
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    expiration_s: float | None = None

    def to_message(self) -> aio_pika.Message:
        return aio_pika.Message(
            self.body,
            content_type=self.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={JOBS_HEADER: self.jobs, **self.headers},
            message_id=self.message_id,
            expiration=self.expiration_s,
        )


def pack(routing_key: str, bodies: Sequence[bytes], jobs_per_message: int) -> list[Outgoing]:
    """Group job bodies into messages of up to ``jobs_per_message`` jobs each.

    Bodies are compact JSON, which never holds a raw newline, so newline-delimited JSON
    keeps each job's bytes exactly as they were (the DLQ stores them unchanged).
    """
    if jobs_per_message <= 1:
        return [Outgoing(routing_key, body) for body in bodies]
    out = []
    for start in range(0, len(bodies), jobs_per_message):
        chunk = bodies[start : start + jobs_per_message]
        if len(chunk) == 1:
            out.append(Outgoing(routing_key, chunk[0]))
        else:
            out.append(
                Outgoing(routing_key, b"\n".join(chunk), PACKED_CONTENT_TYPE, jobs=len(chunk))
            )
    return out


def unpack(body: bytes, content_type: str | None) -> list[bytes]:
    """The job bodies one message carries (anything not packed is one body, as it is)."""
    if content_type == PACKED_CONTENT_TYPE:
        return [line for line in body.split(b"\n") if line]
    return [body]


class ConfirmedPublisher:
    """Publish many messages with up to ``window`` unconfirmed at once."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        *,
        window: int,
        attempts: int = 6,
        confirm_timeout_s: float = 30.0,
    ) -> None:
        self.channel = channel
        self.window = window
        self.attempts = attempts
        self.confirm_timeout_s = confirm_timeout_s

    async def publish(self, messages: Iterable[Outgoing]) -> int:
        """Publish all; return the number confirmed. Raise if any stays unconfirmed."""
        source: Iterator[Outgoing] = iter(messages)
        failed: list[tuple[Outgoing, str]] = []
        confirmed = 0

        async def lane() -> None:
            nonlocal confirmed
            # Each lane sends its next message as soon as its previous one is confirmed,
            # so ``window`` publishes are in flight; iterating a shared iterator from
            # several tasks is safe because there is no await between next() calls.
            for message in source:
                error = await self._publish_one(message)
                if error is None:
                    confirmed += 1
                else:
                    failed.append((message, error))

        await asyncio.gather(*(lane() for _ in range(self.window)))
        if failed:
            jobs = sum(m.jobs for m, _ in failed)
            raise TransientError(
                f"{len(failed)} message(s) holding {jobs} job(s) were not confirmed by "
                f"RabbitMQ after {self.attempts} attempts; last error: {failed[-1][1]}",
                Reason.BROKER,
            )
        return confirmed

    async def _publish_one(self, message: Outgoing) -> str | None:
        error = ""
        for attempt in range(self.attempts):
            try:
                await self.channel.default_exchange.publish(
                    message.to_message(),
                    routing_key=message.routing_key,
                    mandatory=True,
                    timeout=self.confirm_timeout_s,
                )
                return None
            except _PUBLISH_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "publish not confirmed; retrying",
                    queue=message.routing_key,
                    jobs=message.jobs,
                    attempt=attempt + 1,
                    error=error,
                )
                await asyncio.sleep(backoff_delay_s(attempt, 0.2, 3.0))
                # A robust channel reopens by itself after a connection loss; wait for it
                # (briefly) rather than burn the retries against a closed channel.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.channel.ready(), timeout=10.0)
        return error
