"""The Kubernetes manifests in deploy/k8s (the Kafka component's too) and their kustomize build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import (
    CmsConfig,
    IndexConfig,
    MetricsConfig,
    Settings,
    WorkerConfig,
    load_settings,
)
from tests.deploy.artifacts import (
    DOCKERFILES,
    DRAIN_MARGIN_S,
    K8S,
    SECRET_SETTINGS,
    cli_accepts,
    configmap_settings,
    container_of,
    dockerfile_copies,
    instructions,
    is_pinned,
    last_instruction,
    pod_spec,
    port_number,
    probe,
    workloads,
    yaml_docs,
)


def test_every_manifest_names_itself(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert manifests
    for (kind, name), manifest in manifests.items():
        assert manifest["apiVersion"] and kind and name
        if kind != "Namespace":
            assert manifest["metadata"].get("namespace") == "imgfleet", (kind, name)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    component = yaml.safe_load((K8S / "kafka" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for resource in component["resources"]:
        assert (K8S / "kafka" / resource).is_file()
    images = {i["name"]: i for i in kustomization["images"]}
    for manifest in yaml_docs(K8S / "worker.yaml") + yaml_docs(K8S / "cms.yaml"):
        if manifest["kind"] == "Deployment":
            image = container_of(manifest)["image"]
            assert image.rpartition(":")[0] in images, image


def test_every_image_is_pinned(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for manifest in workloads(manifests):
        for container in pod_spec(manifest)["containers"]:
            assert is_pinned(container["image"]), container["image"]


def test_pods_meet_the_restricted_security_standard(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert (
        manifests[("Namespace", "imgfleet")]["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )
    for manifest in workloads(manifests):
        name = manifest["metadata"]["name"]
        spec = pod_spec(manifest)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            assert {"configMap", "emptyDir", "secret"} & set(volume), (name, volume["name"])
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            # With a read-only root, the data directory (the user's home) and /tmp must be
            # writable volumes, and the config comes read-only from the ConfigMap.
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            for writable in ("/var/lib/imgfleet", "/tmp"):
                assert "emptyDir" in volumes[mounts[writable]["name"]], (name, writable)
            assert mounts["/etc/imgfleet"]["readOnly"] is True, name
            assert volumes[mounts["/etc/imgfleet"]["name"]]["configMap"]["name"] == (
                "imgfleet-config"
            )
            env_from = {next(iter(e.values()))["name"] for e in container["envFrom"]}
            assert env_from == {"imgfleet-env", "imgfleet-secrets"}, name


def test_pod_user_matches_the_images(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    uids = {last_instruction(instructions(p), "USER").split(":")[0] for p in DOCKERFILES.values()}
    for manifest in workloads(manifests):
        assert {str(pod_spec(manifest)["securityContext"]["runAsUser"])} == uids


def test_worker_deployment(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    worker = manifests[("Deployment", "imgfleet-worker")]
    assert "replicas" not in worker["spec"]  # KEDA owns the count
    spec = pod_spec(worker)
    container = container_of(worker)
    assert container["image"].rpartition(":")[0].endswith("imgfleet-worker")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    configured = configmap_settings(manifests, tmp_path)
    for deadline_s in (WorkerConfig().shutdown_deadline_s, configured.worker.shutdown_deadline_s):
        assert spec["terminationGracePeriodSeconds"] >= deadline_s + DRAIN_MARGIN_S
    cli_accepts(container["args"])
    assert container["args"][0] == "work"
    port = MetricsConfig().port
    assert configured.metrics.port == port
    assert probe(container, "livenessProbe") == ("/healthz", port)
    assert probe(container, "startupProbe") == ("/healthz", port)
    assert probe(container, "readinessProbe") == ("/readyz", port)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts  # the decode pool's shared memory


def test_cms_and_search_are_served_and_probed(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    settings = configmap_settings(manifests, tmp_path)
    assert settings.cms.host == settings.index.serve_host == "0.0.0.0"
    metrics_port = MetricsConfig().port
    cms = container_of(manifests[("Deployment", "imgfleet-cms")])
    cli_accepts(cms["args"])
    assert port_number(cms, "http") == settings.cms.port == CmsConfig().port
    assert probe(cms, "livenessProbe") == ("/healthz", settings.cms.port)
    assert probe(cms, "readinessProbe") == ("/readyz", settings.cms.port)
    search = container_of(manifests[("Deployment", "imgfleet-search")])
    cli_accepts(search["args"])
    assert port_number(search, "http") == settings.index.serve_port == IndexConfig().serve_port
    assert probe(search, "livenessProbe") == ("/healthz", metrics_port)
    assert probe(search, "readinessProbe") == ("/readyz", metrics_port)
    scrape_ports = {
        "imgfleet-cms": settings.cms.port,
        "imgfleet-search": metrics_port,
        "imgfleet-index-applier": metrics_port,
    }
    for name, port in scrape_ports.items():
        annotations = manifests[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
    for name in ("imgfleet-cms", "imgfleet-search"):
        deployment = manifests[("Deployment", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        service = manifests[("Service", name)]
        assert service["spec"]["selector"].items() <= labels.items(), name
        container = container_of(deployment)
        for port in service["spec"]["ports"]:
            port_number(container, port["targetPort"])  # a named port the container declares
        budget = manifests[("PodDisruptionBudget", name)]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], name


def test_index_applier_is_a_single_writer(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    applier = manifests[("Deployment", "imgfleet-index-applier")]
    assert applier["spec"]["replicas"] == 1
    assert applier["spec"]["strategy"] == {"type": "Recreate"}
    container = container_of(applier)
    assert container["args"] == ["index", "apply", "--watch"]
    cli_accepts(container["args"])
    assert probe(container, "livenessProbe") == ("/healthz", MetricsConfig().port)


def test_nightly_cronjob(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    cron = manifests[("CronJob", "imgfleet-nightly")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]["spec"]
    container = container_of(cron)
    assert container["command"] == ["imgfleet-nightly"]
    assert "/usr/local/bin/imgfleet-nightly" in dockerfile_copies("cpu").values()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["args"] == ["$(CATALOGUE_SOURCE)"] and env["CATALOGUE_SOURCE"]
    assert job["activeDeadlineSeconds"] > int(env["FINALIZE_TIMEOUT_S"])
    assert pod_spec(cron)["restartPolicy"] == "Never"


def test_configmap_toml_loads_with_the_secret_and_env(
    manifests: dict[tuple[str, str], dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = configmap_settings(manifests, tmp_path)
    assert settings.broker.kind == "rabbitmq"
    assert settings.storage.kind == "s3"
    assert settings.worker.allow_file_urls is False
    assert settings.worker.decode_processes > 0  # os.cpu_count() is the node's, not the pod's
    env = manifests[("ConfigMap", "imgfleet-env")]["data"]
    assert env["IMGFLEET_CONFIG"] == "/etc/imgfleet/imgfleet.toml"
    secret = manifests[("Secret", "imgfleet-secrets")]["stringData"]
    for key, value in {**env, **secret}.items():
        if key.startswith("IMGFLEET_") and key != "IMGFLEET_CONFIG":
            monkeypatch.setenv(key, value)
    resolved = load_settings(tmp_path / "imgfleet.toml")
    assert resolved.broker.kind == env["IMGFLEET_BROKER__KIND"]
    assert resolved.broker.username == secret["IMGFLEET_BROKER__USERNAME"]
    assert len(resolved.cms.tokens) == 1


def test_secret_example_holds_placeholders_for_real_settings(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = manifests[("Secret", "imgfleet-secrets")]
    data = secret["stringData"]
    imgfleet_keys = {k for k in data if k.startswith("IMGFLEET_")}
    assert imgfleet_keys == set(SECRET_SETTINGS)
    for key in imgfleet_keys:
        section, _, field = key.removeprefix("IMGFLEET_").lower().partition("__")
        section_model = Settings.model_fields[section].annotation
        assert field in section_model.model_fields, key  # type: ignore[union-attr]
        if key != "IMGFLEET_BROKER__URL":
            assert "PLACEHOLDER" in data[key], key
    for (kind, _), manifest in manifests.items():
        if kind == "ConfigMap":
            text = json.dumps(manifest["data"])
            assert not any(key in text for key in SECRET_SETTINGS if key != "IMGFLEET_CONFIG")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_the_rabbitmq_and_the_kafka_fleet(tmp_path: Path) -> None:
    def build(directory: Path) -> list[dict[str, Any]]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def scaled_objects(docs: list[dict[str, Any]]) -> list[str]:
        return [d["metadata"]["name"] for d in docs if d["kind"] == "ScaledObject"]

    def broker_kind(docs: list[dict[str, Any]]) -> str:
        (env,) = [d for d in docs if d["metadata"]["name"] == "imgfleet-env"]
        return str(env["data"]["IMGFLEET_BROKER__KIND"])

    base = build(K8S)
    assert not [d for d in base if d["kind"] == "Secret"]
    assert scaled_objects(base) == ["imgfleet-worker-rabbitmq"]
    assert broker_kind(base) == "rabbitmq"
    for doc in base:
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "imgfleet"

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    relative = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [str(relative)], "components": [str(relative / "kafka")]})
    )
    kafka = build(overlay)
    assert scaled_objects(kafka) == ["imgfleet-worker-kafka"]
    assert [d["metadata"]["name"] for d in kafka if d["kind"] == "TriggerAuthentication"] == [
        "imgfleet-kafka"
    ]
    assert broker_kind(kafka) == "kafka"
