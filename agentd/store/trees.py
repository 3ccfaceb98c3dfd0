"""Walking and removing trees an agent made: iterative, fd-relative, bounded in memory.

An agent controls the shape of its workspace: a directory 10,000 levels deep, 200,000 entries
in one directory, 255-byte names, fifos and sockets. Every walk the daemon makes over such a
tree must survive it: a recursive walk dies at Python's recursion limit (about 1,000 levels)
and a path-based one at PATH_MAX (4,096 bytes, about 2,000 levels of one-letter names). So:

- `remove_tree` descends with openat() from the current directory's fd and climbs back with
  "..", keeping only the names on the way (never one fd per level: 10,000 levels would pass
  RLIMIT_NOFILE); the agent's processes are dead by then, so ".." cannot move under it.
- Layers never hold a path longer than `MAX_PATH_BYTES` (commit refuses a step that made one,
  with the reason), so the walks over layers (diff, merge, squash, export) can stay
  path-based; they are iterative all the same (explicit stacks), and stop at the limit
  instead of descending further.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agentd.errors import FailedPrecondition

MAX_PATH_BYTES = 3072
"""The longest path (relative to the workspace root, in bytes) a layer may hold: room under
PATH_MAX (4,096) for the layer's own directory in front of it."""


class PathTooLong(FailedPrecondition):
    """A workspace path is longer than MAX_PATH_BYTES: the step that made it cannot commit.
    Shorten the paths (or the nesting) the task creates."""


def check_path(rel: str) -> None:
    """Raises PathTooLong for a workspace path a layer may not hold."""
    if len(os.fsencode(rel)) > MAX_PATH_BYTES:
        shown = rel[:60] + "…" + rel[-40:]
        raise PathTooLong(
            f"the workspace path {shown!r} is {len(os.fsencode(rel))} bytes long; a layer holds"
            f" paths of at most {MAX_PATH_BYTES} bytes (about {MAX_PATH_BYTES // 2} levels of"
            " one-letter directories); the step applies nothing: nest less deeply")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path | str) -> None:
    """Removes `path` and everything below it, whatever its depth, width or file types.

    Missing is fine. Raises OSError when something cannot be removed (the caller quarantines
    it). Nothing below `path` may still change while this runs.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    _make_removable(path)
    fd = os.open(path, _DIR_FLAGS)
    names: list[str] = []  # the directories entered below `path`, in order
    try:
        while True:
            child = _empty_but_one_subdir(fd)
            if child is not None:
                _make_removable(child, dir_fd=fd)
                below = os.open(child, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below
                names.append(child)
                continue
            if not names:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _empty_but_one_subdir(fd: int) -> str | None:
    """Unlinks every non-directory in the directory `fd`; returns one subdirectory's name, or
    None when the directory is now empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                return entry.name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
    return None


def _make_removable(name: str, dir_fd: int | None = None) -> None:
    """A directory the agent made 0500 cannot have its entries removed until it is 0700."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        with contextlib.suppress(OSError):
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dir_fd,
                     follow_symlinks=False)


def quarantine(path: Path, into: Path) -> Path:
    """Moves `path` (which could not be removed) aside into `into`, O(1); returns where."""
    into.mkdir(mode=0o700, exist_ok=True)
    target = into / path.name
    suffix = 0
    while os.path.lexists(target):
        suffix += 1
        target = into / f"{path.name}.{suffix}"
    try:
        os.rename(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        raise OSError(exc.errno, f"cannot move {path} into {into}: {exc.strerror}") from None
    return target
