"""Files, read and written safely: text that must be UTF-8, JSON, atomic writes with the umask's mode, logs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from probe.errors import ProbeError


def file_mode() -> int:
    """The mode open() gives a new file under the process's umask: 0644 under umask 022."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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


def read_text(path: Path, what: str = "file", expected: str = "UTF-8 text", encoding: str = "utf-8") -> str:
    """A text file's contents; a missing, unreadable or non-UTF-8 (binary) file is a ProbeError naming `what` it was
    read as and what was `expected`."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise ProbeError(f"{what} {path} not found: expected {expected}") from None
    except IsADirectoryError:
        raise ProbeError(f"{what} {path} is a folder: expected a file of {expected}") from None
    except UnicodeDecodeError:
        raise ProbeError(f"{what} {path} is not UTF-8 text (a binary file?): expected {expected}") from None
    except OSError as e:
        raise ProbeError(f"{what} {path} cannot be read ({e.strerror or e}): expected {expected}") from None


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"{path} not found")
    text = read_text(path, "JSON file", "a JSON document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def check_output_path(path: Path | None, flag: str = "--out") -> None:
    """An output folder must not be an existing file (checked before anything is made)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ProbeError(f"{flag} {path} is an existing file: expected a folder to write into")


class JsonlLog:
    """A training log: one JSON object a line, flushed as written; does nothing without a path."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def write(self, entry: dict) -> None:
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
