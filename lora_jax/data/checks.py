"""Refusing bad input data up front, naming the file and the row: empty files, bytes that are not UTF-8, JSON that does
not parse, CSV quoting that would merge rows, and source/target values that are not text.

Rows are counted from 1 in file order (a CSV's header is not a row); lines are the file's own lines."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from typing import Any, Mapping

log = logging.getLogger(__name__)
TEXT_FORMATS = (".json", ".jsonl", ".csv")
STRING_DTYPES = ("string", "large_string")
UTF8_FIX = "re-encode it to UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{ext}`"


class DataError(ValueError):
    """Input data that cannot be trained on as it is; the message names the file (and row) and the fix."""


def _scan_text(path: str) -> bool:
    """Raises DataError naming the line and byte offset of the first bytes that are not UTF-8; True when the file
    holds anything but whitespace."""
    offset, content = 0, False
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                fix = UTF8_FIX.format(path=path, ext=os.path.splitext(path)[1])
                raise DataError(f"data file {path} is not UTF-8: byte {line[e.start]:#04x} at line {lineno} (byte offset "
                                f"{offset + e.start}) cannot be decoded; {fix}") from None
            offset += len(line)
            content = content or bool(text.strip())
    return content


def count_csv_rows(path: str) -> tuple[int, list[str]]:
    """(data rows, header) of a CSV file as Python's csv module reads it in strict mode (header excluded, blank lines
    skipped as pandas does). A record that does not parse raises DataError naming the line where it began: typically a quote
    opened there is closed in the wrong place, which a lenient parser answers by merging the lines into one row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are legitimate fields (default limit: 128 KiB)
    rows, start, multiline, header = 0, 1, [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        try:
            for record in reader:
                header = header or record
                rows += bool(record)
                if reader.line_num > start and rows > 1:
                    multiline.append(start)
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(
                f"data file {path}: the CSV record starting at line {start} (row {rows}) does not parse ({e}, line "
                f"{reader.line_num}): a quote opened there is closed in the wrong place or never; fix the quoting "
                '(a quote inside a quoted field is written twice: "")'
            ) from None
    if multiline:
        log.warning("data file %s: %d row(s) hold line breaks inside quoted fields (the first starts at line %d); "
                    "if a quote was left open there, those lines were read as one row", path, len(multiline), multiline[0])
    return max(rows - 1, 0), header


def check_file(path: str) -> tuple[int, list[str]] | None:
    """Checks a local data file before `datasets` reads it: not empty, UTF-8 text (json / jsonl / csv), CSV records
    that parse. Returns a CSV's (row count, header), to read every column as text and compare the row count with what
    `datasets` reads (None for other formats)."""
    ext = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty (0 bytes): remove it from the data files or fill it")
    if ext in TEXT_FORMATS and not _scan_text(path):
        raise DataError(f"data file {path} has no rows (only whitespace): remove it from the data files or fill it")
    if ext != ".csv":
        return None
    rows, header = count_csv_rows(path)
    if rows == 0:
        raise DataError(f"data file {path} has no rows (a header only): remove it from the data files or fill it")
    return rows, header


def json_problem(path: str) -> str | None:
    """Where a JSON / JSON Lines file does not parse ('line 2, column 14: Expecting value'), or None."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document (a list of rows)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}, column {e.colno}: {e.msg}"
    return None


def _to_text(column: str):
    def convert(batch):
        return {column: [v if v is None or isinstance(v, str) else str(v) for v in batch[column]]}

    return convert


def text_columns(dataset, columns: Mapping[str, str], *, where: str, cast_to_string: bool = False):
    """`dataset` with its `columns` ({config key: column name}) holding text (or None, which tokenizing drops with the
    empty rows). A value of another type (number, list, mapping) raises DataError naming `where`, the row, the column
    and the type, unless cast_to_string, which converts such values with str() and logs how many."""
    import datasets

    for key, column in columns.items():
        feature = dataset.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype in STRING_DTYPES:
            continue  # every value is text or None: nothing to scan
        bad = [(i, v) for i, v in enumerate(dataset[column]) if v is not None and not isinstance(v, str)]
        if not bad:
            continue
        if not cast_to_string:
            row, value = bad[0]
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            raise DataError(
                f"{where}, row {row + 1}, column {column!r} ({key}): value {_short(value)} of type {type(value).__name__} "
                f"where text is expected{more}; fix the data, or set data.cast_to_string: true to train on str(value)"
            )
        log.warning("%s: converted %d non-text values of column %r to text with str() (data.cast_to_string)",
                    where, len(bad), column)
        features = dataset.features.copy()
        features[column] = datasets.Value("string")
        dataset = dataset.map(_to_text(column), batched=True, features=features, desc="data.cast_to_string")
    return dataset


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
