"""Where a model comes from: the built-in default, a local file, or an s3:// object.

An s3:// model is downloaded once into a local cache next to its card and its twin (the
TorchScript file of an ONNX model and the other way round); the cache entry is keyed by
the object's ETag, so a replaced object is fetched again and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, Reason, TransientError
from common.files import write_atomic
from common.observability.logging import get_logger
from common.storage.s3_client import S3Endpoint, make_s3_client
from workers.embed.model_card import CARD_SUFFIX

# What load_model (workers/embed/model.py) takes by name rather than as a file.
DEFAULT_ALIASES = frozenset({"", "default", "efficientnet-lite0"})
PLUMBING = "plumbing"
FAMILY_PREFIXES = ("timm:", "open_clip:", "hf:")

_log = get_logger(__name__)

# Files that travel with a model: its card, and the twin another backend runs.
_COMPANION_SUFFIXES = (CARD_SUFFIX, ".onnx", ".pt")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_model_url(url: str) -> S3Location:
    rest = url.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ConfigError(f"model path {url!r} is not s3://bucket/key")
    return S3Location(bucket, key)


def resolve_model_path(
    path: str,
    *,
    cache_dir: str | Path,
    s3: S3Endpoint | None = None,
    s3_client: Any = None,
) -> str:
    """Model names ("default", "plumbing", timm:/open_clip:/hf: specs) and local paths pass
    through; s3:// is downloaded and its local path returned."""
    if path in DEFAULT_ALIASES or path == PLUMBING or path.startswith(FAMILY_PREFIXES):
        return path
    if not path.startswith("s3://"):
        local = Path(path).expanduser()
        if not local.is_file():
            raise ConfigError(f"model file {local} does not exist")
        return str(local)
    location = parse_s3_model_url(path)
    # ``s3``: endpoint, region and credentials (imgfleet.factories.s3_endpoint: [s3]'s, so
    # model files are read by the same role that reads images); empty credentials fall
    # back to boto3's own chain (environment, profile, instance role).
    client = s3_client or (make_s3_client(**s3) if s3 else make_s3_client())
    return str(_download(client, location, Path(cache_dir)))


def _download(client: Any, location: S3Location, cache_dir: Path) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
            raise ConfigError(f"model {location.url} cannot be read: {code}") from exc
        raise TransientError(f"model {location.url}: {exc}", Reason.STORAGE) from exc
    except BotoCoreError as exc:
        raise TransientError(f"model {location.url}: {exc}", Reason.STORAGE) from exc
    etag = str(head.get("ETag", "")).strip('"')
    entry = cache_dir / hashlib.sha256(f"{location.url}|{etag}".encode()).hexdigest()[:24]
    name = Path(location.key).name
    target = entry / name
    if target.is_file():
        _log.info("model_cache_hit", model=location.url, path=str(target))
        return target
    _log.info("model_download", model=location.url, bytes=head.get("ContentLength"))
    stem_key = location.key[: len(location.key) - len(Path(location.key).suffix)]
    for suffix in _COMPANION_SUFFIXES:
        companion_key = stem_key + suffix
        if companion_key == location.key:
            continue
        try:
            _get(client, location.bucket, companion_key, entry / Path(companion_key).name)
        except ClientError:
            continue  # companions are optional; the loader says what is missing
    # The model file last: its presence is what marks the cache entry complete.
    _get(client, location.bucket, location.key, target)
    return target


def _get(client: Any, bucket: str, key: str, target: Path) -> None:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        write_atomic(target, body.read())
    finally:
        body.close()
