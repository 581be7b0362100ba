"""What only the local (SQLite) broker does: strict order, lane priority from a standing
backlog, leases, its own prefetch window, and concurrent first opens.

The semantics every adapter shares are in tests/contract/test_broker_contract.py.
"""

import asyncio
from pathlib import Path

from common.brokers.local.broker import LocalBroker
from common.schema import Job, Lane
from tests.support.waiting import take_deliveries


def _jobs(n: int, lane: Lane = Lane.BULK, prefix: str = "i") -> list[Job]:
    return [Job(item_id=f"{prefix}{i}", url=f"http://x/{i}.jpg", lane=lane) for i in range(n)]


def test_jobs_are_handed_out_in_publish_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3", visibility_timeout_s=0.3, poll_interval_s=0.01)
        await broker.publish(_jobs(5))
        got = await take_deliveries(broker, 5)
        assert [Job.model_validate_json(d.body).item_id for d in got] == [f"i{i}" for i in range(5)]
        await broker.close()

    asyncio.run(scenario())


def test_the_live_lane_is_served_first_from_a_standing_backlog(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3", prefetch=1, poll_interval_s=0.01)
        await broker.publish(_jobs(50, Lane.BULK, "bulk"))
        await broker.publish(_jobs(1, Lane.LIVE, "live"))
        first = (await take_deliveries(broker, 1))[0]
        assert Job.model_validate_json(first.body).item_id == "live0"
        await broker.close()

    asyncio.run(scenario())


def test_stale_lease_cannot_settle_after_redelivery(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3", visibility_timeout_s=0.2, poll_interval_s=0.01)
        [job] = _jobs(1)
        await broker.publish([job])
        [first] = await take_deliveries(broker, 1)
        await broker.close()
        # The first consumer "died"; another takes the job after the timeout.
        other = LocalBroker(tmp_path / "q.sqlite3", visibility_timeout_s=5, poll_interval_s=0.01)
        [second] = await take_deliveries(other, 1)
        # The dead consumer's late dead-letter must not add a DLQ row nor drop the job.
        await other.dead_letter(first, "undecodable", "late", 1, job)
        assert await other.dead_letters() == []
        assert await other.pending() == 1
        await other.ack([second])
        assert await other.pending() == 0
        await other.close()

    asyncio.run(scenario())


def test_prefetch_window_bounds_unsettled(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = LocalBroker(tmp_path / "q.sqlite3", prefetch=3, poll_interval_s=0.01)
        await broker.publish(_jobs(10))
        got = await take_deliveries(broker, 3)
        more: list = []

        async def pull_more() -> None:
            async for d in broker.consume():
                more.append(d)

        task = asyncio.create_task(pull_more())
        await asyncio.sleep(0.2)
        assert more == []  # window full
        await broker.ack(got[:2])
        await asyncio.sleep(0.2)
        assert len(more) == 2
        task.cancel()
        await broker.close()

    asyncio.run(scenario())


def test_concurrent_first_publishes_on_a_new_file_open_one_connection(tmp_path: Path) -> None:
    # Publishes in flight before any connect() all find the connection missing at once.
    async def scenario(path: Path) -> None:
        broker = LocalBroker(path)
        jobs = [Job(item_id=f"i{n}", url=f"http://x/{n}.jpg") for n in range(8)]
        await asyncio.gather(*(broker.publish([job]) for job in jobs))
        assert await broker.pending() == len(jobs)
        await broker.close()

    # The race lost about 1 time in 100 before the open was serialised.
    for attempt in range(300):
        asyncio.run(scenario(tmp_path / f"q{attempt}.sqlite3"))
