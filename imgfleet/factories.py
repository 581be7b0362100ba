"""Settings -> objects: every translation of configuration into a working part.

The composition root's one factories module: the only place that picks a broker or
storage kind, sizes a decode pool, sets up a model, a fetcher, an index policy or a
nightly run's options from ``common.config.Settings``. Commands, servers and the demo
ask it; none of them reads a settings section to build an object itself.

Importing it costs no torch, no decoder (cv2, pyvips, PIL) and no FAISS: each heavy stack
is imported inside the factory that needs it, so the ops commands (status, dlq, requeue)
and the producers start in well under a second.
"""

from __future__ import annotations

import ipaddress
import os
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.brokers.base import Broker, DeadLetter
from common.brokers.local.broker import LocalBroker
from common.config import BrokerConfig, CmsConfig, IndexConfig, ProducerConfig, Settings
from common.errors import ConfigError
from common.observability.logging import get_logger
from common.storage.base import Storage
from common.storage.local import LocalStorage
from common.storage.s3_client import S3Endpoint
from workers.decode.limits import IN_FLIGHT_PER_PROCESS

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from pydantic import SecretStr

    from common.brokers.kafka.broker import KafkaBroker
    from common.observability.health import Health
    from common.observability.ops_http import OpsListen
    from common.schema import Lane
    from index.apply import Applier
    from index.params import IndexPolicy
    from index.segments import SegmentWriter
    from producers.catalogue.reader import Catalogue, ColumnMapping
    from producers.cms.runtime import IntakeSettings
    from producers.nightly.run import RunOptions
    from workers.decode.pool import DecodePool
    from workers.decode.routing import RoutedDecoder
    from workers.decode.types import Preprocess
    from workers.embed.embedder import ModelEmbedder
    from workers.embed.model_card import ModelCard
    from workers.embed.types import Embedder
    from workers.fetch.fetcher import UrlFetcher
    from workers.fetch.unchanged import KnownLookup
    from workers.pipeline import PipelineSettings, WorkerStats
    from workers.runtime import WorkerRuntime

# -- brokers and storage ------------------------------------------------------------------


def decode_processes(settings: Settings) -> int:
    return settings.worker.decode_processes or max(os.cpu_count() or 1, 1)


def broker_prefetch(settings: Settings) -> int:
    """Jobs a worker holds unsettled: what its stages can work on or queue at once.

    More only waits in memory (and, on RabbitMQ, counts toward consumer_timeout); less
    starves a stage. From settings alone: sizing it loads no decoder.
    """
    if settings.broker.prefetch:
        return settings.broker.prefetch
    w = settings.worker
    return (
        w.fetch_concurrency
        + IN_FLIGHT_PER_PROCESS * decode_processes(settings)
        + 3 * w.stage_queue_size
        + 2 * w.max_batch
    )


def make_broker(settings: Settings) -> Broker:
    b = settings.broker
    if b.kind == "local":
        return LocalBroker(
            b.local.path,
            prefetch=broker_prefetch(settings),
            visibility_timeout_s=b.local.visibility_timeout_s,
            poll_interval_s=b.local.poll_interval_s,
        )
    if b.kind == "rabbitmq":
        from common.brokers.rabbitmq.broker import RabbitMQBroker

        return RabbitMQBroker(b, prefetch=broker_prefetch(settings))
    if b.kind == "kafka":
        return kafka_broker(b, prefetch=broker_prefetch(settings))
    raise ConfigError(f"unknown broker.kind={b.kind!r}")


def kafka_broker(config: BrokerConfig, *, prefetch: int | None = None) -> KafkaBroker:
    """The Kafka adapter ``[broker]`` and ``[broker.kafka]`` describe; ``prefetch``: the
    bulk+retry window in jobs, as the other brokers get it (the pipeline's capacity);
    without it ``broker.prefetch``, which must then be set."""
    from common.brokers.kafka.broker import KafkaBroker
    from common.brokers.kafka.client import client_settings
    from common.brokers.kafka.topics import KafkaTopics

    k = config.kafka
    return KafkaBroker(
        client_settings(config),
        KafkaTopics.build(config.name_prefix, k.retry_delays_s),
        k,
        prefetch=config.prefetch if prefetch is None else prefetch,
    )


