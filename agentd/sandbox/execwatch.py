"""Denied executions on record: a seccomp user-notification filter on execve and execveat.

Landlock's audit records cannot see a refusal by a noexec mount (may_open refuses before the
LSM hook), and the refusals matter to a reviewer: a tool started by a shell or by git and then
refused is otherwise invisible. So each worker installs, before its main seccomp filter, a
second tiny filter that returns SECCOMP_RET_USER_NOTIF for execve and execveat only
(`install`, child side). Its listener fd travels out of the worker over the error socket
(SCM_RIGHTS) to the launcher, whose event loop answers every notification (`answer`) with
SECCOMP_USER_NOTIF_FLAG_CONTINUE: the kernel still decides and enforces. The launcher, not the
daemon, so that a stopped or busy daemon never holds a worker's exec. Before answering, it
reads the path from /proc/<pid>/mem and predicts the kernel's answer by resolving it in the
worker (openat2 RESOLVE_IN_ROOT under /proc/<pid>/root, or the cwd, or the dirfd): a file on a
noexec mount or without execute permission is refused; the ELF loader run as a program is
recorded too (it can only map executable mounts, but a reviewer should see the attempt).

An egress worker's filter notifies some network calls too, answered by agentd/sandbox/
netwatch.py on the same listener: refusals its own kernel would make before any packet exists,
refused by the launcher on record.

The watcher can never hang a worker for long: it only reads and answers; if the launcher is
gone the listener closes and the kernel answers ENOSYS (fail closed; the worker dies with the
launcher anyway); a worker that floods it only slows its own execs (each waits for its
answer), and the launcher passes on at most MAX_RECORDS records per worker, then a count.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import stat
import struct
import sys
from dataclasses import dataclass

from agentd.sandbox import libc, netwatch
from agentd.sandbox.netwatch import NetAttempt

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_RET_USER_NOTIF = 0x7FC00000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPENAT2 = 437  # the same on x86_64 and aarch64
_RESOLVE_IN_ROOT = 0x10
# ioctls of the listener (linux/seccomp.h): _IOWR('!', 0, seccomp_notif),
# _IOWR('!', 1, seccomp_notif_resp), _IOW('!', 2, __u64).
_NOTIF_SIZE = 80
_RESP_SIZE = 24
_IOCTL_RECV = 0xC0502100
_IOCTL_SEND = 0xC0182101
_IOCTL_ID_VALID = 0x40082102

_SYSCALLS = {"x86_64": {"seccomp": 317, "execve": 59, "execveat": 322},
             "aarch64": {"seccomp": 277, "execve": 221, "execveat": 281}}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])
_libc = ctypes.CDLL(None, use_errno=True)

ELF_LOADERS = ("ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1")
MAX_PATH = 4096
MAX_RECORDS = 64
UNREADABLE = "refused: its path could not be read"


def _program(network: bool) -> bytes:
    """BPF: execve, execveat -> USER_NOTIF; with `network` (an egress worker), the network
    calls agentd/sandbox/netwatch.py answers too; everything else ALLOW (the main filter
    decides)."""
    ld, and_k, jeq, jset, ret = 0x20, 0x54, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, ALU|AND|K, ...
    low = 16 if sys.byteorder == "little" else 20  # seccomp_data.args[0], its low word

    def arg(i: int) -> tuple[int, int, int | str, int | str]:
        return (ld, low + 8 * i, 0, 0)

    notify, allow = "notify", "allow"
    net = netwatch.NR
    code: list[tuple[str, list[tuple[int, int, int | str, int | str]]]] = [
        ("", [(ld, 0, 0, 0), (jeq, _NR["execve"], notify, 0),
              (jeq, _NR["execveat"], notify, 0)]),
    ]
    if network:
        code[0][1].extend([
            (jeq, net["connect"], notify, 0), (jeq, net["socket"], "socket", 0),
            (jeq, net["sendto"], "flags3", 0), (jeq, net["sendmmsg"], "flags3", 0),
            (jeq, net["sendmsg"], "flags2", 0)])
        code[0][1].append((ret, _SECCOMP_RET_ALLOW, 0, 0))
        code += [
            ("socket", [arg(0), (jeq, socket.AF_INET, "inet", 0),
                        (jeq, socket.AF_INET6, "inet6", 0),
                        (jeq, netwatch.AF_PACKET, notify, allow)]),
            ("inet6", [arg(1), (and_k, netwatch.SOCK_TYPE_MASK, 0, 0),
                       (jeq, socket.SOCK_RAW, notify, 0), (jeq, socket.SOCK_DGRAM, notify, 0),
                       (jeq, netwatch.SOCK_PACKET, notify, 0),
                       (jeq, socket.SOCK_STREAM, "stream", allow)]),
            ("inet", [arg(1), (and_k, netwatch.SOCK_TYPE_MASK, 0, 0),
                      (jeq, socket.SOCK_RAW, notify, 0), (jeq, netwatch.SOCK_PACKET, notify, 0),
                      (jeq, socket.SOCK_STREAM, "stream", 0),
                      (jeq, socket.SOCK_DGRAM, 0, allow), arg(2),
                      (jeq, socket.IPPROTO_ICMP, notify, allow)]),
            ("stream", [arg(2), (jeq, netwatch.IPPROTO_MPTCP, notify, allow)]),
            ("flags3", [arg(3), (jset, netwatch.MSG_FASTOPEN, notify, allow)]),
            ("flags2", [arg(2), (jset, netwatch.MSG_FASTOPEN, notify, allow)]),
        ]
    code += [(allow, [(ret, _SECCOMP_RET_ALLOW, 0, 0)]),
             (notify, [(ret, _SECCOMP_RET_USER_NOTIF, 0, 0)])]
    return _assemble(code)


def _assemble(blocks: list[tuple[str, list[tuple[int, int, int | str, int | str]]]]) -> bytes:
    """Classic BPF from labelled blocks; a jump names a label (forward only) or an offset."""
    starts: dict[str, int] = {}
    index = 0
    for label, insns in blocks:
        starts[label] = index
        index += len(insns)
    out = bytearray()
    index = 0
    for _label, insns in blocks:
        for code, k, jt, jf in insns:
            offsets = [starts[j] - index - 1 if isinstance(j, str) else j for j in (jt, jf)]
            out += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
            index += 1
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(network: bool = False) -> int:
    """Child side: installs the notifying filter (with the network calls of an egress worker,
    agentd/sandbox/netwatch.py); returns its listener fd (close-on-exec).

    no_new_privs must be set. Must run before the main seccomp filter (which refuses nothing
    needed here, but is the last step by contract).
    """
    program = _program(network)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    fd = int(_libc.syscall(ctypes.c_long(_NR["seccomp"]), _SECCOMP_SET_MODE_FILTER,
                           _SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp listener: {os.strerror(err)}")
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fd


@dataclass(frozen=True)
class ExecAttempt:
    """One execve/execveat a worker made that the kernel refuses (or that ran the loader)."""

    key: str  # whom the listener belongs to (the task id)
    pid: int  # in the host's pid namespace
    path: str  # as the worker gave it
    reason: str
    refused: bool


def _read_string(pid: int, address: int) -> str | None:
    data = libc.read_memory(pid, address, MAX_PATH)
    return None if not data else data.split(b"\0", 1)[0].decode(errors="replace")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _open_in_root(pid: int, path: str) -> int:
    """An O_PATH fd of `path` resolved as the worker would (its root; absolute symlinks stay
    inside it), with openat2(RESOLVE_IN_ROOT)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
    try:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
        fd = int(_libc.syscall(ctypes.c_long(_OPENAT2), root, path.encode(), ctypes.byref(how),
                               ctypes.c_size_t(ctypes.sizeof(how))))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd
    finally:
        os.close(root)


