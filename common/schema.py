"""The job message: versioned, validated on the way in and on the way out.

One job is one image of one catalogue item. An item with several images becomes several
jobs that share ``item_id`` and differ in ``image_key``.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import BadMessageError, Reason
from common.identity import image_id_for

SCHEMA_VERSION = 1


class Op(StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"


class Lane(StrEnum):
    LIVE = "live"  # CMS and requeue traffic, served first
    BULK = "bulk"  # nightly runs


class FailureRecord(BaseModel):
    """One earlier dead-lettering of a job, kept when ops requeue it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str
    error: str = Field(default="", max_length=2000)
    attempts: int = Field(default=0, ge=0)
    failed_at_s: float = 0.0
    requeued_at_s: float = 0.0


MAX_HISTORY = 20  # a job requeued more often keeps its newest failures
# A job's field limits. Producers check rows and requests against them first, so a bad row
# or change is rejected with its reason rather than failing when its jobs are built.
MAX_ITEM_ID_CHARS = 512
MAX_IMAGE_KEY_CHARS = 512
MAX_URL_CHARS = 8192


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str = "adhoc"
    item_id: str = Field(min_length=1, max_length=MAX_ITEM_ID_CHARS)
    image_key: str = Field(default="0", min_length=1, max_length=MAX_IMAGE_KEY_CHARS)
    op: Op = Op.UPSERT
    url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    version: int = Field(default=0, ge=0)
    attempt: int = Field(default=0, ge=0)
    lane: Lane = Lane.BULK
    created_at_s: float = Field(default_factory=time.time)
    etag: str | None = None
    # Catalogue attributes for search (``common.payload``), already coerced by the producer.
    payload: dict[str, str | bool | float] = Field(default_factory=dict, max_length=64)
    # Earlier dead-letterings, oldest first (requeued jobs keep why they failed before).
    history: tuple[FailureRecord, ...] = Field(default=(), max_length=MAX_HISTORY)

    @model_validator(mode="after")
    def _upsert_needs_url(self) -> Job:
        if self.op is Op.UPSERT and not self.url:
            raise ValueError("an upsert job needs a url")
        return self

    @property
    def image_id(self) -> int:
        return image_id_for(self.item_id, self.image_key)

    def next_attempt(self) -> Job:
        return self.model_copy(update={"attempt": self.attempt + 1})

    def requeued(self, failure: FailureRecord, lane: Lane = Lane.LIVE) -> Job:
        """This job back for a fresh set of attempts, its failure added to its history."""
        history = (*self.history, failure)[-MAX_HISTORY:]
        return self.model_copy(update={"attempt": 0, "lane": lane, "history": history})

    def to_bytes(self) -> bytes:
        # pydantic-core's own JSON writer: compact, no raw newlines, ~2.5x model_dump+orjson.
        return self.__pydantic_serializer__.to_json(self)

    def log_context(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "item_id": self.item_id,
            "image_id": self.image_id,
        }


def decode_job(body: bytes) -> Job:
    """Parse and validate a message body; any defect is a permanent ``bad_message``."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadMessageError(f"message is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadMessageError("message is not a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BadMessageError(
            f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})",
            Reason.UNSUPPORTED_SCHEMA,
        )
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise BadMessageError(f"invalid job: {where}: {first['msg']}") from exc
