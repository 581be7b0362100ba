"""The RabbitMQ dead-letter queue for ops tools: read, settle and count, never lose a letter.

Letters are read on a private channel without auto-ack (a consumer with no prefetch limit
streams them; ``basic.get`` costs a round trip per letter). A letter that is not selected
is simply left unacked: closing the channel puts it back.
A selected one is acked only after the caller's action on it returned (a confirmed
republish, an archive write). While a channel holds unacked messages the server's
``consumer_timeout`` runs; a pass therefore stops reading well before it, settles what it
holds and hands the rest back, and the next pass starts again at the head of the queue.

A worker killed between its DLQ publish and its ack dead-letters the job again, so two
messages may carry one job id. Readers list such copies once; settling removes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiormq.exceptions
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from common.brokers.base import ActOnLetters, DeadLetter, Pick
from common.brokers.rabbitmq.topology import Topology
from common.errors import Reason, TransientError
from common.identity import content_hash
from common.observability.logging import get_logger

log = get_logger("rabbitmq.dlq")

AMQP_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)
_T = TypeVar("_T")
RETURN_WAIT_S = 10.0  # how long a hand-back may take to show in the queue
READ_IDLE_S = 5.0  # no delivery for this long: the rest is held by another reader
READ_PREFETCH = 1000  # DLQs up to this many letters are read by a consumer


def dead_letter_of(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}

    def number(key: str) -> int:
        value = headers.get(key)
        return int(value) if isinstance(value, int | float | str) else 0

    def text(key: str) -> str | None:
        value = headers.get(key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    return DeadLetter(
        dlq_id=letter_key(message),
        body=message.body,
        reason=text("x-imgfleet-reason") or "unknown",
        error=text("x-imgfleet-error") or "",
        attempts=number("x-imgfleet-attempts"),
        failed_at_s=number("x-imgfleet-failed-at-ms") / 1000,
        run_id=text("x-imgfleet-run-id"),
        item_id=text("x-imgfleet-item-id"),
    )


def letter_key(message: AbstractIncomingMessage) -> str:
    """The job id; a message that was never a job (no id) is named by its bytes.

    Delivery tags change with every read, so they cannot name a letter for `dlq show`.
    """
    return message.message_id or f"body-{content_hash(message.body)}"


def copy_key(message: AbstractIncomingMessage) -> str:
    """What makes two DLQ messages copies of one letter: the same job id.

    A message without an id (a body that never parsed as a job) is a letter of its own:
    two equal junk bodies are two failures. Its key is only good within one channel.
    """
    return message.message_id or f"tag-{message.delivery_tag}"


async def _open_dlq(connection: AbstractRobustConnection, topology: Topology) -> _Reader:
    # A private, non-robust channel: closing it (or losing it) returns every unacked read.
    channel = await connection.channel(publisher_confirms=False)
    queue = await channel.declare_queue(
        topology.dead_letter_queue,
        durable=True,
        arguments=topology.work_arguments(),
        robust=False,
    )
    reader = _Reader(channel, queue, int(queue.declaration_result.message_count or 0))
    await reader.start()
    return reader


class _Reader:
    """The messages the DLQ held when the read began, each delivered once, none acked.

    Up to ``READ_PREFETCH`` letters, one consumer pushes them (about 8000/s from a quorum
    queue on loopback). Beyond that, ``basic.get`` takes them one round trip at a time
    (about 800/s): a consumer holds at most its prefetch unacked (a quorum queue caps even
    an "unlimited" one at 2000), and a quorum queue hands back the messages of several
    consumers consumer by consumer, which would shuffle the letters left in the queue.
    Messages that arrive after the read began are left for the next read.
    """

    def __init__(self, channel: AbstractRobustChannel, queue: Any, expected: int) -> None:
        self.channel = channel
        self._queue = queue
        self._expected = expected
        self._taken = 0
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None

    async def start(self) -> None:
        if 0 < self._expected <= READ_PREFETCH:
            await self.channel.set_qos(prefetch_count=READ_PREFETCH)
            self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def next(self) -> AbstractIncomingMessage | None:
        """The next message, or None once all of them were read (or none comes for a while:
        another reader holds the rest)."""
        if self._taken >= self._expected:
            return None
        if self._tag is None:
            message: AbstractIncomingMessage | None = await self._queue.get(
                no_ack=False, fail=False
            )
            if message is None:
                return None
        else:
            try:
                message = await asyncio.wait_for(self._inbox.get(), READ_IDLE_S)
            except TimeoutError:
                return None
        self._taken += 1
        return message

    async def stop(self) -> int:
        """Stop the consumer; return how many delivered messages were never taken."""
        if self._tag is not None:
            with contextlib.suppress(*AMQP_ERRORS):
                await self._queue.cancel(self._tag)
            self._tag = None
        return self._inbox.qsize()


async def read_dead_letters(
    connection: AbstractRobustConnection, topology: Topology, limit: int
) -> list[DeadLetter]:
    """Up to ``limit`` letters in queue order, copies collapsed, nothing removed."""
    reader = await _open_dlq(connection, topology)
    letters: list[DeadLetter] = []
    seen: set[str] = set()
    held = 0
    try:
        # Read to the end even past ``limit``: a quorum queue puts messages handed back
        # behind the ones it handed back before, so only a whole read keeps the order.
        while True:
            message = await reader.next()
            if message is None:
                break
            held += 1
            key = copy_key(message)
            if key in seen or len(letters) >= limit:
                continue
            seen.add(key)
            letters.append(dead_letter_of(message))
    finally:
        await _give_back(connection, topology, reader, held)
    return letters


async def _give_back(
    connection: AbstractRobustConnection, topology: Topology, reader: _Reader, held: int
) -> None:
    """Close a private channel, returning the ``held`` letters it has not acked, and wait
    until the queue shows them again.

    A quorum queue takes returned messages back asynchronously: a read right after the
    close (the next command, a status right after a requeue) could otherwise miss them.
    """
    name = topology.dead_letter_queue
    channel = reader.channel
    held += await reader.stop()
    ready_before: int | None = None
    if held:
        with contextlib.suppress(*AMQP_ERRORS):
            queue = await channel.declare_queue(name, passive=True, robust=False)
            ready_before = int(queue.declaration_result.message_count or 0)
    with contextlib.suppress(Exception):
        await channel.close()
    if ready_before is None:
        return
    deadline_s = time.monotonic() + RETURN_WAIT_S
    try:
        probe = await connection.channel(publisher_confirms=False)
        try:
            while time.monotonic() < deadline_s:
                queue = await probe.declare_queue(name, passive=True, robust=False)
                if int(queue.declaration_result.message_count or 0) >= ready_before + held:
                    return
                await asyncio.sleep(0.02)
        finally:
            with contextlib.suppress(Exception):
                await probe.close()
    except AMQP_ERRORS as exc:
        log.info("could not watch dead letters return to the queue", error=str(exc))
        return
    log.warning("dead letters handed back are not all visible yet", held=held)


@dataclass
class _Batch:
    """Selected letters and every message (copies too) that goes once they are acted on."""

    letters: list[DeadLetter] = field(default_factory=list)
    messages: dict[str, list[AbstractIncomingMessage]] = field(default_factory=dict)

    def add(self, key: str, letter: DeadLetter, message: AbstractIncomingMessage) -> None:
        self.letters.append(letter)
        self.messages[key] = [message]

    @property
    def message_count(self) -> int:
        return sum(len(messages) for messages in self.messages.values())


async def settle_dead_letters(
    connection: AbstractRobustConnection,
    topology: Topology,
    select: Pick,
    act: ActOnLetters,
    *,
    limit: int | None,
    batch_size: int,
    pass_time_s: float,
) -> int:
    settled_keys: set[str] = set()  # job ids acted on and acked, across passes
    settled = 0
    while True:
        left = None if limit is None else limit - settled
        if left is not None and left <= 0:
            return settled
        done, finished = await _settle_pass(
            connection, topology, select, act, settled_keys, left, batch_size, pass_time_s
        )
        settled += done
        if finished:
            return settled
        if done == 0:
            raise TransientError(
                "RabbitMQ: the dead-letter queue could not be scanned within a third of "
                "consumer_timeout; raise broker.rabbitmq.consumer_timeout_s (and the "
                "server's consumer_timeout) or narrow the filter",
                Reason.BROKER,
            )
        log.info("dead-letter pass ended before the queue did; starting another", settled=done)


async def _settle_pass(
    connection: AbstractRobustConnection,
    topology: Topology,
    select: Pick,
    act: ActOnLetters,
    settled_keys: set[str],
    limit: int | None,
    batch_size: int,
    pass_time_s: float,
) -> tuple[int, bool]:
    """One scan from the head of the queue: (letters settled, whether the scan got to the end)."""
    deadline_s = time.monotonic() + pass_time_s
    reader = await _amqp("opening the DLQ", _open_dlq(connection, topology))
    passed_over: set[str] = set()  # not selected in this pass; their copies stay too
    held = 0  # read and not acked: they go back when the channel closes
    batch = _Batch()
    settled = 0
    finished = False
    try:
        while time.monotonic() <= deadline_s:
            message = await reader.next()
            if message is None:
                finished = True
                break
            key = copy_key(message)
            if key in settled_keys:
                # A copy of a letter already acted on.
                await _amqp("removing a dead letter", message.ack())
                continue
            held += 1
            if key in batch.messages:
                batch.messages[key].append(message)
                continue
            # Past the limit the scan reads on without taking: everything handed back must
            # go back together to keep its order (see read_dead_letters).
            full = limit is not None and settled + len(batch.letters) >= limit
            if full or key in passed_over:
                continue
            letter = dead_letter_of(message)
            if not select(letter):
                passed_over.add(key)
                continue
            batch.add(key, letter, message)
            if len(batch.letters) >= batch_size or (
                limit is not None and settled + len(batch.letters) >= limit
            ):
                settled += await _settle_batch(batch, act, settled_keys)
                held -= batch.message_count
                batch = _Batch()
        settled += await _settle_batch(batch, act, settled_keys)
        held -= batch.message_count
    finally:
        await _give_back(connection, topology, reader, held)
    return settled, finished


async def _amqp(what: str, operation: Awaitable[_T]) -> _T:
    """Await one AMQP operation; its failures become a TransientError naming ``what``."""
    try:
        return await operation
    except AMQP_ERRORS as exc:
        raise TransientError(f"RabbitMQ: {what}: {exc}", Reason.BROKER) from exc


async def _settle_batch(batch: _Batch, act: ActOnLetters, settled_keys: set[str]) -> int:
    if not batch.letters:
        return 0
    await act(list(batch.letters))
    try:
        for key, messages in batch.messages.items():
            for message in messages:
                await message.ack()
            if messages[0].message_id:  # only job ids can have copies in a later pass
                settled_keys.add(key)
    except AMQP_ERRORS as exc:
        # Acted on but not removed: they come back with the channel, and running the same
        # command again acts on them a second time (a requeue then publishes a job twice,
        # which the index absorbs).
        raise TransientError(
            f"RabbitMQ: {len(batch.letters)} dead letters were handled but could not be "
            f"removed ({exc}); they are back in the DLQ",
            Reason.BROKER,
        ) from exc
    return len(batch.letters)
