"""Failure classes with stable reason codes.

Every failure a job can meet is either transient (retry with backoff) or permanent
(straight to the DLQ). The reason code is what ops filter and requeue by, so the codes are
part of the public contract: add new ones, never rename.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # permanent
    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    UNSUPPORTED_URL = "unsupported_url"
    HTTP_404 = "http_404"
    HTTP_4XX = "http_4xx"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INTERNAL = "internal_error"  # a bug: retried like a transient failure, then dead-lettered
    # transient
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    CONNECTION = "connection"
    DECODER_CRASHED = "decoder_crashed"
    BROKER = "broker"
    STORAGE = "storage"


class ImgfleetError(Exception):
    """Base of every error the project raises on purpose."""

    reason: Reason = Reason.UNDECODABLE
    transient: bool = False

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason.value


class PermanentError(ImgfleetError):
    """Retrying cannot help: the job goes to the DLQ with this reason."""

    transient = False


class TransientError(ImgfleetError):
    """May succeed later: retried with jittered backoff up to the attempt limit."""

    transient = True
    reason = Reason.CONNECTION


class BadMessageError(PermanentError):
    reason = Reason.BAD_MESSAGE


class ConfigError(ImgfleetError):
    """Configuration is invalid; raised at start-up, never for a single job."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ImgfleetError) and exc.transient
