"""Records of facts files: JSONL lines or CSV rows, read into facts and relation names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from probe.data.base import OBJECT_FIELDS, SUBJECT_FIELDS, Fact
from probe.errors import DataError
from probe.files import MAX_JSON_DEPTH, check_depth, folder_name, read_text


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSON-lines file; a malformed line is a ProbeError naming file and line."""
    text = read_text(path, "JSON-lines file", "one JSON object a line")
    rows = [(lineno, json_record(line, path, lineno)) for lineno, line in enumerate(text.split("\n"), 1)]
    return [(lineno, row) for lineno, row in rows if row is not None]


def json_record(line: str, where: str | Path, lineno: int) -> dict | None:
    """The JSON object on one line of a JSONL file (None for a blank line); anything else is a ProbeError naming
    `where` and the line."""
    if not line.strip():
        return None
    try:
        row = check_depth(json.loads(line), f"{where}:{lineno}")
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{lineno}: malformed JSON line ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{where}:{lineno}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL or CSV file (CSV: a header row names the fields)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"facts file {path} not found: expected a JSONL or CSV file")
    expected = f"facts file {path}: expected JSONL (one JSON object a line) or CSV with a header row"
    text = read_text(path, "facts file", "JSONL (one JSON object a line) or CSV with a header row, as UTF-8 text", "utf-8-sig")
    if not text.strip():
        raise DataError(f"facts file {path} is empty: expected a subject and an object per row")
    suffix = path.suffix.lower()
    if suffix != ".csv" and (suffix == ".jsonl" or text.lstrip().startswith("{")):
        rows = ((lineno, json_record(line, path, lineno)) for lineno, line in enumerate(text.split("\n"), 1))
        return [(lineno, row) for lineno, row in rows if row is not None]
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataError(expected)
    reader = csv.DictReader(text.splitlines(), dialect="excel-tab" if suffix == ".tsv" else "excel")
    return [(i, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader, 2)]


def field_of(row: dict, key: str, path: Path, lineno: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}:{lineno}: expected a non-empty string field {key!r}")
    return value


def first_text(row: dict, *keys: str) -> str | None:
    """The first of `keys` that holds a non-blank string in a record, stripped; None if none does."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def record_fact(row: dict, path: Path, lineno: int, fields: tuple[str, str] | None = None) -> Fact:
    """The fact of one record: LAMA's fields, subject/object, or the `fields` named; its first cloze sentence."""
    sub = first_text(row, *(fields[:1] if fields else SUBJECT_FIELDS))
    obj = first_text(row, *(fields[1:] if fields else OBJECT_FIELDS))
    if sub is None or obj is None:
        names = f"{fields[0]} and {fields[1]}" if fields else "sub_label/subject and obj_label/object, or --fields"
        raise DataError(f"{path}:{lineno}: expected a subject and an object ({names})")
    sentences = row.get("masked_sentences")
    sentence = sentences[0] if isinstance(sentences, list) and sentences and isinstance(sentences[0], str) else None
    return Fact(sub, obj, sentence)


def record_relation(row: dict, default: str, where: str = "") -> tuple[str, str]:
    """A record's relation and what it was read from: `relation`, else the last segment of LAMA's `pred`
    (/people/person/place_of_birth -> place_of_birth), else `predicate_id`, else `default`; a name that cannot be a
    folder is a ProbeError naming `where`."""
    for key in ("relation", "pred", "predicate_id"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            raw = value.strip()
            name = raw.rstrip("/").rsplit("/", 1)[-1] if key == "pred" else raw
            return folder_name(name, where, f"relation ({key} {raw!r})" if name != raw else "relation"), raw
    return folder_name(default, where), default


