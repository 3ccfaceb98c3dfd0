"""Landlock: what a worker may read, write, execute and connect to, enforced after pivot_root.

Hand-written ctypes, because no maintained Python binding for Landlock exists and the ABI is
three syscalls and three small structs.

The ruleset handles every access right the running kernel knows, so anything without a rule is
denied: filesystem rights by ABI (REFER from 2, TRUNCATE from 3, IOCTL_DEV from 5), TCP bind and
connect from ABI 4 (no rule grants bind; connect only to the ports of a policy's egress entries,
a second wall behind the egress namespace's nftables, by port since Landlock knows no
addresses), and from ABI 6 the
scopes that keep a worker from signalling processes or reaching abstract unix sockets outside its
own domain. ABI 7 adds only audit-logging flags, which stay at the kernel's defaults.

Executing a file needs EXECUTE on it and on what the kernel opens to run it: the ELF interpreter
(PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2) and, for a script, its `#!` interpreter, which
in turn needs its own ELF interpreter. The caller puts all of them in `execute`;
`interpreter_of` finds them one level at a time. `#!/usr/bin/env python3` needs python3 too,
found through PATH at run time, so no file inspection can name it. Shared libraries are mapped
by ld.so with plain reads: READ_FILE on their directories is enough.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Sequence

from agentd.sandbox import libc

# Filesystem access rights (linux/landlock.h).
_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_REMOVE_DIR = 1 << 4
_REMOVE_FILE = 1 << 5
_MAKE_CHAR = 1 << 6
_MAKE_DIR = 1 << 7
_MAKE_REG = 1 << 8
_MAKE_SOCK = 1 << 9
_MAKE_FIFO = 1 << 10
_MAKE_BLOCK = 1 << 11
_MAKE_SYM = 1 << 12
_REFER = 1 << 13  # ABI 2
_TRUNCATE = 1 << 14  # ABI 3
_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# Rights that apply to a file itself; the others only make sense beneath a directory, and the
# kernel refuses them (EINVAL) in a rule on a file.
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV

_READ = _READ_FILE | _READ_DIR
_WRITE = (_READ | _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_DIR | _MAKE_REG | _MAKE_SOCK
          | _MAKE_FIFO | _MAKE_SYM | _TRUNCATE | _REFER)
_EXEC = _EXECUTE | _READ_FILE
_DEVICE = _READ_FILE | _WRITE_FILE | _IOCTL_DEV

DEFAULT_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                   "/dev/tty", "/dev/ptmx", "/dev/pts")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: int) -> int:
    # Every argument as a full 64-bit register: landlock_create_ruleset's size is a size_t, and
    # libc.syscall would pass a bare Python int as a 32-bit C int.
    result = int(_libc.syscall(ctypes.c_long(libc.SYSCALL[name]),
                               *(ctypes.c_long(a) for a in args)))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _NetPortAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_RULE_NET_PORT = 2


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when the kernel lacks Landlock or it is disabled."""
    try:
        return _syscall("landlock_create_ruleset", 0, 0, _CREATE_RULESET_VERSION)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def _handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def enter(*, read: Sequence[str], write: Sequence[str], execute: Sequence[str],
          devices: Sequence[str] = DEFAULT_DEVICES, connect: Sequence[int] = ()) -> bool:
    """Restricts the calling thread (and what it executes) to the given paths, as seen inside
    the worker, denies TCP bind, and TCP connect to any port but `connect`'s.

    `read`: read files and list directories beneath. `write`: also create, write, truncate,
    rename into and remove, never execute. `execute`: files, or directories to execute beneath
    (read and execute); see the module docstring for interpreters. `devices`: read, write and
    ioctl. A path that does not exist grants nothing and is skipped, so one device list fits every
    root. no_new_privs must already be set. Returns False, having done nothing, when the kernel
    has no Landlock; raises OSError with the errno on any other failure.
    """
    abi = abi_version()
    if abi == 0:
        return False
    handled_fs = _handled_fs(abi)
    attr = _RulesetAttr(handled_fs,
                        _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    # An older kernel knows a shorter struct; it accepts a longer one only if the tail is zero.
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _syscall("landlock_create_ruleset", ctypes.addressof(attr), size, 0)
    try:
        for rights, paths in ((_READ, read), (_WRITE, write), (_EXEC, execute),
                              (_DEVICE, devices)):
            for path in paths:
                _add_path_rule(ruleset, path, rights & handled_fs)
        for port in connect if abi >= 4 else ():
            rule = _NetPortAttr(_NET_CONNECT_TCP, port)
            _syscall("landlock_add_rule", ruleset, _RULE_NET_PORT, ctypes.addressof(rule), 0)
        _syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)
    return True


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        if rights:
            rule = _PathBeneathAttr(rights, fd)
            try:
                _syscall("landlock_add_rule", ruleset, _RULE_PATH_BENEATH,
                         ctypes.addressof(rule), 0)
            except OSError as exc:
                raise OSError(exc.errno, f"landlock rule for {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


_PT_INTERP = 3
_PATH_MAX = 4096


def interpreter_of(path: str) -> str | None:
    """The file the kernel opens with exec permission to run `path`: an ELF's PT_INTERP
    (e.g. /lib64/ld-linux-x86-64.so.2) or a script's `#!` interpreter; None for a static ELF or
    anything else. Apply again to the result: a script's interpreter has its own.

    Raises OSError if `path` cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(256)  # BINPRM_BUF_SIZE: all of a #! line the kernel looks at
        if head.startswith(b"#!"):
            line = head[2:].split(b"\n", 1)[0].replace(b"\t", b" ").strip()
            interp = line.split(b" ", 1)[0]
            return interp.decode() if interp else None
        if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) \
                or head[5] not in (1, 2):
            return None
        wide = head[4] == 2
        end = "<" if head[5] == 1 else ">"
        if wide:
            if len(head) < 64:
                return None
            phoff, = struct.unpack_from(end + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            header = end + "IIQQQQ"  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
        else:
            phoff, = struct.unpack_from(end + "I", head, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
            header = end + "IIIII"  # p_type, p_offset, p_vaddr, p_paddr, p_filesz
        if phentsize < struct.calcsize(header):
            return None
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            raw = f.read(struct.calcsize(header))
            if len(raw) < struct.calcsize(header):
                return None
            fields = struct.unpack(header, raw)
            if fields[0] != _PT_INTERP:
                continue
            offset, size = (fields[2], fields[5]) if wide else (fields[1], fields[4])
            if not 0 < size <= _PATH_MAX:
                return None
            f.seek(offset)
            name = f.read(size).split(b"\0", 1)[0]
            return name.decode() if name else None
    return None
