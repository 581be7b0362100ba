"""One error hierarchy: job failures, operator errors, unrecoverable process errors.

- ``JobFailure`` (``PermanentError`` / ``TransientError``): what happened to one job. Its
  ``reason`` is the DLQ contract that ops filter and requeue by: add codes, never rename.
  A job failure always names its reason; there is no default.
- ``OperatorError``: a command refused or failed for a reason the operator must act on (a
  run conflict, the mass-delete guard, a generation that cannot be published). It carries
  the command's exit code and never reaches a job.
- ``ConfigError``: invalid settings or refused credentials, at start-up (exit 2).
- ``UnrecoverableError``: the process cannot go on (broker gone past its deadline, model
  or decode pool failed); it exits 1 and is restarted, and no job is settled because of it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Reason(StrEnum):
    # permanent
    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    UNSUPPORTED_URL = "unsupported_url"
    HTTP_404 = "http_404"
    HTTP_4XX = "http_4xx"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = (
        "unsupported_format"  # an image format no decoder here reads (JPEG XL, ...)
    )
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INTERNAL = "internal_error"  # a bug: retried like a transient failure, then dead-lettered
    # transient
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"  # rate limited (Too Many Requests), Retry-After honoured
    CONNECTION = "connection"
    DECODER_CRASHED = "decoder_crashed"
    BROKER = "broker"
    STORAGE = "storage"


class ExitCode(IntEnum):
    """Every exit status imgfleet's commands use (one table for workers and the CLI)."""

    OK = 0  # done; a worker stopped on SIGTERM (or drained) with in-flight work settled
    FAILED = 1  # a command failed; a worker's broker, model or decode pool is gone
    CONFIG = 2  # invalid configuration, credentials or usage: a restart alone will not help
    MASS_DELETE = 3  # the nightly run stopped before deleting more than the guard allows
    RUN_EXISTS = 4  # the run id is taken by another catalogue or state
    SUPERSEDED = 5  # a newer run of the catalogue serves: publishing would undo it (--force)
    OTHER_CATALOGUE = 6  # the index serves another catalogue_name (--force switches)
    INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C), after draining like SIGTERM

    # A worker's name for FAILED (the orchestrator restarts on anything but 0).
    UNRECOVERABLE = 1


class ImgfleetError(Exception):
    """Base of every error the project raises on purpose."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class JobFailure(ImgfleetError):
    """One job's failure, with the reason it is retried or dead-lettered under."""

    reason: Reason  # set by each subclass or passed in; never defaulted
    transient: bool

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        elif not isinstance(getattr(type(self), "reason", None), Reason):
            raise TypeError(f"{type(self).__name__} needs a reason: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Failures cross process boundaries (the decode pool returns them pickled). The
        # default rebuild calls __init__ with the message alone, which a required reason
        # refuses; rebuild from the arguments and the attributes (reason included) instead.
        return (_rebuild_failure, (type(self), self.args, self.__dict__))


def _rebuild_failure(
    cls: type[JobFailure], args: tuple[object, ...], state: dict[str, object]
) -> JobFailure:
    failure = cls.__new__(cls, *args)
    failure.args = args
    failure.__dict__.update(state)
    return failure


class PermanentError(JobFailure):
    """Retrying cannot help: the job goes to the DLQ with this reason."""

    transient = False


class TransientError(JobFailure):
    """May succeed later: retried with jittered backoff up to the attempt limit.

    ``retry_after_s``: the origin asked not to be asked again sooner (``Retry-After``, capped
    by ``broker.retry_after_max_s``); the retry waits at least that long. ``tried=False``:
    the job was not tried at all (its host is held off by another job's ``Retry-After``),
    so the retry does not use up one of its attempts.
    """

    transient = True
    retry_after_s: float | None = None
    tried: bool = True

    def __init__(
        self,
        message: str,
        reason: Reason | None = None,
        *,
        retry_after_s: float | None = None,
        tried: bool = True,
    ) -> None:
        super().__init__(message, reason)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        if not tried:
            self.tried = False


class BadMessageError(PermanentError):
    reason = Reason.BAD_MESSAGE


class OperatorError(ImgfleetError):
    """A command stopped for a reason the operator acts on; ``exit_code`` says which."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(OperatorError):
    """Configuration is invalid; raised at start-up, never for a single job."""

    exit_code = ExitCode.CONFIG


class UnrecoverableError(ImgfleetError):
    """The process cannot go on; it exits 1 and is restarted.

    It says nothing about the job that was running when it was raised, so no job may be
    retried or dead-lettered because of it.
    """

    def __init__(self, message: str, component: str) -> None:
        super().__init__(message)
        self.component = component  # broker | model | decode_pool | pipeline
