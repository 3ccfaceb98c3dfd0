"""Thin ctypes wrappers for the syscalls Python 3.11's `os` lacks.

Written by hand because no maintained library covers unshare/setns/mount/pivot_root/clone/
prctl/mount_setattr together and their cost matters on the spawn path. Each wrapper raises
OSError with the errno, so a failing step in a worker can be reported precisely.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import sys
from typing import Any, Union

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# prctl options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28

# mount_setattr (linux/mount.h).
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

_SYSCALLS = {
    "x86_64": {"clone": 56, "clone3": 435, "pivot_root": 155, "capset": 126, "mount_setattr": 442,
               "landlock_create_ruleset": 444, "landlock_add_rule": 445,
               "landlock_restrict_self": 446},
    "aarch64": {"clone": 220, "clone3": 435, "pivot_root": 41, "capset": 91, "mount_setattr": 442,
                "landlock_create_ruleset": 444, "landlock_add_rule": 445,
                "landlock_restrict_self": 446},
}
try:
    SYSCALL = _SYSCALLS[platform.machine()]
except KeyError as exc:  # pragma: no cover - only on unsupported hosts
    raise ImportError(f"agentd supports x86_64 and aarch64, not {platform.machine()}") from exc

SIGCHLD = 17


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


SyscallArg = Union[int, "ctypes._SimpleCData[Any]", None]


def syscall(name: str, *args: SyscallArg) -> int:
    """Calls a syscall by name from the table above; raises OSError on failure."""
    return _check(int(_libc.syscall(ctypes.c_long(SYSCALL[name]), *args)), name)


def clone(flags: int) -> int:
    """fork() that also creates namespaces: returns 0 in the child, the child's pid in the parent.

    Like fork, the child continues on a copy of the caller's stack; only safe from a
    single-threaded process (the launcher).
    """
    return syscall("clone", ctypes.c_ulong(flags | SIGCHLD), None, None, None, None)


CLONE_INTO_CGROUP = 0x200000000


class _CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), up to CLONE_ARGS_SIZE_VER2."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


def clone_into_cgroup(flags: int, cgroup_fd: int) -> int:
    """`clone` whose child starts in the cgroup (v2) that `cgroup_fd` opens: no migration
    afterwards (Linux >= 5.7). Same stack rules as `clone`; OSError if the kernel refuses
    (ENOSYS, or EBUSY/EOPNOTSUPP for a cgroup a process cannot be in)."""
    args = _CloneArgs(flags=flags | CLONE_INTO_CGROUP, exit_signal=SIGCHLD, cgroup=cgroup_fd)
    return syscall("clone3", ctypes.c_void_p(ctypes.addressof(args)),
                   ctypes.c_size_t(ctypes.sizeof(args)))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       ctypes.c_char_p(data.encode()) if data else None),
           f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr_recursive(path: str, attr_set: int) -> None:
    """Sets mount attributes on a mount and every mount below it (kernel >= 5.12)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    syscall("mount_setattr", ctypes.c_int(-100), ctypes.c_char_p(path.encode()),
            ctypes.c_uint(AT_RECURSIVE), ctypes.c_void_p(ctypes.addressof(attr)),
            ctypes.c_size_t(ctypes.sizeof(attr)))


def pivot_root(new_root: str, put_old: str) -> None:
    syscall("pivot_root", ctypes.c_char_p(new_root.encode()), ctypes.c_char_p(put_old.encode()))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def serve_the_daemon(fd: int) -> socket.socket:
    """The start of a helper process the daemon runs (the launcher, the slot maker): die with
    the daemon (exit now if it is gone already), leave SIGINT to it, and take the socket the
    daemon passed as `fd`."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the daemon died before we could ask to die with it
        sys.exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    return socket.socket(fileno=fd)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def set_filesystem_ids(uid: int, gid: int) -> None:
    """Sets fsuid/fsgid (the ids files are created with) and checks the kernel took them.

    setfsuid() reports no error; a second call returns the value in force.
    """
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsgid(gid) != gid or _libc.setfsuid(uid) != uid:
        raise OSError(22, f"setfsuid/setfsgid to {uid}/{gid} refused (is the id mapped?)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset_clear() -> None:
    """Empties the effective, permitted and inheritable capability sets of this thread."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    syscall("capset", ctypes.c_void_p(ctypes.addressof(header)),
            ctypes.c_void_p(ctypes.addressof(data)))


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def read_memory(pid: int, address: int, size: int) -> bytes | None:
    """Up to `size` bytes of process (or thread) `pid`'s memory at `address`, through
    /proc/<pid>/mem (what a seccomp supervisor reads a call's arguments with); None if none
    of it can be read. Shorter than `size` where readable memory ends."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            return mem.read(size)
    except (OSError, OverflowError, ValueError):
        return None
