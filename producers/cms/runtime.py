"""What the CMS intake needs around its handlers: its settings, with the refusal to run
without authentication by accident, and its link to the broker (a background first
connect, and whether the broker is usable now, for readiness).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from common.brokers.base import Broker
from common.config import CmsConfig, ProducerConfig
from common.errors import ConfigError
from common.observability.logging import get_logger
from common.retry import retry_until

log = get_logger("cms_intake")


@dataclass(frozen=True)
class IntakeSettings:
    tokens: tuple[str, ...]  # empty: no authentication (loopback development only)
    max_items_per_request: int
    max_body_bytes: int
    max_images_per_item: int
    publish_timeout_s: float
    idempotency_ttl_s: float

    @classmethod
    def from_config(
        cls, cms: CmsConfig, producer: ProducerConfig, *, insecure_no_auth: bool = False
    ) -> IntakeSettings:
        """Settings for a listener on ``cms.host``; refuse to run open by accident."""
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
        return cls(
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


class BrokerLink:
    """Connects the broker in the background and answers whether it is usable now."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.connected = False

    async def keep_connecting(self) -> None:
        """Retry the first connect until it works; the adapter reconnects after that.

        A configuration error (credentials, queue settings) will not fix itself: raise.
        """
        await retry_until(
            self.broker.connect,
            retry_on=(Exception,),
            stop_on=(ConfigError,),
            first_delay_s=0.5,
            max_delay_s=10.0,
            on_retry=_log_retry,
        )
        self.connected = True
        log.info("broker connected", broker=repr(self.broker))

    async def ready(self) -> tuple[bool, str]:
        """(usable, why not), from the adapter's own view of its link (``is_connected()``)."""
        if not self.connected:
            return False, "not connected to the broker yet"
        up = self.broker.is_connected()
        return up, "" if up else "broker connection lost; reconnecting"


def _log_retry(exc: BaseException, wait_s: float, left_s: float) -> None:
    log.warning("broker not reachable; retrying", error=str(exc), retry_in_s=wait_s)
