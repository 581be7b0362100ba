"""What only the RabbitMQ adapter does, against the real server: jobs packed several to a
message, the hand-back of a stopped consumer's prefetch, topology declarations, connection
errors and cuts, and raw bodies beside packed ones.

The semantics every adapter shares are in tests/contract/test_broker_contract.py (where
RabbitMQ runs with one job per message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from structlog.testing import capture_logs

from common.brokers.base import Delivery
from common.brokers.rabbitmq.broker import RabbitMQBroker
from common.errors import ConfigError, TransientError
from common.schema import Job, Lane, decode_job
from tests.support.aio import nothing_more, run_async, take
from tests.support.rabbitmq import Connect, broker_config, connected
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

ONE_JOB_PER_MESSAGE = {"rabbitmq": {"jobs_per_message": 1}}


def _jobs(n: int, prefix: str = "item", lane: Lane = Lane.BULK) -> list[Job]:
    return [
        Job(item_id=f"{prefix}-{i}", url=f"http://img.test/{i}.jpg", lane=lane) for i in range(n)
    ]


@run_async
async def test_jobs_of_multi_job_messages_are_each_consumed_once_and_acked(rabbit: Connect) -> None:
    async with rabbit() as broker:
        jobs = _jobs(1234)
        await broker.publish(jobs)  # 13 messages of up to 100 jobs (the default packing)
        stream = broker.consume()
        got: list[Delivery] = []
        while len(got) < len(jobs):  # ack as we go: the prefetch window is 64 jobs
            chunk = await take(stream, min(50, len(jobs) - len(got)), 20)
            await broker.ack(chunk)
            got += chunk
        assert sorted(decode_job(d.body).item_id for d in got) == sorted(j.item_id for j in jobs)
        assert len({d.delivery_id for d in got}) == len(got)
        assert await nothing_more(stream)
        assert await broker.pending() == 0
        await stream.aclose()  # type: ignore[attr-defined]
    # Acked means gone: a new consumer finds nothing.
    async with rabbit() as again:
        assert await again.pending() == 0


@run_async
async def test_one_failing_job_in_a_multi_job_message_is_retried_alone(rabbit: Connect) -> None:
    async with rabbit() as broker:
        jobs = _jobs(50)
        await broker.publish(jobs)  # one message of 50 jobs
        stream = broker.consume()
        got = await take(stream, 50, 20)
        failing = next(d for d in got if decode_job(d.body).item_id == "item-7")
        job = decode_job(failing.body)
        await broker.retry(failing, job.next_attempt(), 0.3)
        await broker.ack([d for d in got if d is not failing])
        (back,) = await take(stream, 1, 20)
        again = decode_job(back.body)
        assert (again.item_id, again.attempt, again.job_id) == ("item-7", 1, job.job_id)
        await broker.ack([back])
        assert await nothing_more(stream), "a settled job came back"
        await stream.aclose()  # type: ignore[attr-defined]


@run_async
async def test_stopping_the_consumer_hands_back_jobs_not_yet_started(rabbit: Connect) -> None:
    jobs = _jobs(40)
    async with rabbit(prefetch=20, **ONE_JOB_PER_MESSAGE) as first:
        await first.publish(jobs)
        stream = first.consume()
        started = await take(stream, 5, 20)
        await asyncio.sleep(0.3)  # the rest of the prefetch window arrives
        await stream.aclose()  # type: ignore[attr-defined]
        await first.ack(started)  # in-flight work still settles on the open channel
    # Everything not started is back in the queue, once, for the next consumer.
    async with rabbit(**ONE_JOB_PER_MESSAGE) as again:
        stream2 = again.consume()
        rest = await take(stream2, 35, 20)
        await again.ack(rest)
        assert await nothing_more(stream2)
        assert {d.body for d in rest} == {j.to_bytes() for j in jobs} - {d.body for d in started}
        await stream2.aclose()  # type: ignore[attr-defined]


@run_async
async def test_topology_is_declared_idempotently_and_mismatches_are_explained(
    rabbitmq_url: str, rabbit_prefix: str
) -> None:
    async with (
        connected(rabbitmq_url, rabbit_prefix) as producer,
        connected(rabbitmq_url, rabbit_prefix) as worker,  # same declarations again
    ):
        await producer.publish(_jobs(3))
        assert await worker.pending() == 1  # one message of three jobs
    other = RabbitMQBroker(
        broker_config(rabbitmq_url, rabbit_prefix, rabbitmq={"queue_type": "classic"})
    )
    with pytest.raises(ConfigError, match="queue_type"):
        await other.connect()
    await other.close()


@run_async
async def test_bad_credentials_and_an_unreachable_broker_give_clear_errors(
    rabbitmq_url: str, rabbit_prefix: str
) -> None:
    wrong = RabbitMQBroker(
        broker_config(rabbitmq_url, rabbit_prefix, username="guest", password="wrong-pass")
    )
    with pytest.raises(ConfigError, match="refused the credentials") as refused:
        await wrong.connect()
    assert "wrong-pass" not in str(refused.value)
    down = RabbitMQBroker(
        broker_config(
            "amqp://guest:topsecret@127.0.0.1:1/",
            rabbit_prefix,
            rabbitmq={"connect_timeout_s": 0.5},
        )
    )
    with pytest.raises(TransientError, match="unreachable") as unreachable:
        await down.connect()
    assert "topsecret" not in str(unreachable.value)
    assert "guest:***@127.0.0.1:1" in str(unreachable.value)


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_after_a_connection_cut_stale_jobs_are_redelivered_and_publishing_resumes(
    rabbit_prefix: str,
) -> None:
    async def main(proxy: TcpProxy) -> None:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with connected(url, rabbit_prefix, prefetch=10, **ONE_JOB_PER_MESSAGE) as broker:
            await broker.publish(_jobs(10))
            stream = broker.consume()
            held = await take(stream, 10, 20)
            assert broker.is_connected()
            proxy.refusing = True  # the broker is away for a moment, with 10 jobs held
            assert proxy.cut_all() >= 1
            await _until(lambda: not broker.is_connected(), 10, "the loss to be noticed")
            # Settling jobs of the lost channel is a no-op, never an error...
            await broker.ack(held[:5])
            await broker.dead_letter(held[5], "http_404", "gone", 1, decode_job(held[5].body))
            proxy.refusing = False
            # ...the link comes back up although stale jobs are still held (the reconnect
            # handler once crashed on them and left the worker unready for good)...
            await _until(broker.is_connected, 30, "the link to be up again")
            # ...and every one of them comes back on the new channel.
            back = await take(stream, 10, 30)
            assert {d.body for d in back} == {d.body for d in held}
            # The new channel reuses the old delivery tags: a stale ack must not settle the
            # redelivered message with the same tag. Handed back, all ten come round again.
            await broker.ack(held[6:])
            await broker.nack(back)
            again = await take(stream, 10, 30)
            assert {d.body for d in again} == {d.body for d in held}
            await broker.ack(again)
            await broker.publish(_jobs(2, "after-cut"))
            after = await take(stream, 2, 20)
            assert {decode_job(d.body).item_id for d in after} == {"after-cut-0", "after-cut-1"}
            await broker.ack(after)
            assert await nothing_more(stream)
            assert await broker.dead_letters() == []
            assert broker.is_connected()
            await stream.aclose()  # type: ignore[attr-defined]

    with TcpProxy("127.0.0.1", 5672) as proxy:
        asyncio.run(main(proxy))


def test_a_failing_reconnect_handler_still_brings_the_link_up_and_says_so(
    rabbit_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_bookkeeping() -> dict[str, int]:
        raise RuntimeError("a bug in the reconnect bookkeeping")

    async def main(proxy: TcpProxy) -> None:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with connected(url, rabbit_prefix) as broker:
            monkeypatch.setattr(broker, "_drop_stale_ready", broken_bookkeeping)
            with capture_logs() as logs:
                proxy.refusing = True
                proxy.cut_all()
                await _until(lambda: not broker.is_connected(), 10, "the loss to be noticed")
                proxy.refusing = False
                await _until(broker.is_connected, 30, "the link to be up again")
            failures = [e for e in logs if e["event"].startswith("reconnect bookkeeping failed")]
            assert failures and failures[0]["log_level"] == "error" and failures[0]["exc_info"]
        assert not broker.is_connected()

    with TcpProxy("127.0.0.1", 5672) as proxy:
        asyncio.run(main(proxy))


@run_async
async def test_raw_bodies_are_delivered_as_they_are(rabbit: Connect) -> None:
    async with rabbit() as broker:
        bodies = [b"", b"\x00\xff", orjson.dumps({"a": 1}) + b"\n" + b"second line"]
        await broker.publish_raw(bodies, lane="live")
        stream = broker.consume()
        got = await take(stream, 3, 20)
        assert sorted(d.body for d in got) == sorted(bodies)
        await broker.ack(got)
        await stream.aclose()  # type: ignore[attr-defined]
