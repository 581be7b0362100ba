"""Configuration: one TOML file plus environment overrides, validated at start-up.

Precedence (highest first): environment variables ``IMGFLEET_<SECTION>__<KEY>``, the file
named by ``--config`` or ``IMGFLEET_CONFIG``, then the defaults below. Secrets are
``SecretStr`` so they print masked in ``imgfleet config show`` and in logs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common.errors import ConfigError


class _Section(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Section):
    kind: Literal["local", "rabbitmq", "kafka"] = "local"
    url: SecretStr = SecretStr("")  # amqp(s):// or kafka bootstrap; may carry credentials
    local_path: Path = Path("imgfleet-data/queue.sqlite3")
    visibility_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)
    prefetch: int = Field(default=256, ge=1)
    poll_interval_s: float = Field(default=0.2, gt=0)


class StorageConfig(_Section):
    kind: Literal["local", "s3"] = "local"
    root: Path = Path("imgfleet-data/store")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_access_key_id: SecretStr = SecretStr("")
    s3_secret_access_key: SecretStr = SecretStr("")


class WorkerConfig(_Section):
    fetch_concurrency: int = Field(default=32, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=15.0, gt=0)
    total_timeout_s: float = Field(default=30.0, gt=0)
    max_download_bytes: int = Field(default=32 * 2**20, gt=0)
    decode_processes: int = Field(default=0, ge=0)  # 0: one per core
    max_pixels: int = Field(default=50_000_000, gt=0)
    truncated_policy: Literal["index", "dead_letter"] = "index"
    max_batch: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=50.0, ge=0)
    segment_max_records: int = Field(default=512, ge=1)
    segment_flush_interval_s: float = Field(default=2.0, gt=0)
    stage_queue_size: int = Field(default=64, ge=1)
    shutdown_deadline_s: float = Field(default=30.0, gt=0)
    embed_threads: int = Field(default=0, ge=0)  # 0: torch picks from the core count


class ModelConfig(_Section):
    path: str = "default"  # "default" or a TorchScript file
    device: str = "auto"  # auto | cpu | cuda


class IndexConfig(_Section):
    n_shards: int = Field(default=4, ge=1, le=4096)


class LoggingConfig(_Section):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGFLEET_", env_nested_delimiter="__", extra="forbid"
    )

    broker: BrokerConfig = BrokerConfig()
    storage: StorageConfig = StorageConfig()
    worker: WorkerConfig = WorkerConfig()
    model: ModelConfig = ModelConfig()
    index: IndexConfig = IndexConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("broker")
    @classmethod
    def _remote_broker_needs_url(cls, v: BrokerConfig) -> BrokerConfig:
        if v.kind != "local" and not v.url.get_secret_value():
            raise ValueError(f"broker.url is required for broker.kind={v.kind!r}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; env must beat them.
        return (env_settings, init_settings)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise ConfigError with every problem listed."""
    file_values: dict[str, Any] = {}
    path = path or os.environ.get("IMGFLEET_CONFIG")
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for section, values in overrides.items():
        file_values.setdefault(section, {}).update(values)
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with every secret masked (for `config show` and logs)."""
    data = settings.model_dump(mode="json")  # SecretStr dumps as '**********'
    broker_url = settings.broker.url.get_secret_value()
    data["broker"]["url"] = mask_url(broker_url) if broker_url else ""
    return data


def mask_url(url: str) -> str:
    """Hide the password in scheme://user:password@host URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if user else f"{scheme}://***@{host}"
