"""Dead-letter tools over the broker roles they need (OpsBroker): group, show, requeue and purge.

Requeue puts a dead-lettered job back on the live lane with a fresh set of attempts and
its failure appended to its history (same job id, run, item and version), and removes
the letter only once the republish is confirmed. Purge writes the letters to an archive
file (fsync'd) before removing them. A letter whose body is not a job cannot be requeued:
it is counted and left where it is, for `purge` to remove.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from common.brokers.base import DeadLetter, OpsBroker
from common.errors import JobFailure
from common.schema import FailureRecord, Job, Lane, decode_job
from producers.ops.filters import LetterFilter, letter_item_id

MAX_HISTORY_ERROR_CHARS = 2000  # FailureRecord.error's limit


# -- reading ------------------------------------------------------------------------------


def job_of(letter: DeadLetter) -> Job | None:
    try:
        return decode_job(letter.body)
    except JobFailure:
        return None


@dataclass
class ReasonGroup:
    reason: str
    count: int = 0
    oldest_failed_at_s: float = float("inf")
    newest_failed_at_s: float = 0.0
    runs: Counter[str] = field(default_factory=Counter)
    example_error: str = ""

    def add(self, letter: DeadLetter) -> None:
        self.count += 1
        self.oldest_failed_at_s = min(self.oldest_failed_at_s, letter.failed_at_s)
        if letter.failed_at_s >= self.newest_failed_at_s:
            self.newest_failed_at_s = letter.failed_at_s
            self.example_error = letter.error
        self.runs[letter.run_id or "-"] += 1

    def as_dict(self, now_s: float) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "count": self.count,
            "oldest_age_s": round(now_s - self.oldest_failed_at_s, 1),
            "newest_age_s": round(now_s - self.newest_failed_at_s, 1),
            "runs": dict(self.runs.most_common()),
            "example_error": self.example_error,
        }


def group_by_reason(letters: Iterable[DeadLetter]) -> list[ReasonGroup]:
    """One group per reason, largest first (ties by reason name)."""
    groups: dict[str, ReasonGroup] = {}
    for letter in letters:
        groups.setdefault(letter.reason, ReasonGroup(letter.reason)).add(letter)
    return sorted(groups.values(), key=lambda g: (-g.count, g.reason))


def ordered(letters: Sequence[DeadLetter], *, newest_first: bool) -> list[DeadLetter]:
    return sorted(letters, key=lambda d: d.failed_at_s, reverse=newest_first)


def find_letters(letters: Iterable[DeadLetter], ident: str) -> list[DeadLetter]:
    """Letters whose DLQ id, job id or item id is ``ident``."""
    found = []
    for letter in letters:
        if letter.dlq_id == ident or letter_item_id(letter) == ident:
            found.append(letter)
            continue
        job = job_of(letter)
        if job is not None and job.job_id == ident:
            found.append(letter)
    return found


def letter_summary(letter: DeadLetter, now_s: float) -> dict[str, Any]:
    """The one-line view of `dlq list`."""
    job = job_of(letter)
    return {
        "dlq_id": letter.dlq_id,
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "age_s": round(now_s - letter.failed_at_s, 1),
        "failed_at_s": letter.failed_at_s,
        "run_id": letter.run_id,
        "item_id": letter_item_id(letter),
        "job_id": job.job_id if job else None,
        "url": job.url if job else None,
    }


def body_fields(body: bytes) -> dict[str, Any]:
    """The body as text when it is UTF-8, else base64 (archives and `dlq show --json`)."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_b64": base64.b64encode(body).decode("ascii")}


def letter_detail(letter: DeadLetter, now_s: float) -> dict[str, Any]:
    """Everything `dlq show` prints: the failure, the job it carries, the original body."""
    job = job_of(letter)
    detail = letter_summary(letter, now_s)
    detail["requeueable"] = job is not None
    if job is not None:
        detail["job"] = {
            "job_id": job.job_id,
            "run_id": job.run_id,
            "item_id": job.item_id,
            "image_key": job.image_key,
            "image_id": job.image_id,
            "op": job.op.value,
            "url": job.url,
            "version": job.version,
            "lane": job.lane.value,
            "attempt": job.attempt,
            "created_at_s": job.created_at_s,
        }
        detail["history"] = [record.model_dump() for record in job.history]
    else:
        detail["history"] = []
    detail.update(body_fields(letter.body))
    return detail


# -- moving -------------------------------------------------------------------------------


def requeued_job(letter: DeadLetter, now_s: float) -> Job:
    """The letter's job back for fresh attempts; raises BadMessageError for a non-job."""
    job = decode_job(letter.body)
    failure = FailureRecord(
        reason=letter.reason,
        error=letter.error[:MAX_HISTORY_ERROR_CHARS],
        attempts=max(letter.attempts, 0),
        failed_at_s=letter.failed_at_s,
        requeued_at_s=now_s,
    )
    return job.requeued(failure, lane=Lane.LIVE)


