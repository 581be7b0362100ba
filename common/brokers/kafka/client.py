"""kafka-python plumbing: connection settings, topic creation, reading without a group.

Everything here blocks; the adapter calls it through ``asyncio.to_thread``.

End offsets come from the high watermark of a real fetch rather than ListOffsets: the
loopback test broker (Tansu) answers ListOffsets(latest) with the base offset of the last
record batch plus one, which undercounts any batched write. A fetch's high watermark is
right on both Tansu and Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, TopicAlreadyExistsError

from common.config import BrokerConfig, mask_url
from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import get_logger

log = get_logger("kafka")

_SASL = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS = ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class ClientSettings:
    """What every kafka-python client of this adapter is built with."""

    bootstrap: tuple[str, ...]
    options: dict[str, Any] = field(repr=False)  # may hold the SASL password: never log it

    @property
    def display(self) -> str:
        return ",".join(self.bootstrap)

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        return {"bootstrap_servers": list(self.bootstrap), **self.options, **extra}


def parse_bootstrap(url: str) -> tuple[tuple[str, ...], str, str]:
    """``[scheme://][user[:password]@]host:port[,host:port...]`` -> (servers, user, password)."""
    rest = url.strip()
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    user = password = ""
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
    servers = tuple(s.strip().rstrip("/") for s in rest.split(",") if s.strip())
    if not servers:
        raise ConfigError(f"broker.url {mask_url(url)!r} names no bootstrap server")
    for server in servers:
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"bootstrap server {server!r} is not host:port")
    return servers, user, password


def client_settings(config: BrokerConfig) -> ClientSettings:
    k = config.kafka
    servers, url_user, url_password = parse_bootstrap(config.url.get_secret_value())
    # Credentials from the environment win over ones written into the URL.
    user = config.username or url_user
    password = config.password.get_secret_value() or url_password
    options: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.security_protocol in _SASL:
        if not user or not password:
            raise ConfigError(
                f"kafka.security_protocol={k.security_protocol} needs broker.username and "
                "broker.password (IMGFLEET_BROKER__USERNAME / IMGFLEET_BROKER__PASSWORD)"
            )
        options.update(
            sasl_mechanism=k.sasl_mechanism,
            sasl_plain_username=user,
            sasl_plain_password=password,
        )
    tls_files = {
        "ssl_cafile": config.tls_ca_file,
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
    }
    if k.security_protocol in _TLS:
        options.update({key: value for key, value in tls_files.items() if value})
    elif any(tls_files.values()):
        raise ConfigError(
            f"broker.tls_* files are set but kafka.security_protocol={k.security_protocol}; "
            "use SSL or SASL_SSL"
        )
    return ClientSettings(servers, options)


