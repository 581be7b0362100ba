from pathlib import Path

import pytest

from common.config import load_settings, mask_url, masked_dump
from common.errors import ConfigError


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "imgfleet.toml"
    cfg.write_text("[worker]\nmax_batch = 16\nfetch_concurrency = 3\n")
    monkeypatch.setenv("IMGFLEET_WORKER__MAX_BATCH", "64")
    settings = load_settings(cfg)
    assert settings.worker.max_batch == 64
    assert settings.worker.fetch_concurrency == 3


def test_invalid_values_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[worker]\nmax_batch = 0\n")
    with pytest.raises(ConfigError, match=r"worker\.max_batch"):
        load_settings(cfg)


def test_unknown_keys_and_missing_files_are_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[worker]\nmax_bacth = 3\n")
    with pytest.raises(ConfigError):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_remote_broker_requires_url() -> None:
    with pytest.raises(ConfigError, match=r"broker\.url"):
        load_settings(broker={"kind": "rabbitmq"})


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGFLEET_BROKER__URL", "amqp://guest:hunter2@rabbit:5672/")
    monkeypatch.setenv("IMGFLEET_STORAGE__S3_SECRET_ACCESS_KEY", "topsecret")
    shown = repr(masked_dump(load_settings()))
    assert "hunter2" not in shown and "topsecret" not in shown
    assert "amqp://guest:***@rabbit:5672/" in shown
    assert mask_url("http://host/x") == "http://host/x"
