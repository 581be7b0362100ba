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


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[worker]\nmax_batch = 0\n", r"worker\.max_batch"),
        # A key of [broker.local] set at its earlier flat place too: both are named.
        (
            '[broker]\nlocal_path = "a.sqlite3"\n[broker.local]\npath = "b.sqlite3"\n',
            r"broker\.local_path and broker\.local\.path",
        ),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, text: str, named: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=named):
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


def test_an_unknown_environment_section_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMGFLEET_WORKR__MAX_BATCH", "64")
    with pytest.raises(ConfigError, match=r"IMGFLEET_WORKR__MAX_BATCH.*IMGFLEET_WORKER__"):
        load_settings()
    monkeypatch.delenv("IMGFLEET_WORKR__MAX_BATCH")
    monkeypatch.setenv("imgfleet_nosuch__x", "1")  # the names are case-insensitive
    with pytest.raises(ConfigError, match=r"imgfleet_nosuch__x: no configuration section"):
        load_settings()
    monkeypatch.delenv("imgfleet_nosuch__x")
    # Without the section delimiter a variable is not a setting: left alone.
    monkeypatch.setenv("IMGFLEET_HEALTHCHECK_URL", "http://127.0.0.1:9400/healthz")
    monkeypatch.setenv("IMGFLEET_WORKER__MAX_BATCH", "64")
    assert load_settings().worker.max_batch == 64
