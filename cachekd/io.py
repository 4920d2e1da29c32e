"""Small file-system helpers shared by every stage: atomic writes, fingerprints, JSON."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0o022)  # (read once at import, before any writer thread exists: umask is process-wide)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; written files get the usual open() mode instead.
_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one (on an object
    store, one PUT)."""
    from cachekd.storage import location, write_bytes

    if write_bytes(location(path), data):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_disk_full(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from or while handling, says the disk (or quota) is full: torch
    reports a full disk while saving as a RuntimeError ("unexpected pos") raised while handling the OSError."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):  # libraries that keep only the message (safetensors)
            return True
        e = e.__cause__ or e.__context__
    return False


def give_usual_mode(directory: Path) -> None:
    """Give every file under `directory` the mode open() would (0666 minus the umask). Files written by other
    libraries through a temporary file (safetensors' ``model.safetensors``) come out owner-only (0600)."""
    for f in Path(directory).rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 != _FILE_MODE:
            os.chmod(f, _FILE_MODE)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    from cachekd.storage import location

    return json.loads(location(path).read_bytes())


def read_json_dict(path: Path, hint: str) -> dict:
    """A JSON object from `path`; a damaged or non-object file raises CachekdError ending with `hint`."""
    from cachekd.errors import CachekdError

    try:
        data = read_json(path)
    except ValueError:
        raise CachekdError(f"{str(path)!r} is not valid JSON; {hint}") from None
    if not isinstance(data, dict):
        raise CachekdError(f"{str(path)!r} does not hold a JSON object; {hint}")
    return data


def check_format(meta: dict, *, expected: str, version: int, what: str, path: Path, remedy: str) -> None:
    """Refuse a manifest written for another format (``meta["format"]``) or another format version, in one
    sentence naming `what` is at `path` and the `remedy` (e.g. "run precompute again")."""
    from cachekd.errors import CachekdError

    if meta.get("format") != expected:
        raise CachekdError(f"{str(path)!r} is not a {what} (its manifest says {meta.get('format')!r}).")
    if meta.get("format_version") != version:
        raise CachekdError(f"{what} {str(path)!r} has format version {meta.get('format_version')}; this cachekd reads "
                           f"{version}: {remedy}.")


def open_array_read_only(path: Path, what: str, remedy: str):
    """The zarr array at `path`, read-only. A missing or unparsable zarr.json is one sentence: `what` (e.g. "the
    train split of token store 'x'") cannot be opened, and the `remedy`."""
    from cachekd.errors import CachekdError
    from cachekd.storage import location, open_array

    try:
        return open_array(location(path), mode="r")
    except (PermissionError, MemoryError):
        raise
    except Exception as e:  # missing or unparsable zarr.json
        raise CachekdError(f"{what} cannot be opened ({type(e).__name__}: its zarr.json is missing or damaged); "
                           f"{remedy}.") from e


def read_json_dict_or_none(path: Path) -> dict | None:
    """A JSON object from `path`; None when the file is missing, unreadable or not a JSON object."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Fingerprint of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def dir_is_empty(path: Path) -> bool:
    from cachekd.storage import location

    return not any(location(path).iterdir())
