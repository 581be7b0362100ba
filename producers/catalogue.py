"""Read a catalogue file (JSONL or CSV) as items, streaming, one bad row never fatal.

A row names an item id, one or several image URLs and a version. A row that cannot be
read is reported with its line number and reason, and the run goes on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

URL_SEPARATOR = "|"  # CSV cells hold several URLs joined by this


@dataclass(frozen=True)
class CatalogueItem:
    line: int
    item_id: str
    image_urls: tuple[str, ...]
    version: int


@dataclass(frozen=True)
class RejectedRow:
    line: int
    reason: str
    raw: str


def read_catalogue(path: str | Path) -> Iterator[CatalogueItem | RejectedRow]:
    """Yield items and rejected rows in file order; the format comes from the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        yield from _read_jsonl(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise ValueError(f"unsupported catalogue format {suffix!r} (use .jsonl or .csv)")


def _read_jsonl(path: Path) -> Iterator[CatalogueItem | RejectedRow]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield RejectedRow(line_no, f"not JSON: {exc}", text)
                continue
            yield _to_item(row, line_no, text)


def _read_csv(path: Path) -> Iterator[CatalogueItem | RejectedRow]:
    with path.open("r", newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "item_id" not in reader.fieldnames:
            raise ValueError(f"{path}: CSV header must name item_id and image_urls")
        for row in reader:
            # line_num counts physical lines, so quoted newlines keep numbers honest.
            line_no = reader.line_num
            buf = io.StringIO()
            csv.writer(buf).writerow(row.values())
            if None in row:
                yield RejectedRow(line_no, "more cells than header columns", buf.getvalue())
                continue
            urls = [u.strip() for u in (row.get("image_urls") or "").split(URL_SEPARATOR)]
            parsed: dict[str, Any] = {
                "item_id": row.get("item_id"),
                "image_urls": [u for u in urls if u],
                "version": row.get("version") or 0,
            }
            yield _to_item(parsed, line_no, buf.getvalue().rstrip())


def _to_item(row: Any, line_no: int, raw: str) -> CatalogueItem | RejectedRow:
    if not isinstance(row, dict):
        return RejectedRow(line_no, "row is not an object", raw)
    item_id = row.get("item_id")
    if not isinstance(item_id, str | int) or not str(item_id).strip():
        return RejectedRow(line_no, "missing item_id", raw)
    urls = row.get("image_urls", row.get("image_url"))
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        return RejectedRow(line_no, "image_urls must be a non-empty list of URLs", raw)
    try:
        version = int(row.get("version", 0))
    except (TypeError, ValueError):
        return RejectedRow(line_no, f"version is not an integer: {row.get('version')!r}", raw)
    if version < 0:
        return RejectedRow(line_no, "version is negative", raw)
    return CatalogueItem(line_no, str(item_id).strip(), tuple(urls), version)