async def read_dead_letters(settings: Settings, limit: int = 10**9) -> list[DeadLetter]:
    """Every dead-lettered job the configured broker holds, read without removing any."""
    broker = make_broker(settings)
    await broker.connect()
    try:
        return await broker.dead_letters(limit=limit)
    finally:
        await broker.close()


def make_storage(settings: Settings) -> Storage:
    s = settings.storage
    if s.kind == "local":
        return LocalStorage(s.root)
    if s.kind == "s3":
        from common.storage.s3 import S3Storage

        where = _storage_endpoint(settings)
        return S3Storage(
            s.s3_bucket,
            _storage_client(settings, where),
            prefix=s.s3_prefix,
            endpoint_url=where["endpoint_url"] or None,
            conditional_writes=s.s3_conditional_writes,
        )
    raise ConfigError(f"unknown storage.kind={s.kind!r}")


# -- S3: one shared [s3] endpoint, each use's own s3_* keys over it ---------------------

# botocore's region when neither [storage] nor [s3] names one: the index storage has always
# pinned one, so a region in the environment (AWS_REGION) does not move the index.
STORAGE_DEFAULT_REGION = "us-east-1"


def s3_endpoint(
    settings: Settings,
    endpoint_url: str = "",
    region: str = "",
    access_key_id: SecretStr | None = None,
    secret_access_key: SecretStr | None = None,
) -> S3Endpoint:
    """One use's endpoint, region and credentials: its own where set, else ``[s3]``'s.

    The key pair is taken whole from one place, never an id from one and a secret from
    the other. Empty values keep boto3's defaults (AWS, its credential chain)."""
    shared = settings.s3
    if access_key_id is None or not access_key_id.get_secret_value():
        access_key_id, secret_access_key = shared.access_key_id, shared.secret_access_key
    key_id = access_key_id.get_secret_value()
    secret = secret_access_key.get_secret_value() if secret_access_key is not None else ""
    return S3Endpoint(
        endpoint_url=endpoint_url or shared.endpoint_url,
        region=region or shared.region,
        access_key_id=key_id,
        secret_access_key=secret,
    )


def storage_s3_client(settings: Settings) -> Any:
    """The S3 client of the index storage and of s3:// catalogues, which share it."""
    return _storage_client(settings, _storage_endpoint(settings))


def _storage_endpoint(settings: Settings) -> S3Endpoint:
    s = settings.storage
    where = s3_endpoint(
        settings, s.s3_endpoint_url, s.s3_region, s.s3_access_key_id, s.s3_secret_access_key
    )
    where["region"] = where["region"] or STORAGE_DEFAULT_REGION
    return where


def _storage_client(settings: Settings, where: S3Endpoint) -> Any:
    from common.storage.s3_client import make_s3_client

    s = settings.storage
    return make_s3_client(
        **where,
        connect_timeout_s=s.s3_timeout_s,
        read_timeout_s=s.s3_timeout_s,
        max_attempts=s.s3_max_attempts,
    )


# Read-only commands (status, dlq, search, index status) must leave no state behind:
# LocalStorage creates its root and the local broker its queue file, so a `status` in an
# empty directory used to leave ./imgfleet-data/ there. They ask these first.


def existing_storage(settings: Settings) -> Storage | None:
    """The configured storage, or None where a local store was never written."""
    s = settings.storage
    if s.kind == "local" and not s.root.is_dir():
        return None
    return make_storage(settings)


def missing_local_queue(settings: Settings) -> Path | None:
    """The local broker's queue file where it does not exist yet (nothing was published).

    A path that cannot become a file (a file in the way) is not "missing": connecting
    reports it as the configuration error it is.
    """
    b = settings.broker
    path = b.local.path
    if b.kind != "local" or path.exists():
        return None
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        return None
    return path


# -- the worker's parts -------------------------------------------------------------------


