"""Privileges: a worker becomes an unprivileged uid with no capabilities it could ever regain.

Order matters, and each step needs what the next one takes away:

    setgroups([])                  needs CAP_SETGID
    drop the bounding set          needs CAP_SETPCAP; every cap the kernel knows (probed, not
                                   read from /proc); exec of a setuid-root binary or of a file
                                   with file capabilities can never add one back
    lock the securebits            needs CAP_SETPCAP; uid 0 never gains caps again (NOROOT),
                                   keep-caps and no-setuid-fixup can never be turned on
    clear the ambient set
    setresgid, setresuid           the kernel clears permitted and effective on leaving uid 0
    # from here on, not root
    capset(0, 0, 0)                clears the inheritable set (and whatever is left)
    no_new_privs                   execve can never add privileges (setuid, file caps, LSMs)

Seccomp and Landlock both require no_new_privs, so `drop` comes right before them.
"""

from __future__ import annotations

import errno
import os
import resource

from agentd.sandbox import libc

# linux/securebits.h
_SECBIT_NOROOT = 1 << 0
_SECBIT_NOROOT_LOCKED = 1 << 1
_SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3  # locked with SECBIT_NO_SETUID_FIXUP (1 << 2) clear
_SECBIT_KEEP_CAPS_LOCKED = 1 << 5  # locked with SECBIT_KEEP_CAPS (1 << 4) clear
_SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
_SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
_SECUREBITS = (_SECBIT_NOROOT | _SECBIT_NOROOT_LOCKED | _SECBIT_NO_SETUID_FIXUP_LOCKED
               | _SECBIT_KEEP_CAPS_LOCKED | _SECBIT_NO_CAP_AMBIENT_RAISE
               | _SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)


def drop(uid: int, gid: int) -> None:
    """Makes the calling process `uid`/`gid` with no supplementary groups, every capability set
    empty, securebits locked and no_new_privs set; in the worker, after pivot_root.

    Raises OSError with the errno (EINVAL for uid or gid 0: a worker is never root).
    """
    if uid == 0 or gid == 0:
        raise OSError(errno.EINVAL, f"refusing to run a worker as uid {uid} gid {gid}")
    os.setgroups([])
    _drop_bounding_set()
    libc.prctl(libc.PR_SET_SECUREBITS, _SECUREBITS)
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # from here on, not root
    libc.capset_clear()
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError(errno.EPERM, "privileges: uid, gid or groups did not change")


def _drop_bounding_set() -> None:
    # Up to the first capability the kernel calls invalid (EINVAL), rather than up to
    # /proc/sys/kernel/cap_last_cap: the new root may not have /proc mounted yet.
    for cap in range(64):
        try:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL and cap > 0:
                return
            raise
    raise OSError(errno.EINVAL, "privileges: the kernel knows more than 64 capabilities")


def set_rlimits(*, core: int = 0, nofile: int, fsize: int | None,
                nproc: int | None = None) -> None:
    """Sets soft and hard limits together, so the worker cannot raise them again; call before
    `drop` (lowering needs no privilege, but order keeps it simple to reason about).

    `fsize` None leaves the inherited limit. `nproc` counts every process of the worker's real
    uid on the host, not per worker: prefer the cgroup's pids.max, and keep nproc as a
    backstop. Raises OSError with the errno.
    """
    limits = [(resource.RLIMIT_CORE, core), (resource.RLIMIT_NOFILE, nofile)]
    if fsize is not None:
        limits.append((resource.RLIMIT_FSIZE, fsize))
    if nproc is not None:
        limits.append((resource.RLIMIT_NPROC, nproc))
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except ValueError as exc:  # Python's mapping of EINVAL / EPERM
            err = errno.EPERM if "not allowed" in str(exc) else errno.EINVAL
            raise OSError(err, f"setrlimit({which}, {value}): {exc}") from None
