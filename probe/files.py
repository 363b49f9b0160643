"""Files, read and written safely: text that must be UTF-8 in bounded lines, JSON, names that become folders, atomic
writes with the umask's mode, strict JSON logs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from probe.errors import DataError, ProbeError, RunFolderError

MAX_LINE_BYTES = 1_000_000  # a longer line in any file probe reads is refused (a zip bomb's one line, say)
MAX_JSON_DEPTH = 64  # JSON nested deeper than this is refused (facts, configs and logs are a few levels deep)
MAX_NAME_BYTES = 200  # a relation name becomes a folder: at most this many UTF-8 bytes
NAME_RULE = "a folder name: not empty, . or .., no / or \\, no control character, at most 200 bytes"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file under the process's umask: 0644 under umask 022."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode mkdir() gives a new folder under the process's umask: 0755 under umask 022."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of one; the new file gets
    the mode a plain write would give it under the umask (mkstemp alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def folder_name(name: str, where: str = "", what: str = "relation") -> str:
    """`name` if it can be a folder of its own inside a run folder, else a ProbeError naming `where` it came from.

    The one check between a name read from data (facts, file names, template files, relations.jsonl, grids) and a path."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is a path to a folder, not a name"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "holds a path separator" + (" (an absolute path)" if name.startswith(("/", "\\")) else "")
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "holds a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is {len(name.encode('utf-8', 'surrogatepass'))} bytes long"
    if problem:
        shown = repr(name) if len(str(name)) <= 60 else repr(name[:60]) + "..."
        raise DataError(f"{where + ': ' if where else ''}{what} name {shown} {problem}: expected {NAME_RULE}")
    return name


def distinct_folders(names: dict[str, str], what: str = "relations") -> None:
    """Names (name -> where it came from) that would share one folder, here or on a case-blind file system, are refused."""
    seen: dict[str, str] = {}
    for name, where in names.items():
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise DataError(f"{what} {other!r} and {name!r} ({where}) would share one folder: expected names that differ "
                            "in more than case")


def bounded_lines(stream: IO[bytes], where: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a binary stream, each read with a bound: a line over MAX_LINE_BYTES is a ProbeError
    naming `where` and the line, so that memory stays bounded whatever the file holds."""
    lineno = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not (len(raw) == MAX_LINE_BYTES + 1 and raw.endswith(b"\n")):
            raise DataError(f"{where}:{lineno}: line longer than {MAX_LINE_BYTES:,} bytes (1 MB): expected shorter lines")
        yield lineno, raw


def read_text(path: Path, what: str = "file", expected: str = "UTF-8 text", encoding: str = "utf-8",
              error: type[ProbeError] = DataError) -> str:
    """A text file's contents, read in bounded lines; a missing, unreadable or non-UTF-8 (binary) file, or a line over
    MAX_LINE_BYTES, is an `error` naming `what` it was read as and what was `expected`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return b"".join(raw for _, raw in bounded_lines(f, path)).decode(encoding)
    except ProbeError as e:  # a line too long
        raise error(str(e)) from None
    except FileNotFoundError:
        raise error(f"{what} {path} not found: expected {expected}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder: expected a file of {expected}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary file?): expected {expected}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e}): expected {expected}") from None


def read_json(path: Path, error: type[ProbeError] = RunFolderError) -> dict:
    """A JSON file (most are a run folder's); a missing or malformed one is an `error` naming it."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path} not found")
    text = read_text(path, "JSON file", "a JSON document", error=error)
    try:
        return check_depth(json.loads(text), path)
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None


def damaged(marker: Path) -> str | None:
    """None if a finished cell's marker parses and every file it lists (`files`) is there and parses; else why not
    (a missing marker: the cell never finished)."""
    marker = Path(marker)
    if not marker.is_file():
        return "not finished"
    try:
        record = read_json(marker)
    except ProbeError:
        return f"{marker.name} does not parse"
    if not isinstance(record, dict):
        return f"{marker.name} is not a JSON object"
    for name in record.get("files", []):
        why = _unreadable(marker.parent / name) if isinstance(name, str) else "is not a file name"
        if why:
            return f"{name} {why}"
    return None


def _unreadable(path: Path) -> str | None:
    """Why a result file cannot be read back whole (JSON, JSON lines, safetensors), or None."""
    if not path.is_file():
        return "is missing"
    try:
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".jsonl":
            lines = [line for line in read_text(path, "JSON-lines file").split("\n") if line.strip()]
            if not lines:
                return "is empty"
            for line in lines:
                json.loads(line)
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + size + end:
                return "is truncated"
    except (ProbeError, ValueError, KeyError, TypeError, OSError):
        return "does not parse"
    return None


def check_depth(value, where: str | Path, limit: int = MAX_JSON_DEPTH):
    """`value` (parsed JSON) if it nests at most `limit` levels deep, else a ProbeError naming `where`."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            raise DataError(f"{where}: JSON nested deeper than {limit} levels")
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
                 if isinstance(v, dict | list)]
    return value


def strict_json(entry: dict) -> dict:
    """A log entry as strict JSON allows: non-finite floats become null, and `nonfinite` names their keys."""
    bad = [k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return entry
    return {**{k: None if k in bad else v for k, v in entry.items()}, "nonfinite": bad}


class JsonlLog:
    """A training log: one JSON object a line, flushed as written; does nothing without a path."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def write(self, entry: dict) -> None:
        if self.file:
            self.file.write(json.dumps(strict_json(entry), allow_nan=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