@dataclass
class MoveReport:
    """What a requeue or purge moved (or, with ``dry_run``, would move), by reason."""

    action: str  # requeue | purge
    dry_run: bool
    moved: Counter[str] = field(default_factory=Counter)
    # Matched but left in the DLQ: letters whose body is not a job (requeue only).
    not_requeueable: Counter[str] = field(default_factory=Counter)
    archive: str | None = None

    @property
    def total(self) -> int:
        return sum(self.moved.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "moved": self.total,
            "by_reason": dict(self.moved.most_common()),
            "not_requeueable": sum(self.not_requeueable.values()),
            "not_requeueable_by_reason": dict(self.not_requeueable.most_common()),
            "archive": self.archive,
        }


def plan(
    letters: Iterable[DeadLetter], flt: LetterFilter, action: str, limit: int | None = None
) -> MoveReport:
    """What ``action`` would move, from letters already read in queue order (the dry run).

    With ``limit``, the first ``limit`` movable letters in queue order: the ones the move
    itself would take.
    """
    report = MoveReport(action, dry_run=True)
    for letter in letters:
        if limit is not None and report.total >= limit:
            break
        if not flt.matches(letter):
            continue
        if action == "requeue" and job_of(letter) is None:
            report.not_requeueable[letter.reason] += 1
        else:
            report.moved[letter.reason] += 1
    return report


async def requeue_dead_letters(
    broker: OpsBroker,
    flt: LetterFilter,
    *,
    now_s: float,
    limit: int | None = None,
    batch_size: int = 500,
) -> MoveReport:
    """Republish matching jobs (confirmed) on the live lane, then remove their letters."""
    report = MoveReport("requeue", dry_run=False)
    passed_over: set[str] = set()

    def select(letter: DeadLetter) -> bool:
        if not flt.matches(letter):
            return False
        if job_of(letter) is None:
            # A scan may see a letter more than once (RabbitMQ rescans after a long pass).
            if letter.dlq_id not in passed_over:
                passed_over.add(letter.dlq_id)
                report.not_requeueable[letter.reason] += 1
            return False
        return True

    async def act(batch: list[DeadLetter]) -> None:
        await broker.publish([requeued_job(letter, now_s) for letter in batch])
        report.moved.update(letter.reason for letter in batch)

    await broker.settle_dead_letters(select, act, limit=limit, batch_size=batch_size)
    return report


class LetterArchive:
    """Purged letters as JSONL, appended and fsync'd before they leave the DLQ.

    The file is created on the first write, so a purge that matches nothing leaves none.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None
        self.written = 0

    def write(self, letters: Sequence[DeadLetter]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab")
        lines = b"".join(orjson.dumps(archive_record(letter)) + b"\n" for letter in letters)
        self._fh.write(lines)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.written += len(letters)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def archive_record(letter: DeadLetter) -> dict[str, Any]:
    return {
        "dlq_id": letter.dlq_id,
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "failed_at_s": letter.failed_at_s,
        "run_id": letter.run_id,
        "item_id": letter.item_id,
        **body_fields(letter.body),
    }


async def purge_dead_letters(
    broker: OpsBroker,
    flt: LetterFilter,
    *,
    archive: LetterArchive | None,
    limit: int | None = None,
    batch_size: int = 500,
) -> MoveReport:
    """Remove matching letters, each batch archived first when an archive is given."""
    report = MoveReport("purge", dry_run=False)
    if archive is not None:
        report.archive = str(archive.path)

    async def act(batch: list[DeadLetter]) -> None:
        if archive is not None:
            archive.write(batch)
        report.moved.update(letter.reason for letter in batch)

    try:
        await broker.settle_dead_letters(flt.matches, act, limit=limit, batch_size=batch_size)
    finally:
        if archive is not None:
            archive.close()
    if archive is not None and archive.written == 0:
        report.archive = None
    return report


# -- run accounting input -----------------------------------------------------------------


@dataclass
class RunDeadLetters:
    """A run's dead letters as run accounting needs them."""

    image_ids: set[int] = field(default_factory=set)
    unreadable: int = 0  # letters of the run whose body is not a job
    reason_by_image: dict[int, str] = field(default_factory=dict)
    unreadable_reasons: Counter[str] = field(default_factory=Counter)

    def reasons(self) -> Counter[str]:
        counts = Counter(self.reason_by_image.values())
        counts.update(self.unreadable_reasons)
        return counts


def dead_letters_by_run(letters: Iterable[DeadLetter]) -> dict[str, RunDeadLetters]:
    """Per run id: the image ids of its dead-lettered jobs (copies of one image count once).

    The one definition of a run's dead letters (``imgfleet status`` and ``index finalize``
    count by it): a letter belongs to the run its job names, whatever its header says; a
    letter whose body is not a job belongs to the run its header names, and is counted as
    unreadable (its image is unknown).
    """
    runs: dict[str, RunDeadLetters] = {}
    for letter in letters:
        job = job_of(letter)
        run_id = job.run_id if job is not None else letter.run_id
        if run_id is None:
            continue
        entry = runs.setdefault(run_id, RunDeadLetters())
        if job is None:
            entry.unreadable += 1
            entry.unreadable_reasons[letter.reason] += 1
        else:
            entry.image_ids.add(job.image_id)
            entry.reason_by_image.setdefault(job.image_id, letter.reason)
    return runs


def run_dead_letters(letters: Iterable[DeadLetter], run_id: str) -> RunDeadLetters:
    """One run's dead letters, by the definition of ``dead_letters_by_run``."""
    return dead_letters_by_run(letters).get(run_id) or RunDeadLetters()
