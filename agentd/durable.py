"""Making a file or a directory entry survive a power cut: the one place that knows which
fsyncs that takes, for the stores and the audit log alike (kept tiny, it imports nothing)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync of `path` itself (a directory: its entries, so a create, rename or unlink in it
    is durable). Links are not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                 | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path, mode: int) -> None:
    """`path` (and missing parents), each new one durable in its parent."""
    if path.is_dir():
        return
    make_dir(path.parent, mode)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    fsync_path(path.parent, directory=True)


def write_atomic(target: Path, data: bytes, mode: int = 0o600) -> None:
    """`target` holds `data` whole or not at all, durably: written under a fresh temporary
    name in the same directory (unique per writer, so two writers never share one), fsynced,
    renamed over `target`, and the rename fsynced."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent, directory=True)
