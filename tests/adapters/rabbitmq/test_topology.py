"""Queue names, delay steps and multi-job packing (no server needed)."""

from __future__ import annotations

import pytest

from common.brokers.rabbitmq.connect import connection_url, scrub_secret
from common.brokers.rabbitmq.publish import PACKED_CONTENT_TYPE, pack, unpack
from common.brokers.rabbitmq.topology import Topology, delay_steps_ms
from common.config import load_settings
from common.schema import Job


def test_delay_steps_follow_the_capped_exponential_backoff() -> None:
    assert delay_steps_ms(1.0, 300.0, 5) == (1000, 2000, 4000, 8000)
    assert delay_steps_ms(1.0, 3.0, 6) == (1000, 2000, 3000)  # capped, de-duplicated
    assert delay_steps_ms(0.0, 3.0, 5) == ()  # no backoff: no delay queues
    assert delay_steps_ms(1.0, 3.0, 1) == ()  # no retries at all
    # Steps beyond the backoff's, up to the longest Retry-After a job may be held for.
    assert delay_steps_ms(1.0, 300.0, 8, 120.0) == (
        1000, 2000, 4000, 8000, 16000, 32000, 64000, 120000,
    )  # fmt: skip
    assert delay_steps_ms(0.1, 0.4, 4, 120.0)[-5:] == (7500, 15000, 30000, 60000, 120000)


def test_a_delay_picks_the_shortest_step_not_below_it() -> None:
    topology = Topology("p", "quorum", (1000, 2000, 4000))
    assert topology.step_for(0.0004) is None
    assert topology.step_for(0.2) == 1000
    assert topology.step_for(1.0) == 1000
    assert topology.step_for(1.5) == 2000
    assert topology.step_for(60.0) == 4000  # beyond the last step: the last step


def test_delay_queues_dead_letter_back_to_their_lane_at_least_once_on_quorum() -> None:
    quorum = Topology("imgfleet", "quorum", (1000,))
    args = quorum.delay_arguments("live", 1000)
    assert args["x-dead-letter-routing-key"] == "imgfleet.live"
    assert args["x-message-ttl"] == 1000
    assert args["x-dead-letter-strategy"] == "at-least-once"
    classic = Topology("imgfleet", "classic", (1000,)).delay_arguments("bulk", 1000)
    assert "x-dead-letter-strategy" not in classic
    names = [name for name, _ in quorum.all_queues()]
    assert names == [
        "imgfleet.live",
        "imgfleet.bulk",
        "imgfleet.delay.live.1000ms",
        "imgfleet.delay.bulk.1000ms",
        "imgfleet.dlq",
    ]


def test_packing_keeps_every_job_body_byte_for_byte() -> None:
    bodies = [Job(item_id=f"i{i}", url=f"http://h/{i}\nx").to_bytes() for i in range(250)]
    messages = pack("q", bodies, 100)
    assert [m.jobs for m in messages] == [100, 100, 50]
    assert all(m.content_type == PACKED_CONTENT_TYPE for m in messages)
    unpacked = [b for m in messages for b in unpack(m.body, m.content_type)]
    assert unpacked == bodies
    single = pack("q", bodies[:1], 100)
    assert single[0].jobs == 1 and unpack(single[0].body, single[0].content_type) == bodies[:1]
    # A raw body is one job whatever it contains.
    assert unpack(b"a\nb", "application/octet-stream") == [b"a\nb"]


def test_environment_credentials_win_over_the_url_and_never_show() -> None:
    settings = load_settings(
        broker={
            "kind": "rabbitmq",
            "url": "amqps://old:stale@mq.example:5671/fleet",
            "username": "worker",
            "password": "s3cret",
        }
    )
    url = connection_url(settings.broker)
    assert url.startswith("amqps://worker:s3cret@mq.example:5671/fleet")
    assert "heartbeat=30" in url
    assert "s3cret" not in scrub_secret(f"failed to reach {url}", url)


def test_a_non_amqp_url_is_a_configuration_error() -> None:
    from common.errors import ConfigError

    settings = load_settings(broker={"kind": "rabbitmq", "url": "http://mq:5672"})
    with pytest.raises(ConfigError, match="amqp"):
        connection_url(settings.broker)
