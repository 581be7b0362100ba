"""structlog set-up: console for people, JSON for log pipelines.

Every line carries the process's own context (``bind_process``: worker id, process role)
and whatever the call site binds (run, item, image, shard ids). Standard-library logging
of the client libraries (aio-pika, kafka-python, botocore) goes through the same renderer,
so a JSON log stays one JSON object per line. Registered secrets are masked in every
rendered line, whatever put them there.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from common.config import Settings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
MASK = "***"
_MIN_SECRET_CHARS = 4  # shorter "secrets" would mask ordinary words and numbers

# Process-wide state (a process configures logging once; decode children copy it).
_config: dict[str, str] = {"format": "console", "level": "info"}
_process_context: dict[str, Any] = {}
_secrets: set[str] = set()


def configure_logging(
    fmt: str = "console", level: str = "info", *, secrets: Iterable[str] = ()
) -> None:
    _config.update(format=fmt, level=level)
    add_secrets(secrets)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _merge_process_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Masking(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(level)


def logging_config() -> dict[str, Any]:
    """What ``configure_logging`` was last given, for child processes to repeat it."""
    return {
        "fmt": _config["format"],
        "level": _config["level"],
        "secrets": sorted(_secrets),
        "context": dict(_process_context),
    }


def apply_logging_config(config: dict[str, Any], **context: Any) -> None:
    """Repeat a parent's ``logging_config()`` in a child process (plus its own context)."""
    configure_logging(config["fmt"], config["level"], secrets=config.get("secrets", ()))
    bind_process(**{**config.get("context", {}), **context})


def bind_process(**context: Any) -> None:
    """Context on every line this process writes, threads included (worker_id=...)."""
    _process_context.update(context)


def unbind_process(*keys: str) -> None:
    for key in keys:
        _process_context.pop(key, None)


def add_secrets(values: Iterable[str]) -> None:
    """Mask these strings wherever they would appear in a log line."""
    _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_CHARS)


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret value of the settings: passwords, keys, tokens, URL passwords."""
    from urllib.parse import urlsplit

    values: list[str] = []

    def walk(obj: Any) -> None:
        from pydantic import BaseModel, SecretStr

        if isinstance(obj, SecretStr):
            values.append(obj.get_secret_value())
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name))
        elif isinstance(obj, list | tuple):
            for item in obj:
                walk(item)

    walk(settings)
    for value in list(values):
        # A URL-shaped secret (broker.url) also leaks through its password alone.
        for url in value.split(","):
            try:
                password = urlsplit(url.strip()).password
            except ValueError:
                password = None
            if password:
                values.append(password)
    return values


def _merge_process_context(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _process_context.items():
        event_dict.setdefault(key, value)
    return event_dict


class _Masking:
    """Wraps the renderer: masks registered secrets in the finished line."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        line = str(self._renderer(logger, method, event_dict))
        for secret in _secrets:
            if secret in line:
                line = line.replace(secret, MASK)
        return line


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at the time of the call, not at set-up.

    Binding the stream once breaks when a test harness or a daemoniser swaps stderr later.
    """

    def __init__(self, *_args: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _ToStructlog(logging.Handler):
    """Standard-library records re-emitted through structlog (same format, same masking)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not lose the line
            message = str(record.msg)
        extra: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            extra["exc_info"] = record.exc_info
        try:
            structlog.get_logger(record.name).log(record.levelno, message, **extra)
        except Exception:
            self.handleError(record)


def _route_stdlib_logging(level: str) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    # The client libraries narrate every connection at INFO; their warnings are what an
    # operator needs unless debugging.
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # Python warnings (Pillow's decompression-bomb warning in a decode process, say)
    # become log lines too, instead of bare text in a JSON log.
    warnings.showwarning = _warning_to_log


def _warning_to_log(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    structlog.get_logger("py.warnings").warning(
        str(message), logger="py.warnings", category=category.__name__, where=f"{filename}:{lineno}"
    )


def get_logger(name: str, **context: Any) -> Any:
    # A lazy proxy: it takes the configuration current at each call, so module-level
    # loggers created before configure_logging() (or a test's capture) still follow it.
    return structlog.get_logger(name, **context)
