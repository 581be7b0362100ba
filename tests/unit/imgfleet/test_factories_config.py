"""Settings to objects: the ``[broker.local]`` and ``[s3]`` sections as the factories read
them, and the keys that moved there from earlier versions' places."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.brokers.local.broker import LocalBroker
from common.config import load_settings, masked_dump
from imgfleet.factories import make_broker, make_fetcher, s3_endpoint, storage_s3_client


def test_broker_local_section_configures_the_local_broker(tmp_path: Path) -> None:
    config = tmp_path / "imgfleet.toml"
    config.write_text(
        f'[broker.local]\npath = "{tmp_path / "q.sqlite3"}"\n'
        "visibility_timeout_s = 7.5\npoll_interval_s = 0.05\n"
    )
    broker = make_broker(load_settings(config))
    assert isinstance(broker, LocalBroker)
    assert (broker.path, broker.visibility_timeout_s, broker.poll_interval_s) == (
        tmp_path / "q.sqlite3",
        7.5,
        0.05,
    )


def test_the_flat_local_keys_of_earlier_versions_still_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "old.toml"
    config.write_text(
        f'[broker]\nlocal_path = "{tmp_path / "old.sqlite3"}"\npoll_interval_s = 0.3\n'
    )
    local = load_settings(config).broker.local
    assert (local.path, local.poll_interval_s, local.visibility_timeout_s) == (
        tmp_path / "old.sqlite3",
        0.3,
        120.0,
    )
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL_PATH", str(tmp_path / "env.sqlite3"))
    assert load_settings().broker.local.path == tmp_path / "env.sqlite3"
    monkeypatch.setenv("IMGFLEET_BROKER__LOCAL__POLL_INTERVAL_S", "0.4")
    assert load_settings().broker.local.poll_interval_s == 0.4


def test_s3_section_is_shared_and_each_use_overrides_it(tmp_path: Path) -> None:
    config = tmp_path / "s3.toml"
    config.write_text(
        "[s3]\n"
        'endpoint_url = "http://minio.internal:9000"\n'
        'region = "eu-west-1"\n'
        'access_key_id = "shared-id"\n'
        'secret_access_key = "shared-secret"\n'
        "[worker]\n"
        's3_endpoint_url = "http://images.internal:9000"\n'
        "[model]\n"
        's3_region = "eu-central-1"\n'
    )
    settings = load_settings(config)
    w = settings.worker
    images = s3_endpoint(
        settings, w.s3_endpoint_url, w.s3_region, w.s3_access_key_id, w.s3_secret_access_key
    )
    assert images == {
        "endpoint_url": "http://images.internal:9000",
        "region": "eu-west-1",
        "access_key_id": "shared-id",
        "secret_access_key": "shared-secret",
    }
    model = s3_endpoint(settings, settings.model.s3_endpoint_url, settings.model.s3_region)
    assert (model["endpoint_url"], model["region"], model["access_key_id"]) == (
        "http://minio.internal:9000",
        "eu-central-1",
        "shared-id",
    )
    fetcher = make_fetcher(settings)._by_scheme["s3"]
    assert (fetcher.endpoint_url, fetcher.region) == ("http://images.internal:9000", "eu-west-1")
    client = storage_s3_client(settings)
    assert client.meta.endpoint_url == "http://minio.internal:9000"
    assert client.meta.region_name == "eu-west-1"
    assert "shared-secret" not in str(masked_dump(settings))


def test_a_use_with_its_own_key_id_takes_its_own_pair_whole() -> None:
    settings = load_settings(
        s3={"access_key_id": "shared-id", "secret_access_key": "shared-secret"},
        storage={"s3_access_key_id": "own-id"},
    )
    s = settings.storage
    own = s3_endpoint(
        settings, s.s3_endpoint_url, s.s3_region, s.s3_access_key_id, s.s3_secret_access_key
    )
    assert (own["access_key_id"], own["secret_access_key"]) == ("own-id", "")


def test_without_any_s3_settings_storage_keeps_its_region_and_images_keep_boto3s() -> None:
    settings = load_settings()
    assert storage_s3_client(settings).meta.region_name == "us-east-1"
    w = settings.worker
    assert s3_endpoint(settings, w.s3_endpoint_url, w.s3_region) == {
        "endpoint_url": "",
        "region": "",
        "access_key_id": "",
        "secret_access_key": "",
    }
