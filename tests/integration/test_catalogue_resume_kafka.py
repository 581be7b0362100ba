"""A catalogue run on Kafka (Tansu) stopped right after a confirm, then resumed.

The run stops in-process (the confirm hook raises: the broker has the batch, no checkpoint
records it). The resume reads the bulk topic from the checkpoint's end offsets, finds the
jobs published since, and leaves them out: the topic then holds every job exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from common.brokers.kafka.client import LogReader, client_settings
from common.brokers.kafka.topics import KafkaTopics
from common.config import BrokerConfig
from common.schema import Job, decode_job
from common.storage.local import LocalStorage
from imgfleet.factories import kafka_broker
from imgfleet.run_registry import IndexRunRegistry
from index.runs import read_run
from producers.catalogue.reader import open_catalogue
from producers.nightly.checkpoint import load_checkpoint
from producers.nightly.run import CatalogueRun, RunOptions
from producers.nightly.upserts import PublishReport
from tests.support.catalogue_factory import write_catalogue
from tests.support.kafka import TansuBroker, broker_config

pytestmark = pytest.mark.integration


class Crash(Exception):
    pass


def _bulk_records(config: BrokerConfig) -> list[Any]:
    topics = KafkaTopics.build(config.name_prefix, config.kafka.retry_delays_s)
    reader = LogReader(client_settings(config))
    try:
        return reader.read(topics.bulk, 10**7)
    finally:
        reader.close()


def test_resume_after_a_crash_between_confirm_and_checkpoint(
    tmp_path: Path, tansu: TansuBroker
) -> None:
    config = broker_config(tansu)
    written = write_catalogue(tmp_path / "cat.jsonl", 3000)
    storage = LocalStorage(tmp_path / "store")

    async def run(**options: Any) -> PublishReport:
        broker = kafka_broker(config)
        await broker.connect()
        try:
            return await CatalogueRun(
                RunOptions(
                    run_id="night-k",
                    source=str(written.path),
                    batch_size=250,
                    checkpoint_interval_s=0.0,  # a checkpoint after every chunk of rows
                    **options,
                ),
                broker=broker,
                storage=storage,
                registry=IndexRunRegistry(storage),
                on_confirmed=hook,
            ).run(lambda: open_catalogue(written.path))
        finally:
            await broker.close()

    confirmed = [0]

    def hook(batch: list[Job]) -> None:
        confirmed[0] += len(batch)
        if confirmed[0] >= 5000 and not resumed:
            raise Crash("stopped after a confirm")

    resumed = False
    with pytest.raises(Crash):
        asyncio.run(run())
    checkpoint = load_checkpoint(storage, "night-k")
    assert checkpoint is not None and 0 < checkpoint.jobs_confirmed < 5000
    assert checkpoint.ledger_position  # the lane topics' end offsets at the mark
    on_broker = len(_bulk_records(config))
    assert on_broker > checkpoint.jobs_confirmed, "nothing past the checkpoint to skip"
    resumed = True
    report = asyncio.run(run(resume=True))
    assert report.already_published == on_broker - checkpoint.jobs_confirmed

    counts = Counter(decode_job(rec.value).job_id for rec in _bulk_records(config))
    assert set(counts) == written.job_ids("night-k")
    assert max(counts.values()) == 1, "a job was published twice"
    run_file = read_run(storage, "night-k")
    assert (run_file.state, run_file.expected_jobs) == ("published", len(written.images))
