"""Unit tests of the Kafka adapter's pure parts: commit positions, retry tiers, settings."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from common.brokers.kafka.client import client_settings, parse_bootstrap
from common.brokers.kafka.offsets import PartitionOffsets
from common.brokers.kafka.topics import (
    H_ATTEMPTS,
    H_DUE_MS,
    H_ERROR,
    H_REASON,
    H_SOURCE,
    MAX_ERROR_CHARS,
    KafkaTopics,
    TopicKind,
    dlq_headers,
    due_at_ms,
    header,
    header_int,
)
from common.config import BrokerConfig, KafkaConfig, load_settings
from common.errors import ConfigError

# -- commit positions ---------------------------------------------------------------------


def test_commit_position_waits_for_every_lower_offset() -> None:
    offsets = PartitionOffsets(epoch=1)
    for offset in (10, 11, 12, 13):
        offsets.fetched(offset)
    assert offsets.to_commit() is None
    assert offsets.done(12)
    assert offsets.done(13)
    assert offsets.to_commit() is None  # 10 and 11 still running: committing 14 would skip them
    assert offsets.done(10)
    assert offsets.to_commit() == 11
    assert offsets.done(11)
    assert offsets.to_commit() == 14
    assert offsets.open_count == 0


def test_commit_position_is_reported_once_per_advance() -> None:
    offsets = PartitionOffsets(epoch=1)
    offsets.fetched(0)
    offsets.done(0)
    assert offsets.to_commit() == 1
    offsets.committed(1)
    assert offsets.to_commit() is None
    offsets.fetched(1)
    offsets.done(1)
    assert offsets.to_commit() == 2


def test_gaps_in_offsets_do_not_block_the_commit() -> None:
    # Compacted topics and transaction markers leave holes; only fetched offsets count.
    offsets = PartitionOffsets(epoch=1)
    for offset in (5, 9, 20):
        offsets.fetched(offset)
    for offset in (20, 5, 9):
        offsets.done(offset)
    assert offsets.to_commit() == 21


def test_settling_twice_or_an_unknown_offset_changes_nothing() -> None:
    offsets = PartitionOffsets(epoch=1)
    offsets.fetched(3)
    offsets.fetched(4)
    assert offsets.done(4)
    assert not offsets.done(4)
    assert not offsets.done(99)
    assert not offsets.done(2)
    assert offsets.to_commit() is None
    assert offsets.done(3)
    assert not offsets.done(3)  # already passed by the commit position
    assert offsets.to_commit() == 5


def test_offsets_must_grow() -> None:
    offsets = PartitionOffsets(epoch=1)
    offsets.fetched(7)
    with pytest.raises(ValueError):
        offsets.fetched(7)


def test_forget_from_drops_records_never_handed_out() -> None:
    offsets = PartitionOffsets(epoch=1)
    for offset in range(5):
        offsets.fetched(offset)
    offsets.done(0)
    offsets.done(1)
    offsets.forget_from(3)  # 3 and 4 were buffered when the partition was revoked
    assert offsets.next_fetch_offset == 3
    assert offsets.open_count == 1  # offset 2 still in flight
    offsets.done(2)
    assert offsets.to_commit() == 3
    assert not offsets.done(4)


def test_forget_everything_resumes_after_the_last_commit() -> None:
    offsets = PartitionOffsets(epoch=1)
    offsets.fetched(0)
    offsets.done(0)
    offsets.committed(1)
    offsets.fetched(1)
    offsets.forget_from(1)
    assert offsets.next_fetch_offset == 1
    assert PartitionOffsets(epoch=2).next_fetch_offset is None


def test_forgetting_records_of_an_untouched_partition_resumes_at_the_first_of_them() -> None:
    # Fetched, none handed out, nothing committed this epoch: a revoke drops them all. The
    # partition must be fetched again from the first, not from where kafka-python got to.
    offsets = PartitionOffsets(epoch=1)
    for offset in (7, 8, 9):
        offsets.fetched(offset)
    offsets.forget_from(7)
    offsets.forget_from(8)  # later records of the same buffer never move it forward
    assert offsets.next_fetch_offset == 7
    assert offsets.open_count == 0 and offsets.to_commit() is None
    offsets.fetched(7)  # fetched again after the seek
    offsets.done(7)
    assert offsets.to_commit() == 8


# -- topics and retry tiers ---------------------------------------------------------------


def test_topic_names_and_kinds() -> None:
    topics = KafkaTopics.build("fleet", [30, 5, 300, 5])
    assert topics.retry_delays_s == (5.0, 30.0, 300.0)
    assert topics.retries == ("fleet.retry.5s", "fleet.retry.30s", "fleet.retry.300s")
    assert topics.consumed == (
        "fleet.jobs.live",
        "fleet.retry.5s",
        "fleet.retry.30s",
        "fleet.retry.300s",
        "fleet.jobs.bulk",
    )
    assert topics.all[-1] == "fleet.dlq"
    assert topics.kind("fleet.jobs.live") is TopicKind.LIVE
    assert topics.kind("fleet.retry.30s") is TopicKind.RETRY
    assert topics.kind("fleet.jobs.bulk") is TopicKind.BULK
    assert topics.kind("fleet.dlq") is TopicKind.DLQ
    with pytest.raises(ValueError):
        topics.kind("other.jobs.bulk")
    assert topics.for_lane("live") == "fleet.jobs.live"
    with pytest.raises(ValueError):
        topics.for_lane("urgent")


def test_fractional_delays_make_legal_topic_names() -> None:
    topics = KafkaTopics.build("p", [0.25, 1])
    assert topics.retries == ("p.retry.0.25s", "p.retry.1s")


@pytest.mark.parametrize(
    ("delay_s", "tier"),
    [
        (0.0, "5s"),
        (4.9, "5s"),
        (5.0, "5s"),
        (29.0, "5s"),
        (30.0, "30s"),
        (299, "30s"),
        (1e6, "300s"),
    ],
)
def test_retry_goes_to_the_largest_tier_not_above_the_delay(delay_s: float, tier: str) -> None:
    topics = KafkaTopics.build("p", [5, 30, 300])
    assert topics.retry_topic(delay_s) == f"p.retry.{tier}"


def test_no_retry_tiers_is_an_error() -> None:
    with pytest.raises(ValueError):
        KafkaTopics.build("p", [])


def test_due_time_and_headers() -> None:
    assert due_at_ms(2.5, now_s=100.0) == 102_500
    assert due_at_ms(-1.0, now_s=100.0) == 100_000
    headers = [(H_DUE_MS, b"123"), ("other", None)]
    assert header_int(headers, H_DUE_MS) == 123
    assert header(headers, "other") is None
    assert header_int([(H_DUE_MS, b"soon")], H_DUE_MS) is None
    assert header_int(None, H_DUE_MS) is None


def test_dlq_headers_carry_the_failure_and_cap_the_error() -> None:
    headers = dlq_headers(
        reason="http_404",
        error="x" * (MAX_ERROR_CHARS + 50),
        attempts=3,
        failed_at_s=12.5,
        run_id=None,
        item_id="item-1",
        source="t.jobs.bulk:2:17",
    )
    assert header(headers, H_REASON) == "http_404"
    assert len(header(headers, H_ERROR) or "") == MAX_ERROR_CHARS
    assert header_int(headers, H_ATTEMPTS) == 3
    assert header(headers, H_SOURCE) == "t.jobs.bulk:2:17"
    assert header(headers, "imgfleet-run-id") is None
    assert header(headers, "imgfleet-item-id") == "item-1"


# -- connection settings ------------------------------------------------------------------


def test_parse_bootstrap_list_with_and_without_credentials() -> None:
    assert parse_bootstrap("h1:9092, h2:9093") == (("h1:9092", "h2:9093"), "", "")
    assert parse_bootstrap("kafka://u:p%40ss@h1:9092,h2:9092") == (
        ("h1:9092", "h2:9092"),
        "u",
        "p%40ss",
    )
    with pytest.raises(ConfigError):
        parse_bootstrap("")
    with pytest.raises(ConfigError):
        parse_bootstrap("just-a-host")


def _broker(**kw: object) -> BrokerConfig:
    return load_settings(broker={"kind": "kafka", "url": "h:9092", **kw}).broker


def test_sasl_ssl_settings_take_credentials_from_config_and_never_show_them() -> None:
    config = _broker(
        url="kafka://urluser:urlpass@h:9092",
        username="envuser",
        password="s3cret-pw",
        tls_ca_file="/etc/ca.pem",
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"},
    )
    settings = client_settings(config)
    kwargs = settings.kwargs(client_id="x")
    assert kwargs["bootstrap_servers"] == ["h:9092"]
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "envuser"  # the environment wins over the URL
    assert kwargs["sasl_plain_password"] == "s3cret-pw"
    assert kwargs["ssl_cafile"] == "/etc/ca.pem"
    assert "s3cret-pw" not in repr(settings)
    assert "urlpass" not in settings.display


def test_sasl_falls_back_to_url_credentials() -> None:
    config = _broker(
        url="kafka://urluser:urlpass@h:9092", kafka={"security_protocol": "SASL_PLAINTEXT"}
    )
    kwargs = client_settings(config).kwargs()
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("urluser", "urlpass")
    assert "ssl_cafile" not in kwargs


def test_sasl_without_credentials_or_tls_files_on_plaintext_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="username"):
        client_settings(_broker(kafka={"security_protocol": "SASL_SSL"}))
    with pytest.raises(ConfigError, match="tls"):
        client_settings(_broker(tls_ca_file="/ca.pem"))
    plain = client_settings(_broker(password=SecretStr("unused")))
    assert "sasl_plain_password" not in plain.kwargs()


def test_kafka_config_checks_timeouts() -> None:
    with pytest.raises(ValueError):
        KafkaConfig(session_timeout_ms=3000, heartbeat_interval_ms=1500)
    with pytest.raises(ValueError):
        KafkaConfig(revoke_wait_s=400, max_poll_interval_ms=300_000)
    with pytest.raises(ValueError):
        KafkaConfig(retry_delays_s=[])
    with pytest.raises(ConfigError):
        load_settings(broker={"kind": "kafka", "url": "h:1", "kafka": {"retry_delays_s": [-1]}})
