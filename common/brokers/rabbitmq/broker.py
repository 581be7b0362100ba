"""The RabbitMQ adapter of the Broker protocol (aio-pika).

- Two work queues, ``live`` and ``bulk``, each consumed on its own channel with its own
  prefetch; deliveries are handed to the pipeline live-first, so a CMS change never waits
  behind the nightly backlog.
- A message may carry several jobs (``application/x-ndjson``). Each job is its own
  ``Delivery``; the AMQP message is acked once every job in it is settled, and a job that
  fails is retried or dead-lettered alone, by publishing it on its own.
- Retries go through per-step delay queues (TTL, then dead-lettered back to the work
  queue); the DLQ message is the job's original bytes with the reason, error and attempt
  count in its headers. Both publishes are confirmed before the job counts as settled.
- Acks only ever go to the channel a message came from. After a connection loss the
  robust connection reopens channels and consumers by themselves; jobs from the lost
  channel are dropped unacked (the broker redelivers them) and their settlements become
  no-ops, which keeps every job's outcome effectively-once. ``is_connected()`` (readiness)
  is false from the loss until every channel is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiormq.exceptions
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

import common.brokers.rabbitmq.dlq as rabbitmq_dlq
import common.brokers.rabbitmq.stats as rabbitmq_stats
from common.brokers.base import ActOnLetters, DeadLetter, Delivery, LaneStats, Pick
from common.brokers.rabbitmq.connect import connection_url, open_connection
from common.brokers.rabbitmq.ledger import (
    bcc_headers,
    capacity_calls,
    ledger_arguments,
    ledger_queue,
    read_job_ids,
)
from common.brokers.rabbitmq.publish import (
    JOB_CONTENT_TYPE,
    RAW_CONTENT_TYPE,
    ConfirmedPublisher,
    Outgoing,
    pack,
    unpack,
)
from common.brokers.rabbitmq.topology import LANES, Topology, delay_steps_ms
from common.config import BrokerConfig, mask_url
from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import get_logger
from common.schema import Job

MAX_ERROR_CHARS = 4000
_T = TypeVar("_T")
_SETTLE_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


@dataclass(eq=False)
class _Inbound:
    """One AMQP message and how many of its jobs are still unsettled.

    Compared and hashed by identity (``eq=False``): two records with equal fields are
    still two messages, and the reconnect handler collects them in a set.
    """

    message: AbstractIncomingMessage
    lane: str
    open_jobs: int
    received_at_s: float
    hand_back: bool = False

    def is_stale(self) -> bool:
        """True once the channel it came on is gone: the broker will redeliver it."""
        try:
            return bool(self.message.channel.is_closed)
        except aiormq.exceptions.ChannelInvalidStateError:
            return True


class RabbitMQBroker:
    def __init__(
        self,
        config: BrokerConfig,
        *,
        prefetch: int | None = None,
        connection_name: str = "imgfleet",
    ) -> None:
        self.config = config
        self.prefetch_jobs = prefetch or config.prefetch or 256
        self.connection_name = connection_name
        self.topology = Topology(
            prefix=config.name_prefix,
            queue_type=config.rabbitmq.queue_type,
            delay_steps_ms=delay_steps_ms(
                config.retry_base_s,
                config.retry_max_s,
                config.max_attempts,
                config.retry_after_max_s,
            ),
        )
        self.log = get_logger("rabbitmq", broker=self._shown_url())
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._admin_channel: AbstractRobustChannel | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._ledgers: set[str] = set()  # ledger queues declared by this connection
        self._consume_channels: dict[str, AbstractRobustChannel] = {}
        self._consumer_tags: dict[str, tuple[AbstractQueue, str]] = {}
        self._ready: dict[str, deque[Delivery]] = {lane: deque() for lane in LANES}
        self._arrived = asyncio.Event()
        self._held: dict[str, _Inbound] = {}  # delivery token -> its message
        self._seq = 0
        self._bulk_qos = 0
        self._jobs_per_message_seen = float(config.rabbitmq.jobs_per_message)
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        self._link_up = False  # readiness: connected, or reconnected after a loss
        self._resize_lock = asyncio.Lock()

    def _shown_url(self) -> str:
        try:
            return mask_url(connection_url(self.config))
        except ConfigError:
            return "<invalid url>"

    def __repr__(self) -> str:
        return f"RabbitMQBroker({self._shown_url()}, prefix={self.config.name_prefix!r})"

    # -- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None:
        connection = await open_connection(self.config, self.connection_name)
        self._connection = connection
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_connection_lost)
        self._publish_channel = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._admin_channel = await connection.channel(publisher_confirms=False)
        await self._declare_topology(self._publish_channel)
        self._publisher = ConfirmedPublisher(
            self._publish_channel, window=self.config.rabbitmq.publish_window
        )
        self._link_up = True
        self.log.info(
            "connected",
            queue_type=self.topology.queue_type,
            delay_steps_ms=list(self.topology.delay_steps_ms),
        )

    def is_connected(self) -> bool:
        """Up since connect() or the last reconnect (channels restored); False while lost.

        The flag the connection callbacks keep is checked against the connection itself,
        so a close that no callback reported still reads as down.
        """
        connection = self._connection
        return (
            self._link_up
            and connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
        )

    @property
    def assigned_partitions(self) -> int | None:
        return None  # consumers share each queue; nothing is assigned

    async def _declare_topology(self, channel: AbstractRobustChannel) -> None:
        for name, arguments in self.topology.all_queues():
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigError(
                    f"queue {name!r} exists with other settings than this configuration "
                    f"asks for (broker.rabbitmq.queue_type={self.topology.queue_type!r}, "
                    f"retry steps {list(self.topology.delay_steps_ms)} ms): {exc}. Use "
                    "the same settings fleet-wide, or another broker.name_prefix."
                ) from exc

    # The robust connection runs these callbacks, logs what one raises as a one-line
    # library message and carries on. So each sets the link flag first, with nothing
    # before it that can fail, and reports its own failures with a traceback: a crash
    # before the flag once left a reconnected worker unready until it gave up on a
    # broker it was talking to (issue 21, D2).

    def _on_connection_lost(self, *_: Any) -> None:
        was_up, self._link_up = self._link_up, False
        if self._closing or not was_up:
            return  # each failed reconnect attempt closes again; the library logs those
        self.log.warning("connection lost; reconnecting", unsettled_jobs=len(self._held))

    def _on_reconnect(self, *_: Any) -> None:
        # Called once every channel, consumers included, is restored: the link is up.
        self._link_up = not self._closing
        try:
            stale = self._drop_stale_ready()
            self.log.info("reconnected", **stale)
        except Exception:
            self.log.error(
                "reconnect bookkeeping failed; the link is up and stale jobs are "
                "dropped when they are next handed out or settled",
                exc_info=True,
            )

    def _drop_stale_ready(self) -> dict[str, int]:
        """Forget jobs of lost channels that the pipeline has not taken yet.

        The broker redelivers their messages on the new channels, so handing them out
        would only do each job twice. Jobs already in the pipeline stay held: their
        settlement finds the channel gone and becomes a no-op.
        """
        messages = {inbound for inbound in self._held.values() if inbound.is_stale()}
        dropped = 0
        for lane in LANES:
            kept: deque[Delivery] = deque()
            for delivery in self._ready[lane]:
                inbound = self._held.get(delivery.token)
                if inbound is not None and inbound in messages:
                    self._forget(delivery.token, inbound)
                    dropped += 1
                elif inbound is not None:
                    kept.append(delivery)
            self._ready[lane] = kept
        return {"stale_messages": len(messages), "stale_jobs_dropped": dropped}

    async def close(self) -> None:
        self._closing = True
        self._link_up = False
        if self._watchdog:
            self._watchdog.cancel()
        await self._stop_consumers()
        if self._connection is not None:
            # Closing returns every unacked message to its queue.
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = None

    def _require(self, thing: _T | None) -> _T:
        """A connection-scoped object, or a clear error when connect() has not run."""
        if thing is None:
            raise TransientError("not connected to RabbitMQ (call connect first)", Reason.BROKER)
        return thing

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, jobs: Sequence[Job], ledger: str | None = None) -> None:
        per_message = self.config.rabbitmq.jobs_per_message
        bodies: dict[str, list[bytes]] = {lane: [] for lane in LANES}
        for job in jobs:
            bodies[job.lane].append(job.to_bytes())  # Lane is a StrEnum: a str key
        messages: list[Outgoing] = []
        for lane in LANES:
            messages += pack(self.topology.work_queue(lane), bodies[lane], per_message)
        if ledger is not None:
            # One publish reaches the lane queue and the ledger (common.brokers.rabbitmq.ledger).
            headers = bcc_headers(await self._declare_ledger(ledger))
            for message in messages:
                message.headers.update(headers)
        await self._require(self._publisher).publish(messages)

    # -- publish ledger (common.brokers.rabbitmq.ledger) -------------------------------------------

    def ledger_capacity(self, batch_jobs: int) -> int | None:
        r = self.config.rabbitmq
        return capacity_calls(
            max_messages=r.ledger_max_messages,
            publish_window=r.publish_window,
            jobs_per_message=r.jobs_per_message,
            batch_jobs=batch_jobs,
            lanes=len(LANES),
        )

    async def _declare_ledger(self, ledger: str) -> str:
        queue = ledger_queue(self.config.name_prefix, ledger)
        if queue in self._ledgers:
            return queue
        channel = await self._require(self._connection).channel(publisher_confirms=False)
        try:
            # Not robust: a reconnect must not bring back a ledger dropped meanwhile.
            await channel.declare_queue(
                queue,
                durable=True,
                arguments=ledger_arguments(self.config.rabbitmq.ledger_max_messages),
                robust=False,
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"ledger queue {queue!r} exists with another x-max-length than "
                f"broker.rabbitmq.ledger_max_messages={self.config.rabbitmq.ledger_max_messages}"
                f": {exc}. Resume with the setting the run started with."
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._ledgers.add(queue)
        return queue

    async def ledger_mark(self, ledger: str) -> dict[str, int]:
        await self._declare_ledger(ledger)
        return {}  # the ledger is bounded by its length; nothing to remember

    async def ledger_job_ids(self, ledger: str, since: dict[str, int] | None = None) -> set[str]:
        queue = ledger_queue(self.config.name_prefix, ledger)
        try:
            return await read_job_ids(self._require(self._connection), queue)
        except _SETTLE_ERRORS as exc:
            raise TransientError(f"could not read ledger {queue!r}: {exc}", Reason.BROKER) from exc

    async def drop_ledger(self, ledger: str) -> None:
        queue = ledger_queue(self.config.name_prefix, ledger)
        channel = await self._require(self._connection).channel(publisher_confirms=False)
        try:
            await channel.queue_delete(queue)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._ledgers.discard(queue)

    async def publish_raw(self, bodies: Sequence[bytes], lane: str = "bulk") -> None:
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        queue = self.topology.work_queue(lane)
        await self._require(self._publisher).publish(
            Outgoing(queue, body, RAW_CONTENT_TYPE) for body in bodies
        )

    # -- consuming ----------------------------------------------------------------------

    async def consume(self) -> AsyncIterator[Delivery]:
        await self._start_consumers()
        self._watchdog = asyncio.create_task(self._watch_held_deliveries())
        try:
            while True:
                delivery = self._next_ready()
                if delivery is None:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                yield delivery
        finally:
            self._watchdog.cancel()
            await self._stop_consumers()

    def _next_ready(self) -> Delivery | None:
        for lane in LANES:  # live first
            queue = self._ready[lane]
            while queue:
                delivery = queue.popleft()
                inbound = self._held.get(delivery.token)
                if inbound is None:
                    continue
                if inbound.is_stale():
                    self._forget(delivery.token, inbound)
                    continue
                return delivery
        return None

    async def _start_consumers(self) -> None:
        connection = self._require(self._connection)
        for lane in LANES:
            if lane in self._consumer_tags:
                continue
            channel = await connection.channel(publisher_confirms=False)
            self._consume_channels[lane] = channel
            if lane == "live":
                await channel.set_qos(prefetch_count=self.config.rabbitmq.live_prefetch)
            else:
                await self._set_bulk_qos(channel)
            queue = await channel.declare_queue(
                self.topology.work_queue(lane),
                durable=True,
                arguments=self.topology.work_arguments(),
            )

            callback = self._on_live if lane == "live" else self._on_bulk
            tag = await queue.consume(callback, no_ack=False)
            self._consumer_tags[lane] = (queue, tag)

    def _bulk_window(self) -> int:
        # Prefetch is counted in jobs (the pipeline's capacity), RabbitMQ counts messages;
        # a message may carry many jobs, so the message window follows what arrives.
        wanted = max(2, math.ceil(self.prefetch_jobs / max(self._jobs_per_message_seen, 1.0)))
        return min(wanted, max(self.prefetch_jobs, 2))

    async def _set_bulk_qos(self, channel: AbstractRobustChannel) -> None:
        self._bulk_qos = self._bulk_window()
        await channel.set_qos(prefetch_count=self._bulk_qos)

    async def _resize_bulk_window(self) -> None:
        """Apply a new message window to the running bulk consumer.

        A per-consumer prefetch only binds consumers started after it (and quorum queues
        have no channel-wide one), so the consumer is re-registered on the same channel:
        its unacked messages stay where they are and are acked as usual.
        """
        async with self._resize_lock:
            channel = self._consume_channels.get("bulk")
            consumer = self._consumer_tags.get("bulk")
            if channel is None or consumer is None or self._bulk_window() == self._bulk_qos:
                return
            queue, tag = consumer
            await self._set_bulk_qos(channel)
            await queue.cancel(tag)
            self._consumer_tags["bulk"] = (queue, await queue.consume(self._on_bulk, no_ack=False))
            self.log.debug("bulk prefetch resized", messages=self._bulk_qos)

    async def _stop_consumers(self) -> None:
        for lane, (queue, tag) in list(self._consumer_tags.items()):
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            self._consumer_tags.pop(lane, None)
        # Jobs received but never handed to the pipeline go straight back. The channels
        # stay open: jobs already in the pipeline are still acked on them while it drains.
        for lane in LANES:
            ready, self._ready[lane] = self._ready[lane], deque()
            for delivery in ready:
                inbound = self._held.get(delivery.token)
                if inbound is not None:
                    inbound.hand_back = True
                    await self._settle(delivery.token)

    async def _on_live(self, message: AbstractIncomingMessage) -> None:
        await self._receive(message, "live")

    async def _on_bulk(self, message: AbstractIncomingMessage) -> None:
        await self._receive(message, "bulk")

    async def _receive(self, message: AbstractIncomingMessage, lane: str) -> None:
        bodies = unpack(message.body, message.content_type)
        if not bodies:
            # An empty packed message holds no job; nothing to do but ack it.
            with contextlib.suppress(*_SETTLE_ERRORS):
                await message.ack()
            return
        inbound = _Inbound(message, lane, len(bodies), time.monotonic())
        for index, body in enumerate(bodies):
            self._seq += 1
            token = f"{lane}.{message.delivery_tag}.{index}.{self._seq}"
            self._held[token] = inbound
            self._ready[lane].append(
                Delivery(
                    body=body,
                    delivery_id=token,
                    token=token,
                    redelivered=bool(message.redelivered),
                )
            )
        self._arrived.set()
        if lane == "bulk":
            await self._follow_jobs_per_message(len(bodies))

    async def _follow_jobs_per_message(self, jobs: int) -> None:
        # Fast to react (halfway per message): a window sized for 100-job messages holds
        # only a couple of single-job messages and would starve the pipeline until it grows.
        self._jobs_per_message_seen = 0.5 * self._jobs_per_message_seen + 0.5 * jobs
        wanted = self._bulk_window()
        if wanted > self._bulk_qos or wanted < self._bulk_qos / 1.5:
            try:
                await self._resize_bulk_window()
            except _SETTLE_ERRORS as exc:
                self.log.warning("could not resize the bulk prefetch", error=str(exc))

    # -- settling -----------------------------------------------------------------------

    def _forget(self, token: str, inbound: _Inbound) -> None:
        self._held.pop(token, None)
        inbound.open_jobs -= 1

    async def _settle(self, token: str) -> None:
        """One job of a message is done; ack (or hand back) the message with its last job."""
        inbound = self._held.pop(token, None)
        if inbound is None:
            return
        inbound.open_jobs -= 1
        if inbound.open_jobs > 0 or inbound.is_stale():
            return
        try:
            if inbound.hand_back:
                await inbound.message.nack(requeue=True)
            else:
                await inbound.message.ack()
        except _SETTLE_ERRORS as exc:
            # The channel went away between the check and the ack: the broker redelivers
            # the message and replaying its jobs changes nothing in the index.
            self.log.info("ack not sent; message will be redelivered", error=str(exc))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self._settle(delivery.token)

    async def nack(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back for redelivery (the shutdown path)."""
        for delivery in deliveries:
            inbound = self._held.get(delivery.token)
            if inbound is not None:
                inbound.hand_back = True
            await self._settle(delivery.token)

    async def _publish_settlement(self, delivery: Delivery, message: Outgoing) -> None:
        inbound = self._held.get(delivery.token)
        if inbound is None or inbound.is_stale():
            # Lost with its channel and already on its way back to the queue: publishing
            # now would retry or dead-letter the job twice.
            self._held.pop(delivery.token, None)
            return
        try:
            await self._require(self._publisher).publish([message])
        except TransientError as exc:
            # Not durable, so not settled: hand the job back for a fresh attempt.
            self.log.error("could not publish the job's outcome; handing it back", error=str(exc))
            inbound.hand_back = True
        await self._settle(delivery.token)

    async def retry(self, delivery: Delivery, job: Job, delay_s: float) -> None:
        lane = job.lane.value
        step_ms = self.topology.step_for(delay_s)
        if step_ms is None:
            target, expiration_s = self.topology.work_queue(lane), None
        else:
            # The queue's TTL is the step's ceiling; the per-message TTL carries the jitter.
            target, expiration_s = self.topology.delay_queue(lane, step_ms), delay_s
        message = Outgoing(
            target,
            job.to_bytes(),
            JOB_CONTENT_TYPE,
            message_id=job.job_id,
            expiration_s=expiration_s,
        )
        await self._publish_settlement(delivery, message)

    async def dead_letter(
        self, delivery: Delivery, reason: str, error: str, attempts: int, job: Job | None
    ) -> None:
        headers: dict[str, Any] = {
            "x-imgfleet-reason": reason,
            "x-imgfleet-error": error[:MAX_ERROR_CHARS],
            "x-imgfleet-attempts": attempts,
            # AMQP tables carry floats as 32-bit: milliseconds as an integer keep precision.
            "x-imgfleet-failed-at-ms": int(time.time() * 1000),
        }
        if job is not None:
            headers.update(
                {
                    "x-imgfleet-run-id": job.run_id,
                    "x-imgfleet-item-id": job.item_id,
                    "x-imgfleet-lane": job.lane.value,
                }
            )
        message = Outgoing(
            self.topology.dead_letter_queue,
            delivery.body,  # the original bytes, unchanged
            RAW_CONTENT_TYPE if job is None else JOB_CONTENT_TYPE,
            headers=headers,
            message_id=job.job_id if job else None,
        )
        await self._publish_settlement(delivery, message)

    async def _watch_held_deliveries(self) -> None:
        # RabbitMQ closes a channel whose delivery stays unacked past consumer_timeout and
        # redelivers everything on it; long before that, say which jobs are stuck.
        limit_s = self.config.rabbitmq.consumer_timeout_s / 4
        while True:
            await asyncio.sleep(min(limit_s / 4, 30.0))
            now = time.monotonic()
            oldest = min((i.received_at_s for i in self._held.values()), default=now)
            if now - oldest > limit_s:
                self.log.error(
                    "a delivery has been held too long; the broker will take it back at "
                    "consumer_timeout",
                    held_s=round(now - oldest, 1),
                    consumer_timeout_s=self.config.rabbitmq.consumer_timeout_s,
                )

    # -- inspection -----------------------------------------------------------------------

    async def depths(self) -> dict[str, int]:
        """Ready messages per queue (messages, not jobs: one may carry many)."""
        counts = await rabbitmq_stats.queue_counts(
            self._require(self._admin_channel), self.topology
        )
        return {name: ready for name, (ready, _) in counts.items()}

    async def pending(self) -> int:
        try:
            depths = await self.depths()
        except _SETTLE_ERRORS as exc:
            raise TransientError(f"could not read queue depths: {exc}", Reason.BROKER) from exc
        waiting = sum(n for name, n in depths.items() if name != self.topology.dead_letter_queue)
        return waiting + len(self._held)

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Read up to ``limit`` dead-lettered jobs without removing them.

        A worker killed after a job's DLQ publish was confirmed but before the job's
        message was acked leaves the job to be dead-lettered again by the next worker; both
        records carry the job id, and the copy is collapsed here so every job reads once.
        """
        connection = self._require(self._connection)
        try:
            return await rabbitmq_dlq.read_dead_letters(connection, self.topology, limit)
        except _SETTLE_ERRORS as exc:
            raise TransientError(f"RabbitMQ: reading the DLQ: {exc}", Reason.BROKER) from exc

    async def settle_dead_letters(
        self, select: Pick, act: ActOnLetters, *, limit: int | None = None, batch_size: int = 500
    ) -> int:
        return await rabbitmq_dlq.settle_dead_letters(
            self._require(self._connection),
            self.topology,
            select,
            act,
            limit=limit,
            batch_size=batch_size,
            pass_time_s=self.config.rabbitmq.consumer_timeout_s / 3,
        )

    async def lane_stats(self) -> list[LaneStats]:
        channel = self._require(self._admin_channel)
        try:
            return await rabbitmq_stats.lane_stats(channel, self.topology)
        except _SETTLE_ERRORS as exc:
            raise TransientError(f"RabbitMQ: reading queue figures: {exc}", Reason.BROKER) from exc

    async def delete_topology(self) -> int:
        """Delete every queue of this prefix, messages included (tests and decommissioning)."""
        channel = self._require(self._admin_channel)
        deleted = 0
        for name, _ in self.topology.all_queues():
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.queue_delete(name)
                deleted += 1
        return deleted
