"""KEDA scaling of the workers: the real queues, topics, consumer group and credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.brokers.kafka.topics import KafkaTopics
from common.brokers.rabbitmq.topology import LANES, Topology
from common.config import BrokerConfig, KafkaConfig
from tests.deploy.artifacts import K8S, configmap_settings, yaml_docs


def _triggers(
    manifests: dict[tuple[str, str], dict[str, Any]], name: str, trigger_type: str
) -> list[dict[str, Any]]:
    """The triggers of the worker's ScaledObject ``name``, each of ``trigger_type``."""
    spec = manifests[("ScaledObject", name)]["spec"]
    assert spec["scaleTargetRef"]["name"] == "imgfleet-worker"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    triggers: list[dict[str, Any]] = spec["triggers"]
    assert {t["type"] for t in triggers} == {trigger_type}
    return triggers


def _secret_keys(manifests: dict[tuple[str, str], dict[str, Any]]) -> set[str]:
    return set(manifests[("Secret", "imgfleet-secrets")]["stringData"])


def _trigger_auth_keys(
    manifests: dict[tuple[str, str], dict[str, Any]], trigger: dict[str, Any]
) -> set[str]:
    auth = manifests[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    refs = auth["spec"]["secretTargetRef"]
    assert {ref["name"] for ref in refs} == {"imgfleet-secrets"}
    return {ref["key"] for ref in refs}


def test_keda_rabbitmq_scales_on_the_real_work_queues(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    triggers = _triggers(manifests, "imgfleet-worker-rabbitmq", "rabbitmq")
    prefix = BrokerConfig().name_prefix
    assert configmap_settings(manifests, tmp_path).broker.name_prefix == prefix
    topology = Topology(prefix, "quorum", ())
    assert {t["metadata"]["queueName"] for t in triggers} == {
        topology.work_queue(lane) for lane in LANES
    }
    secret_keys = _secret_keys(manifests)
    for trigger in triggers:
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert float(trigger["metadata"]["value"]) > 0
        keys = _trigger_auth_keys(manifests, trigger)
        assert keys <= secret_keys
        assert "IMGFLEET_BROKER__URL" in keys


def test_keda_kafka_scales_on_the_real_topics_and_group(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    triggers = _triggers(manifests, "imgfleet-worker-kafka", "kafka")
    settings = configmap_settings(manifests, tmp_path)
    topics = KafkaTopics.build(BrokerConfig().name_prefix, KafkaConfig().retry_delays_s)
    configured = KafkaTopics.build(
        settings.broker.name_prefix, settings.broker.kafka.retry_delays_s
    )
    assert topics == configured
    assert {t["metadata"]["topic"] for t in triggers} == {topics.for_lane(lane) for lane in LANES}
    secret_keys = _secret_keys(manifests)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == KafkaConfig().group_id == settings.broker.kafka.group_id
        assert meta["topic"] in topics.consumed
        assert meta["bootstrapServersFromEnv"] in secret_keys  # the worker's env, via envFrom
        assert meta["allowIdleConsumers"] == "false"
        assert _trigger_auth_keys(manifests, trigger) <= secret_keys
    patch = yaml_docs(K8S / "kafka" / "broker-kind.yaml")[0]
    assert patch["data"] == {"IMGFLEET_BROKER__KIND": "kafka"}
