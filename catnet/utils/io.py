"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Everything catnet writes that must survive `kill -9` (feature shards, checkpoints, converted weights,
manifests) goes through these helpers: write to a temporary file in the same directory, fsync, rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from catnet.errors import CatnetError

# read once, at import (before catnet starts threads): setting it to 0 and back is the portable way
_UMASK_AT_IMPORT = os.umask(0)
os.umask(_UMASK_AT_IMPORT)


def current_umask() -> int:
    """The process umask, read without setting it (Linux: /proc/self/status), so that files other
    threads create meanwhile keep their permissions; elsewhere the umask catnet was imported with."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then atomically move tmp_path to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600, and writers that recreate the file (safetensors) reset it to 0600: give
        # the final file the permissions a plain open() would, so a store or run can be shared.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(obj):
    """`obj` with every NaN / +-Inf float replaced by None: JSON has no such numbers, and a reader's
    parser (not Python's) refuses the `NaN` that json.dumps would write."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """json.dumps that always writes valid JSON (non-finite floats become null)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, to_json(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(directory: str | os.PathLike) -> int:
    """Delete temporaries left by a writer that was killed mid-write; returns how many."""
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the block; CatnetError(busy) when another
    process holds it. The kernel drops the lock when the holder exits, kill -9 included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CatnetError(busy) from None
    try:
        yield
    finally:
        f.close()
