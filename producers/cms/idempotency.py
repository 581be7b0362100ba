"""Idempotency keys of the CMS intake, kept in shared storage.

One small JSON object per key, at ``cms/idempotency/<sha256(key)>.json``, so every intake
replica sees the same keys and a restart forgets none:

- ``in_progress``: a replica has claimed the key and is publishing. The claim is a lease
  (``lease_s``): a replica that dies mid-request does not block the key for longer.
- ``done``: the response (status and body) to replay, kept ``ttl_s`` after completion.

Claims are compare-and-swap writes (``common.storage.cas``), atomic as the storage makes
them: a conditional create/replace on S3, an exclusive ``flock`` on a shared filesystem for
the local directory. Where the storage cannot (S3 with ``conditional_writes=False``) a
claim is compare-then-put, and two replicas racing on one key may both publish; the job
ids come from the key, so both publish the same jobs and the index applies them once.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import orjson

from common.observability.logging import get_logger
from common.storage.base import Storage
from common.storage.cas import read_versioned, write_if_unchanged

PREFIX = "cms/idempotency/"
MAX_KEY_CHARS = 255
_FORMAT = 1
_CLAIM_ATTEMPTS = 3

log = get_logger("cms_idempotency")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_problem(key: str) -> str | None:
    """Why an ``Idempotency-Key`` header value is refused, or None."""
    if not key or len(key) > MAX_KEY_CHARS:
        return f"must be 1 to {MAX_KEY_CHARS} characters"
    if key != key.strip() or any(not (0x20 <= ord(ch) <= 0x7E) for ch in key):
        return "must be printable ASCII without leading or trailing spaces"
    return None


@dataclass(frozen=True)
class Claim:
    """This request owns the key until it completes, abandons it or the lease runs out."""

    storage_key: str
    owner: str
    fingerprint: str


@dataclass(frozen=True)
class Replay:
    """The key completed earlier with the same request: answer as then."""

    status: int
    body: bytes


@dataclass(frozen=True)
class InProgress:
    """Another request with this key is being handled now."""


@dataclass(frozen=True)
class KeyReused:
    """The key was used with a different request."""


Outcome = Claim | Replay | InProgress | KeyReused


@dataclass(eq=False)
class IdempotencyStore:
    storage: Storage
    _: KW_ONLY
    ttl_s: float
    lease_s: float
    prefix: str = PREFIX
    clock: Callable[[], float] = time.time

    def storage_key(self, key: str) -> str:
        return f"{self.prefix}{key_hash(key)}.json"

    # -- the request's life ------------------------------------------------------------

    def begin(self, key: str, fingerprint: str) -> Outcome:
        """Claim ``key`` for the request with ``fingerprint``, or say why not."""
        storage_key = self.storage_key(key)
        for _ in range(_CLAIM_ATTEMPTS):
            data, token = read_versioned(self.storage, storage_key)
            record = _parse(data, storage_key) if data is not None else None
            now = self.clock()
            if record is not None and _live(record, now):
                if record.get("fingerprint") != fingerprint:
                    return KeyReused()
                if record.get("state") == "done":
                    return Replay(int(record["status"]), str(record["body"]).encode("utf-8"))
                return InProgress()
            # Absent, expired, or a lease whose holder died: take it.
            owner = uuid.uuid4().hex
            claimed = {
                "format": _FORMAT,
                "state": "in_progress",
                "fingerprint": fingerprint,
                "owner": owner,
                "claimed_at_s": now,
                "lease_until_s": now + self.lease_s,
            }
            if write_if_unchanged(self.storage, storage_key, orjson.dumps(claimed), token):
                return Claim(storage_key, owner, fingerprint)
        # Lost every race: someone else holds it now.
        return InProgress()

    def complete(self, claim: Claim, status: int, body: bytes) -> None:
        """Record the response to replay for ``ttl_s``."""
        now = self.clock()
        record = {
            "format": _FORMAT,
            "state": "done",
            "fingerprint": claim.fingerprint,
            "owner": claim.owner,
            "status": status,
            "body": body.decode("utf-8"),
            "completed_at_s": now,
            "expires_at_s": now + self.ttl_s,
        }
        # Unconditional: if the lease ran out and another replica took over, it published
        # the same job ids and answers the same; whichever writes last is right too.
        self.storage.put(claim.storage_key, orjson.dumps(record))

    def abandon(self, claim: Claim) -> None:
        """Release a claim whose request was not accepted, so a retry need not wait."""
        data = read_versioned(self.storage, claim.storage_key).data
        if data is None:
            return
        record = _parse(data, claim.storage_key)
        if (
            record is not None
            and record.get("owner") == claim.owner
            and record.get("state") == "in_progress"
        ):
            self.storage.delete(claim.storage_key)

    # -- housekeeping ------------------------------------------------------------------

    def purge_expired(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` records whose time is over; return how many."""
        now = self.clock()
        purged = 0
        for storage_key in self.storage.list(self.prefix):
            if purged >= limit:
                break
            if not storage_key.endswith(".json"):
                continue
            data = read_versioned(self.storage, storage_key).data
            if data is None:
                continue
            record = _parse(data, storage_key)
            if record is None or not _live(record, now):
                self.storage.delete(storage_key)
                purged += 1
        return purged


def _parse(data: bytes, storage_key: str) -> dict[str, Any] | None:
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("state") not in ("in_progress", "done"):
        log.warning("unreadable idempotency record; treating it as absent", key=storage_key)
        return None
    return record


def _leased(record: dict[str, Any]) -> bool:
    return record.get("state") == "in_progress"


def _live(record: dict[str, Any], now: float) -> bool:
    """True while a record still counts: a lease not run out, a response not expired."""
    until = record.get("lease_until_s") if _leased(record) else record.get("expires_at_s")
    return isinstance(until, int | float) and until > now