def predict(pid: int, nr: int, args: tuple[int, ...]) -> tuple[str, str, bool] | None:
    """(path, reason, refused) when the exec is worth recording, else None (allowed, or a
    missing file: a shell's PATH search fails on many names)."""
    if nr == _NR["execve"]:
        dirfd, address, flags = _AT_FDCWD, args[0], 0
    else:
        dirfd, address, flags = ctypes.c_int32(args[0]).value, args[1], args[4]
    path = _read_string(pid, address)
    if path is None:
        if address:  # memory the worker can read and the launcher cannot: refused (EFAULT)
            return "<unreadable>", UNREADABLE, True
        return None  # NULL: the kernel answers EFAULT itself
    try:
        if not path and flags & _AT_EMPTY_PATH:
            fd = os.open(f"/proc/{pid}/fd/{dirfd}", os.O_PATH)
        elif path.startswith("/"):
            fd = _open_in_root(pid, path)
        elif dirfd == _AT_FDCWD:
            fd = os.open(f"/proc/{pid}/cwd/{path}", os.O_PATH)
        else:
            fd = os.open(f"/proc/{pid}/fd/{dirfd}/{path}", os.O_PATH)
    except OSError:
        return None
    try:
        vfs = os.fstatvfs(fd)
        mode = os.fstat(fd).st_mode
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)
    shown = path or f"<fd {dirfd}>"
    if vfs.f_flag & os.ST_NOEXEC:
        return shown, "not granted: its mount is noexec in the worker", True
    if stat.S_ISREG(mode) and not mode & 0o111:
        return shown, "not executable: no execute permission (a memfd, or a copy)", True
    if os.path.basename(real) in ELF_LOADERS:
        return (shown, "the ELF loader run as a program: it can only map programs on executable "
                "mounts", False)
    return None


