"""Configuration: one TOML file plus environment overrides, validated at start-up.

Precedence (highest first): environment variables ``IMGFLEET_<SECTION>__<KEY>``, the file
named by ``--config`` or ``IMGFLEET_CONFIG``, then the defaults below. Secrets are
``SecretStr`` so they print masked in ``imgfleet config show`` and in logs.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

import common.defaults as defaults
from common.errors import ConfigError
from common.payload import FieldType, PayloadSchema


class _Section(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class RabbitMQConfig(_Section):
    queue_type: Literal["quorum", "classic"] = "quorum"
    publish_window: int = Field(default=64, ge=1)  # unconfirmed messages in flight
    jobs_per_message: int = Field(default=100, ge=1)  # several jobs in one AMQP message
    live_prefetch: int = Field(default=16, ge=1)  # the live lane's own window
    heartbeat_s: int = Field(default=30, ge=0)
    consumer_timeout_s: float = Field(default=1800.0, gt=0)  # the server's; we stay far below
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A producer's publish ledger (one classic queue per run, resume without republishing)
    # keeps this many newest messages; at least twice publish_window.
    ledger_max_messages: int = Field(default=2048, ge=2)

    @model_validator(mode="after")
    def _ledger_holds_two_windows(self) -> RabbitMQConfig:
        if self.ledger_max_messages < 2 * self.publish_window:
            raise ValueError("ledger_max_messages must be at least 2 x publish_window")
        return self


class KafkaConfig(_Section):
    partitions: int = Field(default=12, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    group_id: str = "imgfleet-workers"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    linger_ms: int = Field(default=20, ge=0)
    batch_size_bytes: int = Field(default=256 * 1024, ge=1024)
    # One retry topic per delay; a retry waits in the tier with the largest delay not
    # above the backoff the pipeline asked for.
    retry_delays_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 300.0], min_length=1)
    live_prefetch: int = Field(default=16, ge=1)  # the live topic's own window
    # On partition revoke, how long in-flight jobs may finish so their offsets are
    # committed before the partition goes (what is still running is redone elsewhere).
    revoke_wait_s: float = Field(default=5.0, ge=0)
    # How long the first contact with the bootstrap servers may take before the connect
    # fails with a one-line error (workers retry it up to worker.broker_give_up_s).
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> KafkaConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        if self.revoke_wait_s * 1000 >= self.max_poll_interval_ms:
            raise ValueError("revoke_wait_s must be below max_poll_interval_ms")
        if any(d < 0 for d in self.retry_delays_s):
            raise ValueError("retry_delays_s must not be negative")
        return self


class LocalBrokerConfig(_Section):
    """``[broker.local]``: the embedded SQLite broker (``broker.kind = "local"``)."""

    path: Path = Path("imgfleet-data/queue.sqlite3")
    visibility_timeout_s: float = Field(default=120.0, gt=0)  # an unsettled lease returns
    poll_interval_s: float = Field(default=0.2, gt=0)  # an idle consumer looks this often


# Keys of [broker.local] that earlier versions had flat in [broker]; still read there
# (file and IMGFLEET_BROKER__LOCAL_PATH alike), so existing configs keep working.
_MOVED_TO_BROKER_LOCAL = {
    "local_path": "path",
    "visibility_timeout_s": "visibility_timeout_s",
    "poll_interval_s": "poll_interval_s",
}


class BrokerConfig(_Section):
    kind: Literal["local", "rabbitmq", "kafka"] = "local"
    # amqp(s)://host/vhost or kafka bootstrap "host:port,host:port"; may carry credentials,
    # but username/password from the environment are preferred and win over the URL's.
    url: SecretStr = SecretStr("")
    username: str = ""
    password: SecretStr = SecretStr("")
    name_prefix: str = "imgfleet"  # queue / topic / exchange names start with this
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    rabbitmq: RabbitMQConfig = RabbitMQConfig()
    kafka: KafkaConfig = KafkaConfig()
    local: LocalBrokerConfig = LocalBrokerConfig()
    # Transient failures retry with backoff doubling from retry_base_s, each wait drawn
    # from [half, all] of its ceiling (workers.ack_policy). 8 attempts: one job's retries
    # span 63.5-127 s (median 95 s over 10^5 draws), so an origin restart or CDN failover
    # of a minute is outlived, and a dead image still reaches the DLQ in about 2 minutes
    # (plus its fetch timeouts). 5 attempts under full jitter spanned 0-15 s (median 7.5 s;
    # 6-8 s in the adversarial run): an origin blip of ~10 s dead-lettered all its images.
    max_attempts: int = Field(default=8, ge=1)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)
    # A 429/503 with Retry-After: that job retries no sooner than asked, and its host is
    # held off as long in this worker, up to this cap (a host asking for an hour would
    # park its images for an hour per attempt). 0: Retry-After is ignored. RabbitMQ gets
    # delay queues up to this long.
    retry_after_max_s: float = Field(default=120.0, ge=0)
    prefetch: int = Field(default=0, ge=0)  # jobs in flight per worker; 0: the pipeline's capacity

    @model_validator(mode="before")
    @classmethod
    def _flat_local_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in _MOVED_TO_BROKER_LOCAL):
            return data
        data = dict(data)
        local = data.get("local", {})
        if isinstance(local, LocalBrokerConfig):
            local = local.model_dump(exclude_unset=True)
        if not isinstance(local, Mapping):
            return data  # the section's own validation names the wrong type
        local = dict(local)
        for old, new in _MOVED_TO_BROKER_LOCAL.items():
            if old in data:
                if new in local:
                    raise ValueError(
                        f"broker.{old} and broker.local.{new} are both set: keep broker.local.{new}"
                    )
                local[new] = data.pop(old)
        data["local"] = local
        return data


class S3Config(_Section):
    """``[s3]``: the endpoint and credentials every S3 user shares: the index storage,
    s3:// catalogues, s3:// image URLs and s3:// models. ``[storage]``, ``[worker]`` and
    ``[model]`` override any of them with their own ``s3_*`` keys (empty: these)."""

    endpoint_url: str = ""  # empty: AWS; MinIO: http://host:9000
    region: str = ""  # empty: boto3's (environment, profile); storage falls back to us-east-1
    access_key_id: SecretStr = SecretStr("")  # empty: boto3's own credential chain
    secret_access_key: SecretStr = SecretStr("")


class StorageConfig(_Section):
    kind: Literal["local", "s3"] = "local"
    root: Path = Path("imgfleet-data/store")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_access_key_id: SecretStr = SecretStr("")
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_region: str = ""  # empty: s3.region, else us-east-1
    s3_max_attempts: int = Field(default=5, ge=1)  # botocore retries (standard mode)
    s3_timeout_s: float = Field(default=60.0, gt=0)
    # The manifest is written with If-Match / If-None-Match. An endpoint that ignores
    # them cannot stop two index writers racing: set this false there and run one writer.
    s3_conditional_writes: bool = True


class WorkerConfig(_Section):
    fetch_concurrency: int = Field(default=32, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=15.0, gt=0)
    total_timeout_s: float = Field(default=30.0, gt=0)
    max_download_bytes: int = Field(default=32 * 2**20, gt=0)
    fetch_per_host_limit: int = Field(default=16, ge=1)  # connections to one origin
    fetch_max_redirects: int = Field(default=5, ge=0)  # 0: redirects are not followed
    fetch_retries: int = Field(default=1, ge=0)  # in-place, connection-level failures only
    # SSRF guard: loopback, private, link-local and metadata addresses are refused unless
    # listed here (IPs or CIDR networks, e.g. ["10.20.0.0/16"]).
    fetch_allow_networks: list[str] = Field(default_factory=list)
    allow_file_urls: bool = True  # file:// for local runs; switch off in production
    # s3:// image URLs; each empty: [s3]'s (empty there too: AWS, boto3's credential chain)
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: SecretStr = SecretStr("")
    s3_secret_access_key: SecretStr = SecretStr("")
    skip_unchanged: bool = True  # conditional requests / equal hashes reuse stored vectors
    decode_processes: int = Field(default=0, ge=0)  # 0: one per core
    # auto: baseline/progressive JPEGs go to nvJPEG where CUDA and torchvision are present.
    gpu_decode: Literal["auto", "off"] = "auto"
    max_pixels: int = Field(default=defaults.MAX_PIXELS, gt=0)
    # Decode follows the model's preprocessing (its card). These pin it: set, a worker whose
    # model wants another value refuses to start (exit 2, naming both) instead of embedding
    # the catalogue wrongly or dead-lettering it. Empty / 0: follow the model.
    decode_size: int = Field(default=0, ge=0)
    decode_resize: Literal["", "crop", "squash", "pad"] = ""
    decode_interpolation: Literal["", "bilinear", "bicubic"] = ""
    # JPEG shrink-on-load (DCT scaling, never below the resize target): about 2x faster
    # decode of large JPEGs for vectors within cosine 0.99 of a full-size decode. Off: the
    # exact reference pixels (preprocess.reference_preprocess) on every path.
    decode_shrink_on_load: bool = True
    truncated_policy: Literal["index", "dead_letter"] = "index"
    # A recovered (truncated) JPEG with less of its rows decodable is dead-lettered.
    recovered_min_fraction: float = Field(default=0.5, ge=0, le=1)
    max_batch: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=50.0, ge=0)
    segment_max_records: int = Field(default=512, ge=1)
    segment_flush_interval_s: float = Field(default=2.0, gt=0)
    stage_queue_size: int = Field(default=64, ge=1)
    shutdown_deadline_s: float = Field(default=30.0, gt=0)
    embed_threads: int = Field(default=0, ge=0)  # 0: torch picks from the core count
    # The broker unreachable (first connect included) this long: exit 1 for a restart.
    broker_give_up_s: float = Field(default=300.0, gt=0)
    # Decode pool restarts in a row with no decode completing: exit 1 (the pool cannot
    # be restarted); a crashing image costs one restart, and successes reset the count.
    decode_pool_max_restarts: int = Field(default=defaults.DECODE_POOL_MAX_RESTARTS, ge=1)
    # One image's decode longer than this: its process is killed and replaced, the image
    # dead-lettered as undecodable (jobs in flight beside it are retried).
    decode_timeout_s: float = Field(default=defaults.DECODE_TIMEOUT_S, gt=0)


class ModelConfig(_Section):
    # "default" (EfficientNet-Lite0, ImageNet weights), "plumbing" (the random CNN, for
    # tests of the pipeline), timm:NAME, open_clip:ARCH/PRETRAINED, hf:REPO_OR_DIR, or a
    # TorchScript (.pt) / ONNX (.onnx) file, local or s3://bucket/key; a file's card (same
    # stem, .card.json) and the other format's twin are looked for beside it.
    path: str = "default"
    # A checkpoint for a timm:, open_clip: or hf: model instead of its hub weights; local
    # or s3://.
    weights: str = ""
    # Never reach a model hub: library models load from download_dir's cache or fail.
    offline: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: TensorRT when usable on a GPU; on a CPU, ONNX Runtime for ONNX-only models and
    # the built-in ones (11x faster than eager PyTorch for the default), else PyTorch.
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"  # auto: fp16 on GPU
    # Batch sizes the engine runs (batches are padded up to one); empty: the card's, else
    # powers of two up to worker.max_batch on a GPU and no padding on the CPU.
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    engine_cache_dir: Path = Path("imgfleet-data/engines")  # TensorRT engines, ONNX exports
    # s3:// models and library hub downloads (timm, open_clip, Hugging Face) are cached here.
    download_dir: Path = Path("imgfleet-data/models")
    s3_endpoint_url: str = ""  # for s3:// model paths; empty: [s3]'s, credentials too
    s3_region: str = ""
    instances: int = Field(default=1, ge=1, le=16)  # engine instances per GPU
    in_flight: int = Field(default=2, ge=1, le=16)  # chunks queued per GPU instance
    channels_last: bool = True
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    cuda_graphs: bool = False  # capture one graph per preferred batch size (PyTorch, GPU)
    int8_calibration_dir: str = ""  # images for INT8 calibration (precision = "int8")
    # CPU intra-op threads; 0: worker.embed_threads if set, else derived from the cores
    # left beside the decode processes.
    threads: int = Field(default=0, ge=0)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if any(size < 1 for size in v):
            raise ValueError("preferred_batch_sizes must be positive")
        return sorted(set(v))


class IndexConfig(_Section):
    n_shards: int = Field(default=4, ge=1, le=4096)
    # Shard parameters (index/params.py): exact Flat up to flat_max_vectors, IVF beyond,
    # SQ8 codes while vectors x dim bytes fit the per-shard budget, PQ otherwise.
    flat_max_vectors: int = Field(default=50_000, ge=0)
    memory_budget_mb: int = Field(default=4096, ge=1)  # per shard
    recall_target: float = Field(default=0.97, gt=0, le=1)
    eval_queries: int = Field(default=500, ge=0)  # held-back sample, drawn across shards
    nprobe: int = Field(default=0, ge=0)  # 0: tuned once per generation to recall_target
    list_size: int = Field(default=256, ge=8)  # vectors per IVF list, over the generation
    max_train_vectors: int = Field(default=262_144, ge=1000)
    threads: int = Field(default=0, ge=0)  # FAISS OpenMP threads; 0: one per core
    use_gpu: bool = True  # train IVF on a GPU when faiss-gpu sees one
    # Live apply and generations.
    grace_s: float = Field(default=600.0, ge=0)  # max delay from a segment's key time to visible
    apply_interval_s: float = Field(default=30.0, gt=0)
    compact_delta_fraction: float = Field(default=0.2, gt=0)
    retrain_fraction: float = Field(default=0.5, gt=0)
    keep_generations: int = Field(default=3, ge=1)  # prune keeps this many newest
    keep_days: float = Field(default=7.0, ge=0)  # ...and any younger than this
    # Search.
    reload_interval_s: float = Field(default=5.0, gt=0)
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8088, ge=0, le=65535)


class ProducerConfig(_Section):
    """The nightly catalogue run (`imgfleet produce catalogue`)."""

    # Which catalogue this is: deletes for disappeared items compare against the last
    # complete run of the same catalogue name.
    catalogue_name: str = "default"
    # Column mapping: JSONL keys / CSV headers / Parquet columns.
    item_id_column: str = "item_id"
    # One column holding a list (or `url_separator`-joined string), or several columns.
    image_url_columns: list[str] = Field(default_factory=lambda: ["image_urls"], min_length=1)
    version_column: str = "version"
    etag_column: str = ""  # empty: no ETag column
    url_separator: str = "|"
    max_images_per_item: int = Field(default=16, ge=1, le=1000)
    batch_size: int = Field(default=500, ge=1)  # jobs handed to the broker at once
    publish_in_flight: int = Field(default=4, ge=1)  # batches awaiting their confirms at once
    max_rate_per_s: float = Field(default=0.0, ge=0)  # jobs/s; 0: unlimited
    checkpoint_interval_s: float = Field(default=5.0, gt=0)  # resume point write interval
    delete_missing: bool = True  # items gone since the last complete run become deletes
    # Refuse a run that would delete more than this fraction of the last run's images
    # (a truncated dump must not empty the index); --allow-mass-delete overrides it.
    max_delete_fraction: float = Field(default=0.2, ge=0, le=1)
    progress_interval_s: float = Field(default=10.0, gt=0)


class CmsConfig(_Section):
    """The CMS intake (`imgfleet serve cms`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    # Bearer tokens accepted; several so a token can be rotated without downtime.
    tokens: list[SecretStr] = Field(default_factory=list)
    max_items_per_request: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=4 * 2**20, gt=0)
    idempotency_ttl_s: float = Field(default=86_400.0, gt=0)
    publish_timeout_s: float = Field(default=10.0, gt=0)