def pipeline_settings(settings: Settings) -> PipelineSettings:
    from workers.pipeline import PipelineSettings

    w, b = settings.worker, settings.broker
    return PipelineSettings(
        fetch_concurrency=w.fetch_concurrency,
        decode_concurrency=decode_processes(settings) * IN_FLIGHT_PER_PROCESS,
        max_batch=w.max_batch,
        max_wait_s=w.max_wait_ms / 1000.0,
        segment_max_records=w.segment_max_records,
        segment_flush_interval_s=w.segment_flush_interval_s,
        stage_queue_size=w.stage_queue_size,
        max_attempts=b.max_attempts,
        retry_base_s=b.retry_base_s,
        retry_max_s=b.retry_max_s,
        shutdown_deadline_s=w.shutdown_deadline_s,
        index_recovered=w.truncated_policy == "index",
        consume_give_up_s=w.broker_give_up_s,
    )


def embed_device(settings: Settings) -> str:
    device = settings.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def embed_threads(settings: Settings, device: str) -> int:
    """Intra-op threads for the embedder: explicit settings win, else fit the machine.

    On a GPU the CPU side only stages batches, so two threads are plenty. On the CPU the
    model and the decode processes share the cores; torch's default (one thread per core)
    oversubscribes them while decode runs, and spinning OpenMP threads steal the decoders'
    time.
    """
    from workers.embed.embedder import usable_cpus

    explicit = settings.model.threads or settings.worker.embed_threads
    if explicit:
        return explicit
    cpus = usable_cpus()
    if device.startswith("cuda"):
        return min(2, cpus)
    return embed_threads_for_cpu(cpus, decode_processes(settings))


