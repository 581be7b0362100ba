"""Row readers for the catalogue formats: JSONL, CSV and Parquet, each streaming.

A reader yields ``(line, row, raw, reason)`` per record: ``row`` maps column names to raw
values (only the columns asked for; an absent column is absent), ``raw`` is what the record
looked like, rendered to text by ``render`` only when the row is rejected, and ``reason`` is
set (and ``row`` is None) when the record cannot even be read as a row. Which values are
acceptable is the caller's business (producers/catalogue/reader.py).

Line numbers are 1-based: the physical line for JSONL and the line a CSV record starts on
(the header is line 1); the row number for Parquet.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from producers.catalogue.sources import ByteStream, CatalogueFormatError

Record = tuple[int, Mapping[str, Any] | None, Any, str | None]

MAX_LINE_BYTES = 8 * 2**20  # a longer JSONL line is rejected, not held
MAX_RAW_CHARS = 2000  # a rejected row's text is cut to this for reports
PARQUET_BATCH_ROWS = 4096
PARQUET_BUFFER_BYTES = 1 * 2**20  # column chunks are streamed in reads of this size

_BOM = b"\xef\xbb\xbf"


def clip(text: str) -> str:
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "…"


class JsonlRows:
    """One JSON object per line; blank lines are skipped (their numbers still count)."""

    columns: list[str] | None = None  # no header: keys are looked up per row
    total_rows: int | None = None

    def __init__(self, data: ByteStream, source: str) -> None:
        self._data = data
        self._source = source

    def fraction_done(self) -> float | None:
        return _byte_fraction(self._data)

    def rows(self, wanted: Sequence[str]) -> Iterator[Record]:
        readline = self._data.stream.readline
        line_no = 0
        while True:
            raw = readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                _skip_rest_of_line(self._data.stream)
                reason = f"line longer than {MAX_LINE_BYTES} bytes"
                yield line_no, None, raw[:MAX_RAW_CHARS], reason
                continue
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield line_no, None, raw, _json_problem(raw, exc)
                continue
            if not isinstance(obj, dict):
                yield line_no, None, raw, f"not a JSON object (a JSON {_json_kind(obj)})"
                continue
            yield line_no, obj, raw, None

    @staticmethod
    def render(raw: bytes) -> str:
        return clip(raw.decode("utf-8", errors="replace").rstrip("\r\n"))


def _skip_rest_of_line(stream: IO[bytes]) -> None:
    while True:
        rest = stream.readline(MAX_LINE_BYTES)
        if not rest or rest.endswith(b"\n"):
            return


def _json_problem(raw: bytes, exc: Exception) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not valid UTF-8 (byte {bad.start} of the line)"
    return f"not JSON: {exc}"


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


def _byte_fraction(data: ByteStream) -> float | None:
    if data.size_bytes is None:
        return None
    if data.size_bytes == 0:
        return 1.0
    return min(data.bytes_read() / data.size_bytes, 1.0)


class CsvRows:
    """A header row, then one record per row; a cell may span lines inside quotes."""

    total_rows: int | None = None

    def __init__(self, data: ByteStream, source: str) -> None:
        self._data = data
        self._source = source
        # surrogateescape: an undecodable byte becomes a marker we can find per cell and
        # report, instead of an exception that would end the whole file.
        self._text = io.TextIOWrapper(
            data.stream, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
        self._reader = csv.reader(self._text)
        try:
            header = next(self._reader)
        except StopIteration:
            raise CatalogueFormatError(f"catalogue {source} is empty: no CSV header") from None
        except csv.Error as exc:
            raise CatalogueFormatError(f"catalogue {source}: bad CSV header: {exc}") from exc
        self.columns: list[str] | None = [cell.strip() for cell in header]
        self._header_lines = self._reader.line_num

    def fraction_done(self) -> float | None:
        return _byte_fraction(self._data)

    def rows(self, wanted: Sequence[str]) -> Iterator[Record]:
        assert self.columns is not None
        positions = {name: self.columns.index(name) for name in wanted if name in self.columns}
        n_columns = len(self.columns)
        reader = self._reader
        last_line = self._header_lines
        while True:
            start_line = last_line + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last_line = reader.line_num
                yield start_line, None, [], f"not CSV: {exc}"
                continue
            last_line = reader.line_num
            if not cells:
                continue  # a blank line
            if len(cells) > n_columns:
                reason = f"CSV row has {len(cells)} cells, the header has {n_columns}"
                yield start_line, None, cells, reason
                continue
            row: dict[str, Any] = {}
            bad_utf8 = None
            for name, position in positions.items():
                if position < len(cells):
                    cell = cells[position]
                    if not cell.isascii() and not _is_valid_text(cell):
                        bad_utf8 = name
                        break
                    row[name] = cell
            if bad_utf8 is not None:
                yield start_line, None, cells, f"{bad_utf8}: not valid UTF-8"
                continue
            yield start_line, row, cells, None

    @staticmethod
    def render(cells: list[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(cells)
        text = buf.getvalue().encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return clip(text)


def _is_valid_text(cell: str) -> bool:
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ParquetRows:
    """Row batches of the wanted columns only, a row group at a time.

    A row group that cannot be decoded is reported as one rejected row (naming the rows it
    held) and reading goes on with the next group.
    """

    def __init__(self, file: pq.ParquetFile, source: str) -> None:
        self._file = file
        self._source = source
        self.columns: list[str] | None = list(file.schema_arrow.names)
        self.total_rows: int | None = file.metadata.num_rows
        self._rows_done = 0

    def fraction_done(self) -> float | None:
        if not self.total_rows:
            return 1.0 if self.total_rows == 0 else None
        return min(self._rows_done / self.total_rows, 1.0)

    def rows(self, wanted: Sequence[str]) -> Iterator[Record]:
        names = [name for name in wanted if self.columns and name in self.columns]
        metadata = self._file.metadata
        first_row = 0
        for group in range(metadata.num_row_groups):
            group_rows = metadata.row_group(group).num_rows
            row_no = first_row
            try:
                for batch in self._file.iter_batches(
                    batch_size=PARQUET_BATCH_ROWS,
                    row_groups=[group],
                    columns=names,
                    use_threads=False,
                ):
                    values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                    for cells in zip(*values, strict=True):
                        row_no += 1
                        self._rows_done = row_no
                        row = dict(zip(names, cells, strict=True))
                        yield row_no, row, row, None
            except (pa.ArrowException, OSError) as exc:
                # Only pyarrow's own decoding errors land here: failures of the S3 reader
                # are ours (not OSError) and pyarrow re-raises them as they are.
                end = first_row + group_rows
                reason = (
                    f"Parquet row group {group} unreadable from row {row_no + 1} to {end}: "
                    + " ".join(str(exc).split())
                )
                yield row_no + 1, None, {}, reason
            first_row += group_rows
            self._rows_done = first_row

    @staticmethod
    def render(row: Mapping[str, Any]) -> str:
        return clip(orjson.dumps(row, default=str).decode())


def open_parquet(source: Any, label: str) -> pq.ParquetFile:
    """A ParquetFile that streams column chunks; a bad footer is a clear error."""
    try:
        return pq.ParquetFile(
            source, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False, memory_map=False
        )
    except (pa.ArrowException, OSError) as exc:
        raise CatalogueFormatError(
            f"catalogue {label} is not a readable Parquet file: {exc}"
        ) from exc