class PayloadConfig(_Section):
    """Catalogue attributes carried with each image into search (``common.payload``)."""

    # name -> "string" | "bool" | "number"; e.g. {brand = "string", in_stock = "bool"}.
    fields: dict[str, FieldType] = Field(default_factory=dict)
    # field -> catalogue column (JSONL key / CSV header / Parquet column) where they differ.
    columns: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> PayloadConfig:
        PayloadSchema(self.fields)  # names and types; raises ValueError
        unknown = sorted(set(self.columns) - set(self.fields))
        if unknown:
            raise ValueError(f"payload.columns names fields not in payload.fields: {unknown}")
        return self


class MetricsConfig(_Section):
    """Prometheus metrics and health endpoints, one HTTP listener per process."""

    enabled: bool = True
    host: str = "0.0.0.0"  # scraped from outside the pod
    port: int = Field(default=9400, ge=0, le=65535)  # 0: an ephemeral port (logged)
    # Liveness fails when the event loop or the embed stage has not moved for this long
    # while there is work.
    stall_after_s: float = Field(default=120.0, gt=0)
    queue_poll_interval_s: float = Field(default=15.0, gt=0)  # queue depth / lag gauges
    # The bound port is written here once listening (useful with port = 0).
    port_file: str = ""


class LoggingConfig(_Section):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMGFLEET_", env_nested_delimiter="__", extra="forbid"
    )

    broker: BrokerConfig = BrokerConfig()
    s3: S3Config = S3Config()
    storage: StorageConfig = StorageConfig()
    worker: WorkerConfig = WorkerConfig()
    model: ModelConfig = ModelConfig()
    index: IndexConfig = IndexConfig()
    producer: ProducerConfig = ProducerConfig()
    cms: CmsConfig = CmsConfig()
    payload: PayloadConfig = PayloadConfig()
    metrics: MetricsConfig = MetricsConfig()
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
    check_env_sections(os.environ)
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


