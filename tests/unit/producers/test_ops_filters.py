"""Dead-letter filters: ages, item files, and which letters a filter picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.brokers.base import DeadLetter
from common.errors import ConfigError
from common.schema import Job
from producers.ops.filters import (
    LetterFilter,
    check_reason,
    format_duration,
    letter_item_id,
    parse_age,
    read_item_ids,
)

NOW_S = 1_700_000_000.0


def letter(
    reason: str = "http_5xx",
    *,
    age_s: float = 60.0,
    run_id: str | None = "run-1",
    item_id: str | None = "sku-1",
    body: bytes | None = None,
) -> DeadLetter:
    if body is None:
        body = Job(item_id=item_id or "x", url="http://img/x.jpg", run_id=run_id or "a").to_bytes()
    return DeadLetter("1", body, reason, "boom", 3, NOW_S - age_s, run_id, item_id)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), ("1h30m", 5400)],
)
def test_parse_age_units(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["2", "", "2x", "h", "2h-1m", "-5m"])
def test_parse_age_refuses_what_is_not_an_age(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_age(text)


def test_item_ids_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "items.txt"
    path.write_text("sku-1\n\n  sku-2  \n# a comment\nsku-3 # trailing\n")
    assert read_item_ids(path) == {"sku-1", "sku-2", "sku-3"}
    with pytest.raises(ConfigError, match="cannot read"):
        read_item_ids(tmp_path / "missing.txt")


def test_an_empty_filter_matches_everything_and_says_so() -> None:
    flt = LetterFilter.build(now_s=NOW_S)
    assert flt.is_empty
    assert flt.matches(letter()) and flt.matches(letter("bad_message", body=b"junk"))
    assert flt.describe() == "all dead letters"


def test_reason_and_run_filters() -> None:
    flt = LetterFilter.build(now_s=NOW_S, reasons=["http_5xx", "timeout"], run_id="run-1")
    assert not flt.is_empty
    assert flt.matches(letter("http_5xx"))
    assert flt.matches(letter("timeout"))
    assert not flt.matches(letter("http_404"))
    assert not flt.matches(letter("http_5xx", run_id="run-2"))
    assert flt.describe() == "reason http_5xx or timeout, run run-1"


def test_age_filters_count_from_when_the_command_started() -> None:
    older = LetterFilter.build(now_s=NOW_S, older_than="2h")
    assert older.matches(letter(age_s=3 * 3600))
    assert not older.matches(letter(age_s=3600))
    newer = LetterFilter.build(now_s=NOW_S, newer_than="30m")
    assert newer.matches(letter(age_s=60))
    assert not newer.matches(letter(age_s=3600))
    window = LetterFilter.build(now_s=NOW_S, older_than="10m", newer_than="1h")
    assert [window.matches(letter(age_s=a)) for a in (60, 1200, 7200)] == [False, True, False]
    with pytest.raises(ConfigError, match="select nothing"):
        LetterFilter.build(now_s=NOW_S, older_than="2h", newer_than="1h")


def test_item_filter_from_arguments_and_file(tmp_path: Path) -> None:
    path = tmp_path / "items.txt"
    path.write_text("sku-2\nsku-3\n")
    flt = LetterFilter.build(now_s=NOW_S, item_ids=["sku-1"], items_file=path)
    assert flt.item_ids == {"sku-1", "sku-2", "sku-3"}
    assert flt.matches(letter(item_id="sku-3"))
    assert not flt.matches(letter(item_id="sku-9"))
    assert flt.describe() == "3 items"
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="names no item"):
        LetterFilter.build(now_s=NOW_S, items_file=empty)


def test_item_id_comes_from_the_body_when_the_broker_kept_none() -> None:
    body = Job(item_id="sku-7", url="http://img/7.jpg").to_bytes()
    bare = DeadLetter("9", body, "http_404", "", 1, NOW_S, None, None)
    assert letter_item_id(bare) == "sku-7"
    assert LetterFilter.build(now_s=NOW_S, item_ids=["sku-7"]).matches(bare)
    junk = DeadLetter("9", b"\xff", "bad_message", "", 1, NOW_S, None, None)
    assert letter_item_id(junk) is None
    assert not LetterFilter.build(now_s=NOW_S, item_ids=["sku-7"]).matches(junk)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (5, "5s"),
        (90, "1m30s"),
        (600, "10m"),
        (3 * 3600 + 300, "3h05m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_reasons_are_checked_against_the_codes_the_dlq_holds() -> None:
    assert check_reason(" http_404 ") == "http_404"
    with pytest.raises(ConfigError, match=r"unknown reason 'http404' \(did you mean http_404\?\)"):
        check_reason("http404")
    with pytest.raises(ConfigError, match=r"known reasons: .*timeout"):
        check_reason("nonsense_reason")
    with pytest.raises(ConfigError, match="timout"):
        LetterFilter.build(now_s=NOW_S, reasons=["timout"])