class Gone(Exception):
    """The listener has no worker left (every process of it exited): close it."""


def answer(fd: int, ports: frozenset[int] | None = None
           ) -> tuple[int, str, str, bool] | NetAttempt | None:
    """Receives one notification on listener `fd` and answers it. An exec is let through to
    the kernel (CONTINUE); returns (pid, path, reason, refused) if it is worth recording. A
    network call of an egress worker (`ports`: the TCP ports its Landlock allows) is answered
    by netwatch.decide; returns the NetAttempt it refused.

    Raises Gone when the worker is gone. Never blocks for long: call it when `fd` is readable.
    """
    # RECV blocks when nothing is pending, and a listener whose worker is gone only reports
    # POLLHUP: look first, never block the launcher.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = sum(ev for _, ev in poller.poll(0))
    if not events & select.POLLIN:
        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            raise Gone
        return None
    notif = bytearray(_NOTIF_SIZE)
    try:
        fcntl.ioctl(fd, _IOCTL_RECV, notif)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):  # the call died meanwhile, or a signal
            return None
        raise Gone from exc
    notif_id, pid, _flags, nr, _arch, _ip = struct.unpack_from("=QIIiIQ", notif)
    args = struct.unpack_from("=6Q", notif, 32)
    is_exec = nr in (_NR["execve"], _NR["execveat"])
    attempt: tuple[str, str, bool] | NetAttempt | None = None
    # An exec goes on to the kernel; a network call this filter notified is refused unless
    # netwatch lets it through (a watch without `ports` is one the launcher never sets up).
    err = 0 if is_exec else errno.EPERM
    try:
        if is_exec:
            attempt = predict(pid, nr, args)
            if attempt is not None and attempt[1] == UNREADABLE:
                err = errno.EFAULT
        elif ports is not None:
            err, attempt = netwatch.decide(pid, nr, args, ports)
    except Exception as exc:  # a bug here must not stop the launcher, which serves every worker
        attempt = None if is_exec else netwatch.unreadable(nr, exc)
    try:  # the pid may have been reused if the notification died meanwhile: check
        fcntl.ioctl(fd, _IOCTL_ID_VALID, struct.pack("=Q", notif_id))
    except OSError:
        return None
    response = (struct.pack("=QqiI", notif_id, 0, -err, 0) if err else
                struct.pack("=QqiI", notif_id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE))
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, _IOCTL_SEND, response)
    if attempt is None or isinstance(attempt, NetAttempt):
        return attempt
    path, reason, refused = attempt
    return pid, path, reason, refused
