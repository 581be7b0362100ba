"""The deployment files, loaded once per module of checks (see tests/deploy/artifacts.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.deploy.artifacts import COMPOSE_PATH, DASHBOARD_PATH, K8S, yaml_docs


def _mapping(data: Any) -> dict[str, Any]:
    """A parsed file that must be one mapping at its top."""
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _mapping(yaml.safe_load(COMPOSE_PATH.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return _mapping(json.loads(DASHBOARD_PATH.read_text()))


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every file in deploy/k8s (the component's too)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            if path.parent.name == "kafka" and key in found:
                continue  # a patch of a base object
            found[key] = doc
    return found
