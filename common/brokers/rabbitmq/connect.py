"""Opening a robust aio-pika connection from configuration, with clear errors.

Credentials come from ``broker.username`` / ``broker.password`` (set them through the
environment) and win over any in the URL; the URL is only ever shown masked.
"""

from __future__ import annotations

import ssl

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from common.config import BrokerConfig, mask_url
from common.errors import ConfigError, Reason, TransientError
from common.observability.logging import get_logger
from common.retry import retry_until

log = get_logger("rabbitmq")


def connection_url(config: BrokerConfig) -> str:
    """The AMQP URL with environment credentials and a heartbeat filled in."""
    raw = config.url.get_secret_value()
    url = URL(raw)
    if url.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"broker.url must be amqp:// or amqps://, got {mask_url(raw)!r}")
    if config.username:
        url = url.with_user(config.username)
    if config.password.get_secret_value():
        url = url.with_password(config.password.get_secret_value())
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=config.rabbitmq.heartbeat_s)
    return str(url)


def tls_context(config: BrokerConfig) -> ssl.SSLContext | None:
    if not (config.tls_ca_file or config.tls_cert_file):
        return None
    context = ssl.create_default_context(cafile=config.tls_ca_file or None)
    if config.tls_cert_file:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    return context


def scrub_secret(text: str, url: str) -> str:
    """Error texts of the client library may quote the URL; never let the password out."""
    password = URL(url).password
    return text.replace(password, "***") if password else text


async def open_connection(config: BrokerConfig, name: str) -> AbstractRobustConnection:
    """Connect, retrying while the broker is unreachable for up to ``connect_timeout_s``.

    A robust connection reconnects by itself once it is up; the first connect does not,
    so it is retried here. Wrong credentials are not retried: they will not fix themselves.
    """
    url = connection_url(config)
    shown = mask_url(url)
    timeout_s = config.rabbitmq.connect_timeout_s

    async def attempt() -> AbstractRobustConnection:
        try:
            return await aio_pika.connect_robust(
                url,
                timeout=timeout_s,
                ssl_context=tls_context(config),
                client_properties={"connection_name": name},
                reconnect_interval=1.0,
            )
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            raise ConfigError(f"RabbitMQ refused the credentials for {shown}") from exc

    def retrying(exc: BaseException, wait_s: float, left_s: float) -> None:
        log.warning("broker unreachable; retrying", url=shown, error=_error_text(exc, url))

    try:
        return await retry_until(
            attempt,
            retry_on=_UNREACHABLE,
            stop_on=(ConfigError,),
            give_up_after_s=timeout_s,
            first_delay_s=0.2,
            max_delay_s=2.0,
            on_retry=retrying,
        )
    except _UNREACHABLE as exc:
        raise TransientError(
            f"RabbitMQ at {shown} is unreachable: {_error_text(exc, url)}", Reason.BROKER
        ) from exc


_UNREACHABLE = (TimeoutError, OSError, aiormq.exceptions.AMQPError)


def _error_text(exc: BaseException, url: str) -> str:
    return scrub_secret(f"{type(exc).__name__}: {exc}", url)
