"""Dead-letter grouping, requeued jobs, plans, run inputs, rates and the confirmation rule."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import replace

import pytest

from common.brokers.base import DeadLetter
from common.errors import BadMessageError
from common.schema import FailureRecord, Job, Lane, Op, decode_job
from imgfleet.cli.ops import confirm
from producers.ops.dead_letters import (
    archive_record,
    dead_letters_by_run,
    find_letters,
    group_by_reason,
    letter_detail,
    ordered,
    plan,
    requeued_job,
    run_dead_letters,
)
from producers.ops.filters import LetterFilter
from producers.ops.run_status import RATE_BETWEEN_SAMPLES, RATE_SINCE_START, RunFigures, run_state

NOW_S = 1_700_000_000.0


def job(item: str, run: str = "run-1", **kw: object) -> Job:
    return Job(item_id=item, url=f"http://img/{item}.jpg", run_id=run, **kw)  # type: ignore[arg-type]


def dead(dlq_id: str, reason: str, j: Job | None, age_s: float = 60.0) -> DeadLetter:
    body = j.to_bytes() if j else b"\xffnot a job"
    return DeadLetter(
        dlq_id,
        body,
        reason,
        f"{reason} error {dlq_id}",
        4,
        NOW_S - age_s,
        j.run_id if j else None,
        j.item_id if j else None,
    )


def sample_letters() -> list[DeadLetter]:
    return [
        dead("1", "http_5xx", job("a"), age_s=300),
        dead("2", "http_404", job("b"), age_s=200),
        dead("3", "http_5xx", job("c", run="run-2"), age_s=100),
        dead("4", "bad_message", None, age_s=50),
        dead("5", "http_5xx", job("d"), age_s=10),
    ]


def test_group_by_reason_counts_ages_runs_and_newest_error() -> None:
    groups = group_by_reason(sample_letters())
    assert [(g.reason, g.count) for g in groups] == [
        ("http_5xx", 3),
        ("bad_message", 1),
        ("http_404", 1),
    ]
    top = groups[0].as_dict(NOW_S)
    assert top["oldest_age_s"] == 300 and top["newest_age_s"] == 10
    assert top["runs"] == {"run-1": 2, "run-2": 1}
    assert top["example_error"] == "http_5xx error 5"


def test_ordering_and_lookup_by_dlq_job_or_item_id() -> None:
    letters = sample_letters()
    assert [d.dlq_id for d in ordered(letters, newest_first=True)] == ["5", "4", "3", "2", "1"]
    assert [d.dlq_id for d in ordered(letters, newest_first=False)] == ["1", "2", "3", "4", "5"]
    by_job = decode_job(letters[1].body).job_id
    assert [d.dlq_id for d in find_letters(letters, by_job)] == ["2"]
    assert [d.dlq_id for d in find_letters(letters, "c")] == ["3"]
    assert [d.dlq_id for d in find_letters(letters, "4")] == ["4"]
    assert find_letters(letters, "nothing") == []


def test_requeued_job_resets_attempts_goes_live_and_keeps_history() -> None:
    earlier = FailureRecord(reason="timeout", error="slow", attempts=5, failed_at_s=1.0)
    original = job("a", attempt=3, version=7, history=(earlier,))
    letter = dead("1", "http_5xx", original)
    again = requeued_job(letter, NOW_S)
    assert again.attempt == 0 and again.lane is Lane.LIVE
    assert (again.job_id, again.run_id, again.item_id, again.version, again.url) == (
        original.job_id,
        original.run_id,
        original.item_id,
        7,
        original.url,
    )
    assert again.history == (
        earlier,
        FailureRecord(
            reason="http_5xx",
            error="http_5xx error 1",
            attempts=4,
            failed_at_s=NOW_S - 60,
            requeued_at_s=NOW_S,
        ),
    )
    with pytest.raises(BadMessageError):
        requeued_job(dead("4", "bad_message", None), NOW_S)


def test_a_delete_job_is_requeued_too() -> None:
    tombstone = Job(item_id="gone", op=Op.DELETE, run_id="run-1")
    again = requeued_job(dead("7", "storage", tombstone), NOW_S)
    assert again.op is Op.DELETE and again.lane is Lane.LIVE


def test_plan_counts_what_would_move_and_what_cannot_be_requeued() -> None:
    letters = sample_letters()
    everything = LetterFilter.build(now_s=NOW_S)
    requeue = plan(letters, everything, "requeue")
    assert requeue.moved == Counter({"http_5xx": 3, "http_404": 1})
    assert requeue.not_requeueable == Counter({"bad_message": 1})
    purge = plan(letters, everything, "purge")
    assert purge.moved == Counter({"http_5xx": 3, "http_404": 1, "bad_message": 1})
    only_run = plan(letters, LetterFilter.build(now_s=NOW_S, run_id="run-2"), "requeue")
    assert only_run.as_dict()["by_reason"] == {"http_5xx": 1} and only_run.dry_run


def test_a_limited_plan_takes_the_first_letters_in_queue_order() -> None:
    report = plan(sample_letters(), LetterFilter.build(now_s=NOW_S), "requeue", limit=2)
    assert report.moved == Counter({"http_5xx": 1, "http_404": 1})
    report = plan(sample_letters(), LetterFilter.build(now_s=NOW_S), "requeue", limit=3)
    assert report.moved == Counter({"http_5xx": 2, "http_404": 1})
    assert report.not_requeueable == Counter()  # letter 4 lies past the third movable one


def test_detail_and_archive_keep_the_original_body() -> None:
    letters = sample_letters()
    detail = letter_detail(letters[0], NOW_S)
    assert detail["requeueable"] is True
    assert detail["job"]["item_id"] == "a" and detail["url"] == "http://img/a.jpg"
    assert detail["body"].encode() == letters[0].body and detail["age_s"] == 300
    junk = letter_detail(letters[3], NOW_S)
    assert junk["requeueable"] is False and junk["history"] == []
    assert "body" not in junk and junk["body_b64"]
    record = archive_record(letters[3])
    assert record["reason"] == "bad_message" and record["body_b64"] == junk["body_b64"]


def test_dead_letters_by_run_counts_each_image_once() -> None:
    a = job("a")
    letters = [*sample_letters(), dead("6", "http_5xx", a)]  # a copy of letter 1's job
    runs = dead_letters_by_run(letters)
    assert set(runs) == {"run-1", "run-2"}
    assert runs["run-1"].image_ids == {job("a").image_id, job("b").image_id, job("d").image_id}
    assert runs["run-1"].reasons() == Counter({"http_5xx": 2, "http_404": 1})
    assert runs["run-2"].unreadable == 0


def test_a_run_s_dead_letters_follow_the_job_then_the_header() -> None:
    headerless = replace(dead("6", "http_404", job("e")), run_id=None)
    unreadable = replace(dead("7", "bad_message", None), run_id="run-1")
    letters = [*sample_letters(), headerless, unreadable]
    run_1 = run_dead_letters(letters, "run-1")
    assert run_1.image_ids == {job(item).image_id for item in "abde"}
    assert (run_1.unreadable, run_1.unreadable_reasons) == (1, Counter({"bad_message": 1}))
    assert run_1 == dead_letters_by_run(letters)["run-1"]
    assert run_dead_letters(letters, "run-3") == run_dead_letters([], "run-3")


def test_rate_since_start_and_between_samples() -> None:
    def figures(indexed: int, failed: int, at_s: float) -> RunFigures:
        return RunFigures("r", "published", 1000, indexed, failed, started_at_s=NOW_S, at_s=at_s)

    first = figures(180, 20, NOW_S + 100).with_rate(None)
    assert first.rate_source == RATE_SINCE_START and first.rate_per_s == pytest.approx(2.0)
    assert first.remaining == 800 and first.eta_s == pytest.approx(400.0)
    second = figures(480, 20, NOW_S + 110).with_rate(first.sample())
    assert second.rate_source == RATE_BETWEEN_SAMPLES and second.rate_window_s == 10
    assert second.rate_per_s == pytest.approx(30.0) and second.eta_s == pytest.approx(500 / 30)
    done = figures(990, 10, NOW_S + 120).with_rate(None)
    assert done.remaining == 0 and done.eta_s == 0
    stalled = figures(480, 20, NOW_S + 120).with_rate(second.sample())
    assert stalled.rate_per_s == 0 and stalled.eta_s is None


def test_run_state_prefers_finalization_then_the_run_file() -> None:
    assert run_state("publishing", finalized=True, expected=5) == "finalized"
    assert run_state("publishing", finalized=False, expected=5) == "publishing"
    assert run_state(None, finalized=False, expected=5) == "published"
    assert run_state(None, finalized=False, expected=0) == "publishing"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_confirmation_above_the_threshold() -> None:
    err = io.StringIO()
    assert confirm("requeue", 10, "x", yes=False, threshold=10, stdin=io.StringIO(), stderr=err)
    assert confirm("requeue", 11, "x", yes=True, threshold=10, stdin=io.StringIO(), stderr=err)
    assert err.getvalue() == ""
    # No terminal and no --yes: refuse, saying how to go ahead.
    assert not confirm("requeue", 11, "x", yes=False, threshold=10, stdin=io.StringIO(), stderr=err)
    assert "--yes" in err.getvalue()
    assert confirm("purge", 11, "x", yes=False, threshold=10, stdin=_Tty("yes\n"), stderr=err)
    assert not confirm("purge", 11, "x", yes=False, threshold=10, stdin=_Tty("\n"), stderr=err)
