"""A small client for the imgfleet CMS intake; Python standard library only.

The CMS side can copy this one file: it needs nothing but Python 3.9+.

Usage::

    from cms_client import CmsClient, CmsRequestError

    client = CmsClient("https://imgfleet-cms.internal:8090", token=os.environ["IMGFLEET_TOKEN"])
    client.upsert("sku-123", ["https://cdn.example.com/sku-123/front.jpg"], version=42)
    client.delete("sku-456", version=17)
    client.send([
        {"op": "upsert", "item_id": "sku-1", "image_urls": ["https://cdn/a.jpg"], "version": 3},
        {"op": "delete", "item_id": "sku-2", "version": 9},
    ])

Each call is one logical change set: it gets its own ``Idempotency-Key``, reused on every
retry, so a change is published once however often the request is retried. Connection
errors, 409 (the same key still being handled), 429, 502, 503 and 504 are retried with
jittered exponential backoff, waiting at least what ``Retry-After`` asks. Any other 4xx
raises ``CmsRequestError`` with the server's error list at once (nothing was published);
so do the retryable failures once ``max_retries`` is spent. A returned call means the
intake accepted the changes and they are durable on the broker.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})
USER_AGENT = "imgfleet-cms-client/1"


class CmsRequestError(Exception):
    """The intake refused the request, or could not be reached within the retries.

    ``status`` is the HTTP status (None when the server was never reached); ``error`` the
    server's error code; ``errors`` its list of ``{"index", "field", "message"}`` problems.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        attempts: int = 1,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.errors = errors or []
        self.request_id = request_id
        self.attempts = attempts
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        text = super().__str__()
        if self.status is not None:
            text = f"HTTP {self.status} {self.error or ''}: {text}".replace("  ", " ")
        for problem in self.errors[:10]:
            where = "" if problem.get("index") is None else f"items[{problem['index']}]."
            text += f"\n  {where}{problem.get('field', '')}: {problem.get('message', '')}"
        return text


@dataclass(eq=False)
class CmsClient:
    base_url: str
    token: str = field(repr=False)  # never in a repr or a log line
    timeout_s: float = 10
    max_retries: int = 5
    _: KW_ONLY
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _random: random.Random = field(default_factory=random.Random, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")

    # -- the API ---------------------------------------------------------------------

    def upsert(self, item_id: str, image_urls: Sequence[str], version: int) -> dict[str, Any]:
        """Replace the item's images with ``image_urls`` (in order) at ``version``."""
        body = {"image_urls": list(image_urls), "version": version}
        return self._call("PUT", self._item_path(item_id), body)

    def delete(self, item_id: str, version: int) -> dict[str, Any]:
        """Remove the item and all its images at ``version``."""
        query = urllib.parse.urlencode({"version": version})
        return self._call("DELETE", f"{self._item_path(item_id)}?{query}", None)

    def send(self, changes: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Send a batch: ``{"op": "upsert"|"delete", "item_id", "image_urls", "version"}``."""
        return self._call("POST", "/v1/items", {"items": list(changes)})

    # -- transport -------------------------------------------------------------------

    @staticmethod
    def _item_path(item_id: str) -> str:
        return "/v1/items/" + urllib.parse.quote(item_id, safe="")

    def _call(self, method: str, path: str, body: Any) -> dict[str, Any]:
        key = uuid.uuid4().hex  # one per logical call, the same on every retry
        data = None if body is None else json.dumps(body).encode("utf-8")
        last: CmsRequestError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay_s(attempt - 1, last))
            request = urllib.request.Request(self.base_url + path, data=data, method=method)
            request.add_header("Authorization", f"Bearer {self.token}")
            request.add_header("Idempotency-Key", key)
            request.add_header("Accept", "application/json")
            request.add_header("User-Agent", USER_AGENT)
            if data is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _json_of(response.read())
            except urllib.error.HTTPError as exc:
                last = _error_of(exc, attempt + 1)
                if exc.code not in RETRY_STATUSES:
                    raise last from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # Refused, reset, timed out: the request may or may not have arrived; the
                # idempotency key makes sending it again safe.
                reason = getattr(exc, "reason", exc)
                last = CmsRequestError(
                    f"could not reach {self.base_url}: {reason}", attempts=attempt + 1
                )
        assert last is not None
        last.attempts = self.max_retries + 1
        raise last

    def _delay_s(self, retry: int, last: CmsRequestError | None) -> float:
        ceiling_s = min(self.backoff_max_s, self.backoff_base_s * 2**retry)
        delay_s = self._random.uniform(0.0, ceiling_s)  # full jitter
        wanted_s = last.retry_after_s if last is not None else None
        if wanted_s is not None:
            # At least what the server asked, spread a little so clients do not return
            # in lockstep.
            delay_s = max(delay_s, wanted_s * self._random.uniform(1.0, 1.2))
        return min(delay_s, max(self.backoff_max_s, wanted_s or 0.0))


def _json_of(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, ValueError):
        return {"raw": raw.decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


def _error_of(exc: urllib.error.HTTPError, attempts: int) -> CmsRequestError:
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    body = _json_of(raw)
    headers: Any = exc.headers or {}
    return CmsRequestError(
        str(body.get("message") or exc.reason or "request failed"),
        status=exc.code,
        error=body.get("error"),
        errors=body.get("errors") if isinstance(body.get("errors"), list) else None,
        request_id=headers.get("X-Request-Id"),
        attempts=attempts,
        retry_after_s=_retry_after_s(headers.get("Retry-After")),
    )


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