def embed_threads_for_cpu(cpus: int, decode_procs: int) -> int:
    # Measured on 2 cores (bench/embed.py): all cores for the model is fastest end to end,
    # because decode is the smaller share of the work; above 4 cores keep half the cores
    # for decode, which then is the larger share.
    if cpus <= 4:
        return cpus
    return max(2, cpus - min(decode_procs, cpus // 2))


def make_embedder(settings: Settings) -> ModelEmbedder:
    """The configured model on the configured device; refuses (``ConfigError``, exit 2) a
    model whose preprocessing contradicts a pinned ``worker.decode_*`` value."""
    from workers.embed.backends import EngineOptions
    from workers.embed.embedder import ModelEmbedder
    from workers.embed.model import load_model

    m = settings.model
    device = embed_device(settings)
    loaded = load_model(
        resolve_model(settings, m.path),
        cache_dir=m.download_dir,
        offline=m.offline,
        weights=resolve_model(settings, m.weights) if m.weights else "",
    )
    check_decode_pins(settings, loaded.card)
    options = EngineOptions(
        backend=m.backend,
        precision=m.precision,
        max_batch=settings.worker.max_batch,
        preferred_batch_sizes=tuple(m.preferred_batch_sizes),
        instances=m.instances,
        in_flight=m.in_flight,
        channels_last=m.channels_last,
        compile_mode=m.compile,
        cuda_graphs=m.cuda_graphs,
        engine_cache_dir=str(m.engine_cache_dir),
        int8_calibration_dir=m.int8_calibration_dir,
    )
    threads = embed_threads(settings, device)
    return ModelEmbedder(loaded, device=device, threads=threads, options=options)


def resolve_model(settings: Settings, path: str) -> str:
    """A model spec or file as load_model takes it: s3:// files downloaded into the cache."""
    from workers.embed.model_sources import resolve_model_path

    m = settings.model
    return resolve_model_path(
        path, cache_dir=m.download_dir, s3=s3_endpoint(settings, m.s3_endpoint_url, m.s3_region)
    )


def check_decode_pins(settings: Settings, card: ModelCard) -> None:
    """Each ``worker.decode_*`` that is set must be what the model's card asks for."""
    w, spec = settings.worker, card.preprocess
    pins: tuple[tuple[str, object, object], ...] = (
        ("worker.decode_size", w.decode_size, spec.size),
        ("worker.decode_resize", w.decode_resize, spec.resize),
        ("worker.decode_interpolation", w.decode_interpolation, spec.interpolation),
    )
    for key, pinned, wanted in pins:
        if pinned and pinned != wanted:
            raise ConfigError(
                f"{key} = {pinned!r} but model {card.name} takes {wanted!r} "
                f"({spec.describe()}); set {key} to {wanted!r}, or unset it to follow the model"
            )


def embed_one(settings: Settings, data: bytes, embedder: Callable[[], Embedder]) -> np.ndarray:
    """Decode and embed one image (a query) with the worker's own decoder and model.

    Bytes that are no image at all fail (``JobFailure``) before any model is loaded; the
    decode itself needs the model's preprocessing.
    """
    import numpy as np

    from workers.decode.cpu import decode_image, image_format_of

    image_format_of(data)  # no image at all: refused before the model loads
    model = embedder()
    pixels = decode_image(
        data,
        preprocess=model.preprocess,
        max_pixels=settings.worker.max_pixels,
        shrink_on_load=settings.worker.decode_shrink_on_load,
    ).pixels
    vector: np.ndarray = model.embed(pixels[np.newaxis])[0]
    return vector


def make_fetcher(settings: Settings) -> UrlFetcher:
    from workers.fetch.fetcher import FileFetcher, UrlFetcher
    from workers.fetch.http import HttpFetcher
    from workers.fetch.s3 import S3Fetcher

    w = settings.worker
    s3 = S3Fetcher(
        **s3_endpoint(
            settings, w.s3_endpoint_url, w.s3_region, w.s3_access_key_id, w.s3_secret_access_key
        ),
        connect_timeout_s=w.connect_timeout_s,
        read_timeout_s=w.read_timeout_s,
        max_bytes=w.max_download_bytes,
        max_connections=w.fetch_per_host_limit,
    )
    http = HttpFetcher(
        connect_timeout_s=w.connect_timeout_s,
        read_timeout_s=w.read_timeout_s,
        total_timeout_s=w.total_timeout_s,
        max_bytes=w.max_download_bytes,
        max_redirects=w.fetch_max_redirects,
        per_host_limit=w.fetch_per_host_limit,
        total_limit=w.fetch_concurrency,
        allow_networks=w.fetch_allow_networks,
        retries=w.fetch_retries,
        retry_after_max_s=settings.broker.retry_after_max_s,
    )
    files = FileFetcher(max_bytes=w.max_download_bytes) if w.allow_file_urls else None
    return UrlFetcher(http, s3=s3, files=files)


def make_decode_pool(settings: Settings, *, on_restart: Callable[[], None]) -> DecodePool:
    from workers.decode.pool import DecodePool

    w = settings.worker
    return DecodePool(
        decode_processes(settings),
        max_pixels=w.max_pixels,
        recover_truncated=True,
        min_decoded_fraction=w.recovered_min_fraction,
        shrink_on_load=w.decode_shrink_on_load,
        max_restarts=w.decode_pool_max_restarts,
        on_restart=on_restart,
        timeout_s=w.decode_timeout_s,
    )


def make_decoder(
    settings: Settings, pool: DecodePool, preprocess: Preprocess
) -> DecodePool | RoutedDecoder:
    """The CPU pool, fronted by the nvJPEG route where CUDA and torchvision are present;
    both decode for the model's ``preprocess``."""
    from workers.decode.nvjpeg import GpuJpegDecoder, gpu_available

    pool.set_preprocess(preprocess)
    if settings.worker.gpu_decode == "off" or not gpu_available():
        return pool
    from workers.decode.routing import DecodeRouter, RoutedDecoder

    get_logger("worker").info("GPU JPEG decode on; PNG, WebP and rejected JPEGs go to the CPU pool")
    return RoutedDecoder(
        pool,
        GpuJpegDecoder(preprocess),
        DecodeRouter(gpu_available=True),
        max_pixels=settings.worker.max_pixels,
        max_batch=settings.worker.max_batch,
    )


class SettingsWorkerParts:
    """``workers.runtime.WorkerParts`` from settings; one storage for the writer and the
    unchanged-image lookup, made on first use."""

    def __init__(
        self, settings: Settings, *, worker_id: str, embedder: ModelEmbedder | None = None
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self._embedder = embedder
        self._storage: Storage | None = None

    def _shared_storage(self) -> Storage:
        if self._storage is None:
            self._storage = make_storage(self.settings)
        return self._storage

    def segment_writer(self) -> SegmentWriter:
        from index.segments import SegmentWriter

        storage = self._shared_storage()
        return SegmentWriter(storage, self.settings.index.n_shards, self.worker_id)

    def known_images(self) -> KnownLookup | None:
        if not self.settings.worker.skip_unchanged:
            return None
        from index.known import KnownImages

        return KnownImages(self._shared_storage())

    def decode_pool(self, on_restart: Callable[[], None]) -> DecodePool:
        return make_decode_pool(self.settings, on_restart=on_restart)

    def load_embedder(self) -> ModelEmbedder:
        return self._embedder or make_embedder(self.settings)

    def fetcher(self) -> AbstractAsyncContextManager[UrlFetcher]:
        return make_fetcher(self.settings)

    def decoder(self, pool: DecodePool, preprocess: Preprocess) -> DecodePool | RoutedDecoder:
        return make_decoder(self.settings, pool, preprocess)


def ops_listen(settings: Settings) -> OpsListen | None:
    """Where a process serves /metrics, /healthz and /readyz; None: metrics disabled."""
    from common.observability.ops_http import OpsListen

    m = settings.metrics
    return OpsListen(m.host, m.port, m.port_file or None) if m.enabled else None


def make_worker_runtime(
    settings: Settings,
    *,
    worker_id: str,
    embedder: ModelEmbedder | None = None,
    serve_ops: bool = False,
) -> WorkerRuntime:
    """One worker process over the configured broker, storage, model and decoders.

    ``serve_ops`` starts the ops listener (``/metrics``, ``/healthz``, ``/readyz`` on
    ``metrics.host:metrics.port``) for the life of the worker; `imgfleet work` turns it on
    when ``metrics.enabled``. A given ``embedder`` is used instead of loading the model.
    """
    from common.observability.metrics import default_metrics
    from workers.runtime import RuntimeSettings, WorkerRuntime

    m = settings.metrics
    runtime_settings = RuntimeSettings(
        worker_id=worker_id,
        pipeline=pipeline_settings(settings),
        broker_give_up_s=settings.worker.broker_give_up_s,
        stall_after_s=m.stall_after_s,
        queue_poll_interval_s=m.queue_poll_interval_s,
        ops=ops_listen(settings) if serve_ops else None,
    )
    return WorkerRuntime(
        make_broker(settings),
        SettingsWorkerParts(settings, worker_id=worker_id, embedder=embedder),
        runtime_settings,
        metrics=default_metrics(),
    )


async def run_worker(
    settings: Settings,
    *,
    worker_id: str,
    until_idle: bool = False,
    progress_total: int | None = None,
    embedder: ModelEmbedder | None = None,
    serve_ops: bool = False,
) -> WorkerStats:
    """Run one worker until SIGTERM/SIGINT (or until the queue is drained): see
    ``workers.runtime.WorkerRuntime.run`` for what it raises."""
    runtime = make_worker_runtime(
        settings, worker_id=worker_id, embedder=embedder, serve_ops=serve_ops
    )
    return await runtime.run(until_idle=until_idle, progress_total=progress_total)


# -- the index ----------------------------------------------------------------------------


def policy_from_config(config: IndexConfig) -> IndexPolicy:
    from index.params import IndexPolicy

    return IndexPolicy(
        flat_max_vectors=config.flat_max_vectors,
        memory_budget_bytes=config.memory_budget_mb * 2**20,
        list_size=config.list_size,
        max_train_vectors=config.max_train_vectors,
        recall_target=config.recall_target,
        eval_queries=config.eval_queries,
        nprobe=config.nprobe,
        use_gpu=config.use_gpu,
    )


def configure_faiss_threads(settings: Settings) -> None:
    """FAISS's OpenMP threads for this process (``index.threads``; 0 leaves its default).

    Called by every command that builds, applies or searches an index.
    """
    if settings.index.threads:
        import faiss

        faiss.omp_set_num_threads(settings.index.threads)


def make_applier(settings: Settings, *, health: Health | None = None) -> Applier:
    from index.apply import Applier

    c = settings.index
    return Applier(
        make_storage(settings),
        policy=policy_from_config(c),
        grace_s=c.grace_s,
        compact_delta_fraction=c.compact_delta_fraction,
        retrain_fraction=c.retrain_fraction,
        health=health,
    )


# -- the nightly run ----------------------------------------------------------------------


def run_options(
    settings: Settings,
    *,
    run_id: str,
    source: str,
    lane: Lane,
    max_rate_per_s: float | None,
    no_deletes: bool,
    allow_mass_delete: bool,
    resume: bool,
    rejects_path: str | None,
) -> RunOptions:
    """A catalogue run's options: ``[producer]`` settings, overridden by the command's."""
    from producers.nightly.run import RunOptions

    p = settings.producer
    return RunOptions(
        run_id=run_id,
        source=source,
        catalogue=p.catalogue_name,
        lane=lane,
        batch_size=p.batch_size,
        in_flight=p.publish_in_flight,
        checkpoint_interval_s=p.checkpoint_interval_s,
        progress_interval_s=p.progress_interval_s,
        max_rate_per_s=p.max_rate_per_s if max_rate_per_s is None else max_rate_per_s,
        delete_missing=p.delete_missing and not no_deletes,
        max_delete_fraction=p.max_delete_fraction,
        allow_mass_delete=allow_mass_delete,
        resume=resume,
        rejects_path=Path(rejects_path) if rejects_path else None,
    )


def open_catalogue(settings: Settings, source: str, *, format: str | None) -> Catalogue:
    """The catalogue at ``source`` (a path or s3://), read with ``[producer]``'s column
    mapping; an s3:// source with ``[storage]``'s S3 client settings."""
    from producers.catalogue.reader import open_catalogue as open_source
    from producers.catalogue.sources import is_s3_url

    s3_client = storage_s3_client(settings) if is_s3_url(source) else None
    return open_source(
        source, column_mapping(settings.producer), s3_client=s3_client, format=format
    )


def column_mapping(config: ProducerConfig) -> ColumnMapping:
    """``[producer]``'s columns: which hold the item id, the image URLs, version and ETag."""
    from producers.catalogue.reader import ColumnMapping

    return ColumnMapping(
        item_id=config.item_id_column,
        image_urls=tuple(config.image_url_columns),
        version=config.version_column,
        etag=config.etag_column,
        url_separator=config.url_separator,
        max_images_per_item=config.max_images_per_item,
    )


# -- the CMS intake -----------------------------------------------------------------------


def intake_settings(
    cms: CmsConfig, producer: ProducerConfig, *, insecure_no_auth: bool = False
) -> IntakeSettings:
    """Settings for an intake listening on ``cms.host``; refuse to run open by accident."""
    from producers.cms.runtime import IntakeSettings

    tokens = tuple(t.get_secret_value() for t in cms.tokens)
    if any(not t.strip() for t in tokens):
        raise ConfigError("cms.tokens holds an empty token")
    if insecure_no_auth:
        if not _is_loopback(cms.host):
            raise ConfigError(
                f"--insecure-no-auth only binds a loopback address, not cms.host="
                f"{cms.host!r}; configure cms.tokens for anything else"
            )
        tokens = ()
    elif not tokens:
        raise ConfigError(
            "cms.tokens is empty: the intake will not accept unauthenticated changes. "
            "Set IMGFLEET_CMS__TOKENS='[\"<token>\"]' (several for rotation), or pass "
            "--insecure-no-auth for a loopback development listener"
        )
    return IntakeSettings(
        tokens=tokens,
        max_items_per_request=cms.max_items_per_request,
        max_body_bytes=cms.max_body_bytes,
        max_images_per_item=producer.max_images_per_item,
        publish_timeout_s=cms.publish_timeout_s,
        idempotency_ttl_s=cms.idempotency_ttl_s,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
