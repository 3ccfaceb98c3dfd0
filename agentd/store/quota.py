"""Workspace quotas: what a run's layers may take on disk, and what one task may write.

The mechanism, chosen by what this kind of host offers:

- ext4 (the state filesystem here) has project quotas only when it was made with them, and
  XFS project quotas need XFS: neither can be assumed. A loop-mounted image per run would
  bound it, but forks share layers across runs and a mkfs per run costs tens of ms.
- So a task's upper is a tmpfs of its own, mounted by the daemon with `size=` the run's
  remaining bytes and `nr_inodes=` its remaining inodes (`mount_upper`): the kernel refuses
  the write that passes them (ENOSPC), the worker's limit watcher sees the tmpfs full and
  stops the task with stop reason `quota`, and nothing the task writes touches the state disk
  before commit. tmpfs pages are memory, charged to the task's memory cgroup: a policy's
  `limits.workspace` larger than its `limits.memory` is bounded by memory first.
- Commit copies the uppers into the new layer (they are on another filesystem now), counts
  the layer's bytes and inodes, and refuses the step if the run's stack would pass its quota;
  every layer's usage is kept beside the layers (`usage/<id>`), so a run's usage is a sum.
- The state filesystem keeps `reserve` bytes that workspaces never use: a commit that would
  eat into it fails the step (under one lock, so two commits cannot both pass), so the audit
  log and SQLite always have room, and the admin can still close or roll back runs.

overlayfs (with `userxattr`, as agentd mounts it) needs user xattrs on the upper: tmpfs has
them from Linux 6.6. On older kernels `tmpfs_uppers_supported` is False, uppers stay on the
state disk, and the quota holds at commit only (logged at start).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentd.errors import FailedPrecondition, ResourceExhausted
from agentd.sandbox import libc
from agentd.sandbox.overlay import OPAQUE_XATTR, PRIVATE_XATTR_PREFIXES

_PAGE = 4096
_UPPER_INODES = 4  # the tmpfs root, upper/, work/ and overlay's work/work


@dataclass(frozen=True)
class Quota:
    """A run's workspace limits (limits.workspace, limits.inodes)."""

    bytes: int
    inodes: int


@dataclass(frozen=True)
class Usage:
    bytes: int = 0
    inodes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.bytes + other.bytes, self.inodes + other.inodes)


class QuotaExceeded(FailedPrecondition):
    """The step would take the run past its workspace quota; nothing of it is applied.
    Remove files in a step, or raise limits.workspace / limits.inodes in the policy."""


class StateDiskFull(ResourceExhausted):
    """The state filesystem is down to the room kept for the audit log and the database;
    nothing of the step is applied. Close or roll back runs to free space."""


def tmpfs_uppers_supported(scratch: Path) -> bool:
    """Whether a tmpfs takes user xattrs here (overlay with userxattr needs them)."""
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=scratch))
    try:
        libc.mount("tmpfs", str(probe), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=64k")
    except OSError:
        probe.rmdir()
        return False
    try:
        os.setxattr(probe, "user.agentd-probe", b"1")
        return True
    except OSError:
        return False
    finally:
        libc.umount2(str(probe), libc.MNT_DETACH)
        probe.rmdir()


def mount_upper(path: Path, remaining: Quota) -> None:
    """A tmpfs at `path` holding at most what the run has left (at least one page, so that
    the mount exists; a run at its quota then cannot write at all)."""
    size = max(remaining.bytes // _PAGE * _PAGE, _PAGE)
    inodes = max(remaining.inodes, 0) + _UPPER_INODES
    libc.mount("tmpfs", str(path), "tmpfs", libc.MS_NOSUID | libc.MS_NODEV,
               f"mode=0711,size={size},nr_inodes={inodes}")


def unmount_if_mounted(path: Path) -> None:
    """Detaches a tmpfs upper (its contents go with it); nothing if `path` is no mount."""
    with contextlib.suppress(OSError):
        if os.path.ismount(path):
            libc.umount2(str(path), libc.MNT_DETACH)


def used(path: Path) -> Usage:
    """Bytes and inodes the filesystem holding `path` uses (a tmpfs upper)."""
    st = os.statvfs(path)
    return Usage((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree)


def check_limit(total: Usage, limit: Quota) -> None:
    """Raises QuotaExceeded if a run's workspace would take `total`, past `limit`."""
    if total.bytes > limit.bytes or total.inodes > limit.inodes:
        raise QuotaExceeded(
            f"the run's workspace would take {total.bytes >> 10} KiB in {total.inodes} files,"
            f" past limits.workspace ({limit.bytes >> 10} KiB) or limits.inodes"
            f" ({limit.inodes}); the step applies nothing: remove files in a step, or raise"
            " the limits in the policy")


def check_reserve(directory: Path, needed: int, reserve: int) -> None:
    """Raises StateDiskFull if writing `needed` bytes would leave less than `reserve`."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free - needed < reserve:
        raise StateDiskFull(
            f"the state filesystem has {free >> 20} MiB free; this step needs about "
            f"{needed >> 20} MiB and {reserve >> 20} MiB are kept for the audit log and the "
            "state database (state_reserve): close or roll back runs to free space")


# -- usage beside each layer ---------------------------------------------------------------

def usage_path(usage_dir: Path, layer_id: str) -> Path:
    return usage_dir / layer_id


def write_usage(usage_dir: Path, layer_id: str, usage: Usage) -> None:
    usage_dir.mkdir(mode=0o700, exist_ok=True)
    path = usage_path(usage_dir, layer_id)
    path.write_text(json.dumps({"bytes": usage.bytes, "inodes": usage.inodes}))


def read_usage(usage_dir: Path, layer_id: str) -> Usage | None:
    try:
        data = json.loads(usage_path(usage_dir, layer_id).read_text())
        return Usage(int(data["bytes"]), int(data["inodes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure(top: Path) -> Usage:
    """Bytes (allocated) and inodes of a tree; iterative."""
    total, count = 0, 0
    pending = [top]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                total += st.st_blocks * 512
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    pending.append(Path(entry.path))
    return Usage(total, count)


# -- copying an upper into a layer on another filesystem --------------------------------------

def copy_tree(src: Path, dst: Path) -> None:
    """Copies `src` (an entry of an upper) to `dst` with owner, mode, times and the xattrs a
    layer keeps (user ones, and overlay's opaque marker); whiteouts (0/0 character devices)
    and other special files are made with mknod. Iterative; hard links become copies."""
    dirs: list[tuple[Path, Path, os.stat_result]] = []
    pending = [(src, dst)]
    while pending:
        s, d = pending.pop()
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(d)
            dirs.append((s, d, st))
            with os.scandir(s) as entries:
                pending += [(Path(e.path), d / e.name) for e in entries]
        else:
            _copy_one(s, d, st)
    for s, d, st in reversed(dirs):  # children first: their creation moved the times
        _copy_meta(s, d, st)


def _copy_one(s: Path, d: Path, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        shutil.copyfile(s, d)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(s), d)
    else:  # fifo, socket, device, whiteout
        os.mknod(d, mode, st.st_rdev)
    _copy_meta(s, d, st)


def _copy_meta(s: Path, d: Path, st: os.stat_result) -> None:
    os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(d, stat.S_IMODE(st.st_mode))
        for name in os.listxattr(s, follow_symlinks=False):
            if name == OPAQUE_XATTR or not name.startswith(PRIVATE_XATTR_PREFIXES):
                os.setxattr(d, name, os.getxattr(s, name, follow_symlinks=False),
                            follow_symlinks=False)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
