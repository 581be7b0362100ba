"""What the CMS intake needs around its handlers: its settings (built from ``[cms]`` by
``imgfleet.factories.intake_settings``, which refuses to run without authentication by
accident), and its link to the broker (a background first connect, and whether the broker
is usable now, for readiness).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.brokers.base import IntakeBroker
from common.errors import ConfigError
from common.observability.logging import get_logger
from common.retry import retry_until

log = get_logger("cms_intake")


@dataclass(frozen=True)
class IntakeSettings:
    """What the handlers need; ``tokens`` empty only on a loopback development listener."""

    tokens: tuple[str, ...]  # empty: no authentication (loopback development only)
    max_items_per_request: int
    max_body_bytes: int
    max_images_per_item: int
    publish_timeout_s: float
    idempotency_ttl_s: float


class BrokerLink:
    """Connects the broker in the background and answers whether it is usable now."""

    def __init__(self, broker: IntakeBroker) -> None:
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
