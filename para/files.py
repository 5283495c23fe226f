"""Reading and writing the user's files: JSONL lines that name themselves when they are wrong,
and writes that never leave a half-written file (a temporary file beside the target, then a
rename)."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from para.errors import UserError


class WriteError(UserError):
    """A file could not be written (disk full, read-only, no permission); the old one is intact."""


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file. A
    failed write leaves the previous file as it was and raises WriteError."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """As atomic_save, for any writer of bytes: write(f) fills the temporary file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"{path}: could not write ({e.strerror or e}); the previous file is intact") from None
        raise


def temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files that a killed writer of `path` left behind: never read, only removed."""
    for stale in path.parent.glob(glob.escape(temporary_prefix(path)) + "*.tmp"):
        stale.unlink(missing_ok=True)


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output path that could not be written at the end."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name, such as {path / 'para.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable; choose another place or fix its permissions")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a UserError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); one JSON object per line") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: JSON nested too deeply; one flat object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def string_field(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        problem = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise UserError(f"{where}: field {key!r} is {problem}")
    if not is_text(value):
        raise UserError(f"{where}: field {key!r} holds an invalid Unicode escape (a lone surrogate)")
    return value


def is_text(value: str) -> bool:
    """False for a string with a lone surrogate ("\ud800" in JSON), which no text holds."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
