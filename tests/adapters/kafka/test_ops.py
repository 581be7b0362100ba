"""Ops on Kafka (Tansu): settling dead letters through the resolved topic, the group's
member count, and the ops commands over a letter written twice (a crash copy).

What the lane figures count (the group's lag) and what requeue, purge and status do, on
every broker, is in tests/contract/test_broker_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from common.brokers.base import DeadLetter
from common.brokers.kafka.topics import KafkaTopics, dlq_headers
from common.config import BrokerConfig
from common.schema import Job, Lane, decode_job
from common.storage.local import LocalStorage
from imgfleet.factories import kafka_broker
from index.runs import RunInfo, write_run
from tests.support.cli import Cli
from tests.support.fleet import broker_env
from tests.support.kafka import TansuBroker, broker_config

pytestmark = pytest.mark.integration

REASONS = {"a": "http_5xx", "b": "http_404", "c": "http_5xx", "d": "http_404", "e": "http_5xx"}


def _write_dead_letters(tansu: TansuBroker, topics: KafkaTopics, run_id: str = "night") -> None:
    """Letters for jobs a..e in that order; a's is written twice (a crash copy, same source)."""
    producer = KafkaProducer(bootstrap_servers=[tansu.bootstrap], acks="all")
    base_ms = int(time.time() * 1000) - 60_000
    writes = [*"abcde", "a"]
    jobs = {
        c: Job(item_id=f"item-{c}", url=f"http://img.test/{c}.jpg", run_id=run_id) for c in "abcde"
    }
    for n, c in enumerate(writes):
        headers = dlq_headers(
            reason=REASONS[c],
            error=f"{REASONS[c]} for {c}",
            attempts=4,
            failed_at_s=(base_ms + n) / 1000,
            run_id=run_id,
            item_id=f"item-{c}",
            source=f"{topics.bulk}:0:{'abcde'.index(c)}",
        )
        producer.send(
            topics.dlq,
            key=f"item-{c}".encode(),
            value=jobs[c].to_bytes(),
            headers=headers,
            timestamp_ms=base_ms + n,
        ).get(10)
    producer.close()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_settle_marks_both_copies_resolved_and_readers_skip_them(tansu: TansuBroker) -> None:
    config = broker_config(tansu)

    async def scenario() -> None:
        broker = kafka_broker(config)
        await broker.connect()  # creates the topics, the resolved one included
        _write_dead_letters(tansu, broker.topics)
        letters = await broker.dead_letters(100)
        assert [d.item_id for d in letters] == [f"item-{c}" for c in "abcde"]

        async def fail(batch: list[DeadLetter]) -> None:
            raise RuntimeError("republish failed")

        with pytest.raises(RuntimeError):
            await broker.settle_dead_letters(lambda d: True, fail)
        assert len(await broker.dead_letters(100)) == 5

        batches: list[list[str | None]] = []

        async def act(batch: list[DeadLetter]) -> None:
            batches.append([d.item_id for d in batch])

        settled = await broker.settle_dead_letters(
            lambda d: d.reason == "http_5xx", act, limit=2, batch_size=1
        )
        assert settled == 2 and batches == [["item-a"], ["item-c"]]
        left = [d.item_id for d in await broker.dead_letters(100)]
        assert left == ["item-b", "item-d", "item-e"]
        stats = {s.lane: s for s in await broker.lane_stats()}
        assert stats["dlq"].ready == 3  # six records, three marked (both copies of a)
        await broker.close()

        # Marks are durable: another process reads the same.
        other = kafka_broker(config)
        await other.connect()
        assert [d.item_id for d in await other.dead_letters(100)] == left
        assert await other.settle_dead_letters(lambda d: True, act) == 3
        assert await other.dead_letters(100) == []
        await other.close()

    _run(scenario())


def test_lane_stats_leave_a_member_count_the_broker_cannot_give_unknown(
    tansu: TansuBroker,
) -> None:
    config = broker_config(tansu)

    async def scenario() -> None:
        broker = kafka_broker(config)
        await broker.connect()
        await broker.publish([Job(item_id=f"b{i}", url="http://img.test/b.jpg") for i in range(3)])
        await broker.publish([Job(item_id="l0", url="http://img.test/l.jpg", lane=Lane.LIVE)])
        stats = {s.lane: s for s in await broker.lane_stats()}
        # Tansu cannot describe groups: the member count is then unknown, never an error.
        assert stats["bulk"].consumers is None or stats["bulk"].consumers >= 0
        await broker.close()

    _run(scenario())


def _env(config: BrokerConfig, tmp_path: Path) -> dict[str, str]:
    k = config.kafka
    broker = broker_env(
        "kafka",
        config.url.get_secret_value(),
        config.name_prefix,
        KAFKA__PARTITIONS=str(k.partitions),
        KAFKA__GROUP_ID=k.group_id,
        KAFKA__RETRY_DELAYS_S=json.dumps(k.retry_delays_s),
    )
    return {**broker, "IMGFLEET_STORAGE__ROOT": str(tmp_path / "store")}


def test_the_ops_commands_count_and_requeue_a_letter_and_its_copy_once(
    tansu: TansuBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = broker_config(tansu)
    cli = Cli(monkeypatch, capsys, _env(config, tmp_path))
    topics = KafkaTopics.build(config.name_prefix, config.kafka.retry_delays_s)

    async def prepare() -> None:
        broker = kafka_broker(config)
        await broker.connect()
        await broker.close()

    _run(prepare())
    _write_dead_letters(tansu, topics)
    storage = LocalStorage(tmp_path / "store")
    write_run(storage, RunInfo("night", "catalogue.jsonl", 5, time.time() - 60))

    # Six records, five letters: a's copy is counted once, in the run's figures too.
    status = cli("status")
    assert status["dead_letters"] == {"total": 5, "by_reason": {"http_5xx": 3, "http_404": 2}}
    (run,) = status["runs"]
    assert (run["expected"], run["indexed"], run["failed"], run["remaining"]) == (5, 0, 5, 0)

    # a is requeued once, and both its records are marked.
    moved = cli("requeue", "--reason", "http_5xx")
    assert moved["moved"] == 3 and moved["by_reason"] == {"http_5xx": 3}
    requeued = _read_topic(tansu, topics.live)
    assert sorted(j.item_id for j in requeued) == ["item-a", "item-c", "item-e"]
    lanes = {lane["lane"]: lane for lane in cli("status")["lanes"]}
    assert (lanes["live"]["lag"], lanes["dlq"]["ready"]) == (3, 2)


def _read_topic(tansu: TansuBroker, topic: str) -> list[Job]:
    consumer = KafkaConsumer(bootstrap_servers=[tansu.bootstrap], group_id=None)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    jobs: list[Job] = []
    deadline = time.monotonic() + 10
    while len(jobs) < 3 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            jobs += [decode_job(r.value) for r in records]
    consumer.close()
    return jobs