def ensure_topics(
    admin: KafkaAdminClient,
    topics: Iterable[str],
    partitions: int,
    replication_factor: int,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created (idempotent)."""
    wanted = list(topics)
    existing = set(admin.list_topics())
    missing = [t for t in wanted if t not in existing]
    created: list[str] = []
    for topic in missing:
        try:
            options: dict[str, Any] = {
                "num_partitions": partitions,
                "replication_factor": replication_factor,
            }
            if configs:
                options["configs"] = dict(configs)
            admin.create_topics({topic: options})
            created.append(topic)
        except TopicAlreadyExistsError:
            pass  # another process created it a moment ago: that is the same outcome
    if created:
        log.info("created topics", topics=created, partitions=partitions)
    present = [t for t in wanted if t in existing]
    for info in admin.describe_topics(present) if present else []:  # []: would mean all
        have = len(info.get("partitions") or ())
        if have and have < partitions:
            # Adding partitions re-maps keys to partitions (one item's order across the
            # change is lost), so it stays an explicit operator decision.
            log.warning(
                "topic has fewer partitions than configured",
                topic=info.get("name"),
                partitions=have,
                configured=partitions,
            )
    return created


class LogReader:
    """Reads topics outside any consumer group: backlog counts and the DLQ, read-only."""

    def __init__(self, settings: ClientSettings, *, timeout_s: float = 10.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._probe: KafkaConsumer | None = None  # 1-byte fetches: high watermarks only
        self._reader: KafkaConsumer | None = None
        self._admin: KafkaAdminClient | None = None

    def close(self) -> None:
        for client in (self._probe, self._reader, self._admin):
            if client is not None:
                client.close()
        self._probe = self._reader = self._admin = None

    def _consumer(self, *, probe: bool) -> KafkaConsumer:
        if probe and self._probe is None:
            self._probe = KafkaConsumer(
                **self._settings.kwargs(
                    group_id=None,
                    enable_auto_commit=False,
                    fetch_max_wait_ms=20,
                    fetch_max_bytes=1,
                    max_partition_fetch_bytes=1,
                    client_id="imgfleet-probe",
                )
            )
        if not probe and self._reader is None:
            self._reader = KafkaConsumer(
                **self._settings.kwargs(
                    group_id=None,
                    enable_auto_commit=False,
                    fetch_max_wait_ms=20,
                    client_id="imgfleet-reader",
                )
            )
        consumer = self._probe if probe else self._reader
        assert consumer is not None
        return consumer

    def _admin_client(self) -> KafkaAdminClient:
        if self._admin is None:
            self._admin = KafkaAdminClient(**self._settings.kwargs(client_id="imgfleet-admin"))
        return self._admin

    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        consumer = self._consumer(probe=True)
        out: list[TopicPartition] = []
        for topic in topics:
            ids = consumer.partitions_for_topic(topic) or set()
            out.extend(TopicPartition(topic, p) for p in sorted(ids))
        return out

    def backlog(self, group_id: str, topics: Iterable[str]) -> int:
        """Records at or past the group's committed offsets (0: every one is settled)."""
        return sum(self.lag(group_id, topics).values())

    def lag(self, group_id: str, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """Per partition: records at or past the group's committed offset."""
        tps = self.partitions(topics)
        if not tps:
            return {}
        try:
            committed = self._admin_client().list_group_offsets({group_id: tps}).get(group_id, {})
            starts = self._consumer(probe=True).beginning_offsets(tps)
        except KafkaError as exc:
            raise TransientError(f"kafka: reading group offsets: {exc}", Reason.BROKER) from exc
        positions: dict[TopicPartition, int] = {}
        for tp in tps:
            meta = committed.get(tp)
            offset = meta.offset if meta is not None else -1
            positions[tp] = offset if offset >= 0 else int(starts.get(tp, 0))
        highwater = self._highwater(positions)
        return {tp: max(highwater[tp] - positions[tp], 0) for tp in tps}

    def records(self, topic: str) -> int:
        """Records the topic holds now (high watermark minus log start, all partitions)."""
        tps = self.partitions([topic])
        if not tps:
            return 0
        try:
            starts = self._consumer(probe=True).beginning_offsets(tps)
        except KafkaError as exc:
            raise TransientError(f"kafka: reading {topic} offsets: {exc}", Reason.BROKER) from exc
        begin = {tp: int(starts.get(tp, 0)) for tp in tps}
        highwater = self._highwater(begin)
        return sum(max(highwater[tp] - begin[tp], 0) for tp in tps)

    def group_members(self, group_id: str) -> int | None:
        """Members of the consumer group, or None when the broker will not say.

        Some Kafka-protocol brokers answer DescribeGroups with fields kafka-python cannot
        decode, so any failure here means "unknown", never an error.
        """
        try:
            described = self._admin_client().describe_groups([group_id])
        except Exception as exc:  # a figure for ops, never worth failing the command for
            log.debug("describe_groups failed", group=group_id, error=str(exc))
            return None
        info = described.get(group_id) if isinstance(described, dict) else None
        if not isinstance(info, dict):
            return None
        members = info.get("members")
        return len(members) if isinstance(members, list | tuple) else None

    def _highwater(self, positions: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """High watermark per partition, learnt from a fetch starting at ``positions``."""
        consumer = self._consumer(probe=True)
        consumer.unsubscribe()  # fresh partition state: no high watermark left from before
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        deadline_s = time.monotonic() + self._timeout_s
        while True:
            marks = {tp: consumer.highwater(tp) for tp in positions}
            if all(mark is not None for mark in marks.values()):
                return {tp: int(mark) for tp, mark in marks.items()}
            if time.monotonic() > deadline_s:
                raise TransientError("kafka: no fetch answer for high watermarks", Reason.BROKER)
            consumer.poll(timeout_ms=50, max_records=100_000)

    def read(self, topic: str, limit: int) -> list[ConsumerRecord]:
        """Up to ``limit`` records of ``topic`` from its beginning, oldest first."""
        tps = self.partitions([topic])
        if not tps:
            return []
        consumer = self._consumer(probe=False)
        consumer.unsubscribe()
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline_s = time.monotonic() + self._timeout_s
        while len(records) < limit:
            batch = consumer.poll(timeout_ms=50, max_records=10_000)
            for recs in batch.values():
                records.extend(recs)
            if batch:
                deadline_s = time.monotonic() + self._timeout_s  # progress: keep going
                continue
            marks = {tp: consumer.highwater(tp) for tp in tps}
            if all(m is not None and consumer.position(tp) >= m for tp, m in marks.items()):
                break
            if time.monotonic() > deadline_s:
                raise TransientError(f"kafka: reading {topic} timed out", Reason.BROKER)
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        return records[:limit]
