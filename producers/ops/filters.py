"""Which dead letters an ops command applies to: reason, run, age and item filters.

Every ops command (`dlq list`, `requeue`, `purge`) takes the same filters, so they are
parsed and matched in one place. A filter is fixed at the moment the command starts
(``now_s``): ages do not drift while a long requeue runs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, JobFailure, Reason

if TYPE_CHECKING:
    from common.brokers.base import DeadLetter

# Light on purpose: the command line checks ages and reasons with this module while it
# parses its arguments, before pydantic (common.schema) is imported.

_AGE_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1.5d`` or combined like ``1h30m`` -> seconds.

    A bare number is refused: at 3 a.m. "2" is as likely to mean hours as seconds.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _AGE_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(f"age {text!r} is not like 90s, 30m, 2h, 1d or 1h30m")
    return sum(float(number) * _AGE_UNITS_S[unit] for number, unit in parts)


def check_reason(text: str) -> str:
    """A reason code as given, if the DLQ can hold it (``common.errors.Reason``).

    Nothing is ever dead-lettered under another code, so an unknown one is a typo that
    would match no letter (and `requeue --reason R` would quietly move nothing).
    """
    reason = text.strip()
    known = [r.value for r in Reason]
    if reason in known:
        return reason
    close = difflib.get_close_matches(reason, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}?" if close else f"known reasons: {', '.join(sorted(known))}"
    raise ConfigError(f"unknown reason {text!r} ({hint})")


def read_item_ids(path: str | Path) -> frozenset[str]:
    """One item id per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the items file {str(path)!r}: {exc}") from exc
    ids = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(item for item in ids if item)


def letter_item_id(letter: DeadLetter) -> str | None:
    """The letter's item id; from its body when the broker kept none alongside."""
    if letter.item_id is not None:
        return letter.item_id
    from common.schema import decode_job

    try:
        return decode_job(letter.body).item_id
    except JobFailure:
        return None


@dataclass(frozen=True)
class LetterFilter:
    now_s: float
    reasons: frozenset[str] = frozenset()
    run_id: str | None = None
    older_than_s: float | None = None  # failed at least this long ago
    newer_than_s: float | None = None  # failed at most this long ago
    item_ids: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls,
        *,
        now_s: float,
        reasons: Iterable[str] = (),
        run_id: str | None = None,
        older_than: str | None = None,
        newer_than: str | None = None,
        item_ids: Iterable[str] = (),
        items_file: str | Path | None = None,
    ) -> LetterFilter:
        items = frozenset(i.strip() for i in item_ids if i.strip())
        if items_file is not None:
            from_file = read_item_ids(items_file)
            if not from_file:
                raise ConfigError(f"the items file {str(items_file)!r} names no item")
            items |= from_file
        older = parse_age(older_than) if older_than else None
        newer = parse_age(newer_than) if newer_than else None
        if older is not None and newer is not None and older >= newer:
            raise ConfigError(
                f"--older-than {older_than} and --newer-than {newer_than} select nothing"
            )
        return cls(
            now_s=now_s,
            reasons=frozenset(check_reason(r) for r in reasons if r.strip()),
            run_id=run_id or None,
            older_than_s=older,
            newer_than_s=newer,
            item_ids=items,
        )

    @property
    def is_empty(self) -> bool:
        return not (
            self.reasons
            or self.run_id
            or self.older_than_s is not None
            or self.newer_than_s is not None
            or self.item_ids
        )

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.run_id is not None and letter.run_id != self.run_id:
            return False
        age_s = self.now_s - letter.failed_at_s
        if self.older_than_s is not None and age_s < self.older_than_s:
            return False
        if self.newer_than_s is not None and age_s > self.newer_than_s:
            return False
        return not self.item_ids or letter_item_id(letter) in self.item_ids

    def describe(self) -> str:
        """A short human description (``all dead letters`` when empty)."""
        parts = []
        if self.reasons:
            parts.append("reason " + " or ".join(sorted(self.reasons)))
        if self.run_id:
            parts.append(f"run {self.run_id}")
        if self.older_than_s is not None:
            parts.append(f"older than {format_duration(self.older_than_s)}")
        if self.newer_than_s is not None:
            parts.append(f"newer than {format_duration(self.newer_than_s)}")
        if self.item_ids:
            n = len(self.item_ids)
            parts.append(f"item {next(iter(self.item_ids))}" if n == 1 else f"{n} items")
        return ", ".join(parts) or "all dead letters"

    def as_dict(self) -> dict[str, Any]:
        return {
            "reasons": sorted(self.reasons),
            "run_id": self.run_id,
            "older_than_s": self.older_than_s,
            "newer_than_s": self.newer_than_s,
            "items": len(self.item_ids),
        }


def format_duration(seconds: float) -> str:
    """Compact and readable: 45s, 12m, 3h05m, 2d04h."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" if s % 60 == 0 or s >= 600 else f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"