_ENV_PREFIX = "IMGFLEET_"
_ENV_DELIMITER = "__"


def check_env_sections(environ: Mapping[str, str]) -> None:
    """Refuse ``IMGFLEET_<SECTION>__<KEY>`` variables whose section does not exist.

    pydantic-settings ignores them (extra="forbid" covers keys of known sections only), so
    a typo like IMGFLEET_WORKR__MAX_BATCH would be a setting silently not applied.
    Variables without the ``__`` delimiter are not settings (IMGFLEET_CONFIG, tokens).
    """
    sections = sorted(Settings.model_fields)
    problems = []
    for name in sorted(environ):
        upper = name.upper()  # the settings' environment names are case-insensitive
        if not upper.startswith(_ENV_PREFIX) or _ENV_DELIMITER not in upper:
            continue
        section = upper[len(_ENV_PREFIX) :].split(_ENV_DELIMITER, 1)[0].lower()
        if section in sections:
            continue
        close = difflib.get_close_matches(section, sections, n=1)
        hint = (
            f"did you mean {_ENV_PREFIX}{close[0].upper()}{_ENV_DELIMITER}...?"
            if close
            else f"sections: {', '.join(sections)}"
        )
        problems.append(f"{name}: no configuration section {section!r} ({hint})")
    if problems:
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}")


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
