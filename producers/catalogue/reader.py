"""Read a catalogue (JSONL, CSV or Parquet; local or s3://; gzip or plain) as items.

Streaming: neither the file nor its rows are ever held whole, so memory stays flat for a
catalogue of any size. A row names an item id, one or several image URLs and a version
(optionally an ETag); which columns hold them is a ``ColumnMapping``. A row that cannot be
used is yielded as a ``RejectedRow`` with its 1-based line (Parquet: row) number, a
reason naming the column and, where the row names a usable item id, that item (so the run
can keep the item as it was instead of deleting it); reading goes on: one bad row never
stops a nightly run. A catalogue that cannot be read at all (missing, access denied, not
the format it claims, truncated) raises a ``CatalogueError`` naming the source.

Item ids are taken as written. One with leading or trailing whitespace is rejected, never
trimmed: trimming merged ``"  padded  "`` into ``"padded"`` and dropped one item's images,
and such an id is unreachable from the CMS (which refuses it) anyway. Whitespace at an id's
ends is almost always an export bug (padded CSV cells); a reject with its line number shows
it, and the reject names the trimmed id as its item, which is the item older versions
indexed for that row, so that item is kept rather than deleted.

A ``Catalogue`` from ``open_catalogue`` can be iterated more than once: each further
iteration opens the source again and reads it from the start (a nightly run reads the
catalogue twice, see ``producers.nightly.winners``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.observability.logging import get_logger
from common.schema import MAX_ITEM_ID_CHARS, MAX_URL_CHARS
from producers.catalogue.formats import CsvRows, JsonlRows, ParquetRows, open_parquet
from producers.catalogue.sources import (
    CatalogueError,
    CatalogueFormatError,
    S3RangeReader,
    given_s3_client,
    is_s3_url,
    open_byte_stream,
    open_local_file,
)

__all__ = [
    "Catalogue",
    "CatalogueError",
    "CatalogueFormatError",
    "CatalogueItem",
    "ColumnMapping",
    "RejectedRow",
    "open_catalogue",
    "read_catalogue",
]

_FORMATS = {
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
    "csv": "csv",
    "parquet": "parquet",
    "pq": "parquet",
}
SUPPORTED_FORMATS = (
    "JSONL (.jsonl, .ndjson, .json), CSV (.csv), Parquet (.parquet, .pq); "
    "gzip (.gz) for JSONL and CSV"
)
_URL_PREFIXES = ("http://", "https://", "s3://", "file://")
# An opened source: its row reader and what closes it.
_Opened = tuple["JsonlRows | CsvRows | ParquetRows", list[Any]]
_MAX_VERSION = 2**63 - 1
# A row past the job schema's limits (MAX_ITEM_ID_CHARS, MAX_URL_CHARS) is rejected here
# rather than failing when its jobs are built.
# Without a column mapping, a JSONL row or header may name a single URL `image_url`.
_DEFAULT_URL_COLUMNS = ("image_urls",)
_SINGLE_URL_FALLBACK = "image_url"


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns (JSONL keys, CSV headers, Parquet columns) hold what."""

    item_id: str = "item_id"
    # One list / separator-joined column, or several columns of one URL each; their URLs
    # are taken in column order.
    image_urls: tuple[str, ...] = _DEFAULT_URL_COLUMNS
    version: str = "version"  # "" = no version column: every item is version 0
    etag: str = ""  # "" = no etag column
    url_separator: str = "|"
    max_images_per_item: int = 16

    def __post_init__(self) -> None:
        if not self.item_id or not self.image_urls or not all(self.image_urls):
            raise ValueError("a column mapping needs an item id column and URL columns")
        if not self.url_separator:
            raise ValueError("url_separator must not be empty")
        if self.max_images_per_item < 1:
            raise ValueError("max_images_per_item must be at least 1")

    def columns(self) -> list[str]:
        """Every column the mapping reads, each once, in a stable order."""
        names = [self.item_id, *self.image_urls, self.version, self.etag]
        return list(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class CatalogueItem:
    line: int
    item_id: str
    image_urls: tuple[str, ...]
    version: int
    etag: str | None = None


@dataclass(frozen=True)
class RejectedRow:
    line: int
    reason: str
    raw: str
    # The item the row is about, where its id could be read: a rejected row keeps that
    # item as the last published run had it (never a delete). None: not attributable.
    item_id: str | None = None


def _detect_format(source: str, format: str | None) -> str:
    if format is not None:
        name = format.lower().removeprefix(".").removesuffix(".gz")
        if name not in _FORMATS:
            raise ValueError(
                f"unsupported catalogue format {format!r}; supported: {SUPPORTED_FORMATS}"
            )
        return _FORMATS[name]
    name = source.rsplit("/", 1)[-1].lower().removesuffix(".gz")
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in _FORMATS:
        raise ValueError(
            f"cannot tell the format of catalogue {source!r} from its name; supported: "
            f"{SUPPORTED_FORMATS} (or pass --format)"
        )
    return _FORMATS[suffix]


class _RowChecker:
    """Turns one row's raw values into an item, or says precisely what is wrong."""

    def __init__(self, mapping: ColumnMapping, *, url_fallback: str | None) -> None:
        self.mapping = mapping
        self._url_fallback = url_fallback
        self._url_label = ", ".join(mapping.image_urls)

    def check(self, line: int, row: Mapping[str, Any]) -> CatalogueItem | tuple[str, str | None]:
        """The item, or (reason, the item id the reject is attributed to or None)."""
        m = self.mapping
        item_id = row.get(m.item_id)
        if isinstance(item_id, str):
            if not item_id.strip():
                return f"{m.item_id}: missing", None
            if item_id != item_id.strip():
                trimmed = item_id.strip()
                attributed = trimmed if len(trimmed) <= MAX_ITEM_ID_CHARS else None
                return (
                    f"{m.item_id}: starts or ends with whitespace: {item_id[:200]!r} "
                    "(ids are taken as written; fix the export)",
                    attributed,
                )
        elif isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        elif item_id is None:
            return f"{m.item_id}: missing", None
        else:
            return f"{m.item_id}: not a string or integer: {item_id!r}", None
        if len(item_id) > MAX_ITEM_ID_CHARS:
            return f"{m.item_id}: longer than {MAX_ITEM_ID_CHARS} characters", None
        problem = self._rest(line, item_id, row)
        return problem if isinstance(problem, CatalogueItem) else (problem, item_id)

    def _rest(self, line: int, item_id: str, row: Mapping[str, Any]) -> CatalogueItem | str:
        m = self.mapping
        urls: list[str] = []
        seen: set[str] = set()
        present = False
        for column in m.image_urls:
            if column in row:
                value = row[column]
                present = True
            elif self._url_fallback is not None and self._url_fallback in row:
                column = self._url_fallback
                value = row[column]
                present = True
            else:
                continue
            problem = self._collect_urls(column, value, urls, seen)
            if problem:
                return problem
        if not urls:
            return f"{self._url_label}: {'no image URLs' if present else 'missing'}"
        if len(urls) > m.max_images_per_item:
            return (
                f"{self._url_label}: {len(urls)} image URLs, more than "
                f"max_images_per_item={m.max_images_per_item}"
            )

        version = _version(row.get(m.version))
        if isinstance(version, str):
            return f"{m.version}: {version}"

        etag: str | None = None
        if m.etag:
            raw_etag = row.get(m.etag)
            if isinstance(raw_etag, str):
                etag = raw_etag.strip() or None
            elif raw_etag is not None:
                return f"{m.etag}: not a string: {raw_etag!r}"
        return CatalogueItem(line, item_id, tuple(urls), version, etag)

    def _collect_urls(self, column: str, value: Any, urls: list[str], seen: set[str]) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            candidates: list[Any] = value.split(self.mapping.url_separator)
        elif isinstance(value, list | tuple):
            candidates = list(value)
        else:
            return f"{column}: not a list or string of URLs: {value!r}"
        for candidate in candidates:
            if candidate is None:
                continue
            if not isinstance(candidate, str):
                return f"{column}: not a URL: {candidate!r}"
            url = candidate.strip()
            if not url:
                continue
            if not _is_supported_url(url):
                return f"{column}: not an http(s)://, s3:// or file:// URL: {url[:200]!r}"
            if len(url) > MAX_URL_CHARS:
                return f"{column}: URL longer than {MAX_URL_CHARS} characters: {url[:200]!r}"
            if url not in seen:  # the same URL twice in one item is one image
                seen.add(url)
                urls.append(url)
        return ""


def _is_supported_url(url: str) -> bool:
    head = url[:8].lower()
    for prefix in _URL_PREFIXES:
        if head.startswith(prefix):
            return len(url) > len(prefix)
    return False


def _version(value: Any) -> int | str:
    """The version as an int, or a reason it is not one. Absent or empty means 0."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return f"not a non-negative integer: {value!r}"
    if isinstance(value, int):
        version = value
    elif isinstance(value, float) and value.is_integer():
        version = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return 0
        if not text.isdigit() or not text.isascii():
            return f"not a non-negative integer: {value[:50]!r}"
        version = int(text)
    else:
        return f"not a non-negative integer: {value!r}"
    if version < 0:
        return f"not a non-negative integer: {value!r}"
    if version > _MAX_VERSION:
        return f"larger than {_MAX_VERSION}: {value!r}"
    return version


class Catalogue:
    """An opened catalogue; close it (or use ``with``).

    Each iteration reads it from the start: a further one opens the source again (only a
    catalogue built without ``reopen`` can be iterated just once).
    """

    def __init__(
        self,
        source: str,
        rows: JsonlRows | CsvRows | ParquetRows,
        mapping: ColumnMapping,
        closers: list[Any],
        *,
        reopen: Callable[[], _Opened] | None = None,
    ) -> None:
        self.source = source
        self.format = type(rows).__name__.removesuffix("Rows").lower()
        self._rows = rows
        self._closers = closers
        self._reopen = reopen
        self._asked = mapping
        self.total_rows_hint: int | None = rows.total_rows
        self.mapping, url_fallback = _resolve_columns(source, mapping, rows.columns)
        self._checker = _RowChecker(self.mapping, url_fallback=url_fallback)
        self._iterated = False
        self._started = False
        self._finished = False

    def __iter__(self) -> Iterator[CatalogueItem | RejectedRow]:
        if self._iterated:
            if self._reopen is None:
                raise RuntimeError(f"catalogue {self.source} can be iterated only once")
            self._open_again(self._reopen)
        self._iterated = True
        return self._entries()

    def _open_again(self, reopen: Callable[[], _Opened]) -> None:
        """A further pass: the source opened again, read from its start."""
        rows, closers = reopen()
        self.close()
        self._rows, self._closers = rows, closers
        mapping, url_fallback = _resolve_columns(self.source, self._asked, rows.columns, warn=False)
        if mapping != self.mapping:
            self.close()
            raise CatalogueFormatError(
                f"catalogue {self.source} changed while it was read: its columns differ "
                "between two reads"
            )
        self._checker = _RowChecker(self.mapping, url_fallback=url_fallback)
        self.total_rows_hint = rows.total_rows
        self._started = self._finished = False

    def _entries(self) -> Iterator[CatalogueItem | RejectedRow]:
        check = self._checker.check
        render = self._rows.render
        self._started = True
        seen = 0
        for line, row, raw, reason in self._rows.rows(self.mapping.columns()):
            seen += 1
            item_id: str | None = None
            if row is not None:
                result = check(line, row)
                if isinstance(result, CatalogueItem):
                    yield result
                    continue
                reason, item_id = result
            yield RejectedRow(line, reason or "unreadable row", render(raw), item_id)
        if not seen:
            # An export that wrote nothing is a failed export, whatever the format: empty
            # CSV and Parquet files already stopped the run, an empty JSONL finished as a
            # run with 0 rows.
            raise CatalogueFormatError(f"catalogue {self.source} has no rows (an empty export?)")
        self._finished = True

    def fraction_done(self) -> float | None:
        """Share of the catalogue read so far (stored bytes; Parquet: rows), for an ETA."""
        if self._finished:
            return 1.0
        if not self._started:
            return 0.0  # opening already buffered the first megabyte; nothing is done yet
        return self._rows.fraction_done()

    def close(self) -> None:
        while self._closers:
            self._closers.pop().close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalogue({self.source!r}, format={self.format})"


def _resolve_columns(
    source: str, mapping: ColumnMapping, header: list[str] | None, *, warn: bool = True
) -> tuple[ColumnMapping, str | None]:
    """Check a header against the mapping; returns the mapping to use and a URL fallback."""
    if header is None:  # JSONL: keys are per row
        fallback = _SINGLE_URL_FALLBACK if mapping.image_urls == _DEFAULT_URL_COLUMNS else None
        return mapping, fallback
    present = set(header)
    if (
        mapping.image_urls == _DEFAULT_URL_COLUMNS
        and _DEFAULT_URL_COLUMNS[0] not in present
        and _SINGLE_URL_FALLBACK in present
    ):
        mapping = replace(mapping, image_urls=(_SINGLE_URL_FALLBACK,))
    required = [mapping.item_id, *mapping.image_urls]
    if mapping.etag:
        required.append(mapping.etag)
    if mapping.version and mapping.version != ColumnMapping.version:
        # A configured version column must exist; the default one may be absent (version 0).
        required.append(mapping.version)
    missing = [name for name in required if name not in present]
    if missing:
        raise CatalogueFormatError(
            f"catalogue {source} has no column {', '.join(repr(n) for n in missing)} "
            f"(its columns: {', '.join(header)}); set the [producer] column mapping"
        )
    duplicated = sorted({n for n in mapping.columns() if header.count(n) > 1})
    if duplicated:
        raise CatalogueFormatError(
            f"catalogue {source} names column {', '.join(map(repr, duplicated))} more than once"
        )
    if warn and mapping.version and mapping.version not in present:
        get_logger("catalogue", source=source).warning(
            "no version column; every item gets version 0", column=mapping.version
        )
    return mapping, None


def open_catalogue(
    source: str | Path,
    mapping: ColumnMapping = ColumnMapping(),
    *,
    s3_client: Any | None = None,
    format: str | None = None,
) -> Catalogue:
    """Open a catalogue for one streaming pass; errors about the whole file raise here."""
    label = source if isinstance(source, str) else os.fspath(source)
    kind = _detect_format(label, format)

    def open_rows() -> _Opened:
        if kind == "parquet":
            return _open_parquet(label, s3_client)
        data = open_byte_stream(label, s3_client=s3_client)
        try:
            rows = JsonlRows(data, label) if kind == "jsonl" else CsvRows(data, label)
        except BaseException:
            data.close()
            raise
        return rows, [data]

    rows, closers = open_rows()
    try:
        return Catalogue(label, rows, mapping, closers, reopen=open_rows)
    except BaseException:
        for closer in reversed(closers):
            closer.close()
        raise


def _open_parquet(label: str, s3_client: Any | None) -> _Opened:
    if label.lower().endswith(".gz"):
        raise CatalogueFormatError(
            f"catalogue {label}: gzip-wrapped Parquet is not supported "
            "(Parquet compresses its pages itself)"
        )
    closers: list[Any] = []
    source: Any = label
    if is_s3_url(label):
        client = given_s3_client(s3_client, label)
        reader = S3RangeReader(client, label)
        closers.append(reader)
        source = reader
    else:
        # Opened once for the same clear errors as the other formats; pyarrow then reads
        # the path natively (without the GIL).
        fh, _ = open_local_file(Path(label))
        fh.close()
    try:
        parquet = open_parquet(source, label)
        closers.append(parquet)
        return ParquetRows(parquet, label), closers
    except BaseException:
        for closer in reversed(closers):
            closer.close()
        raise


def read_catalogue(
    path: str | Path,
    mapping: ColumnMapping = ColumnMapping(),
    **kwargs: Any,
) -> Iterator[CatalogueItem | RejectedRow]:
    """Items and rejected rows in file order; the file is closed when iteration ends."""
    with open_catalogue(path, mapping, **kwargs) as catalogue:
        yield from catalogue
