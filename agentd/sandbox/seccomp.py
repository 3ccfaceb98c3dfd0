"""Seccomp: the worker's last wall, a filter built once in the launcher and loaded per worker.

Deny-list or allow-list. An allow-list (Docker's default profile) refuses syscalls nobody has
reviewed, including ones a newer kernel adds; it also breaks tools that need a syscall its
authors did not foresee, and a worker runs arbitrary agent tools. agentd keeps the default
ALLOW and denies every syscall family Docker's default profile refuses to a container without
capabilities (plus io_uring, the time setters and name_to_handle_at). A deny-list goes stale when
the kernel grows: tests/test_seccomp.py compares the running kernel's syscall entry points with
the syscalls reviewed here and fails on an unreviewed one. Capabilities, namespaces, Landlock and
the unprivileged uid stay the primary walls; seccomp shrinks the kernel surface behind them.

libseccomp or hand-written BPF. libseccomp knows every architecture's syscall numbers, splits
64-bit argument comparisons into 32-bit BPF loads and rejects foreign ABIs (i386 via int 0x80,
x32 via nr | 0x40000000) with the bad-arch action, all of which hand-written BPF gets wrong
easily; that action kills the process, so 32-bit programs cannot run in a worker. But a
default-ALLOW libseccomp filter cannot say "this syscall only with these argument values" (one
comparison per argument per rule, rules OR'ed), so the two allow-value rules (personality,
socket families) are a short hand-written prelude in front of libseccomp's program. Loading
libseccomp costs tens of milliseconds, so `build_filter` runs once in the launcher; a worker
only hands the finished bytes to the kernel and never loads libseccomp.

Sockets. The worker's net namespace holds only loopback. socket() and socketpair() accept
AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK (glibc's getaddrinfo and `ip` use netlink); every other
family, AF_PACKET and AF_VSOCK included, answers EAFNOSUPPORT, the errno of a kernel that lacks
the family, so programs fall back quietly. SOCK_RAW on AF_INET/AF_INET6 answers EPERM, as the
kernel does without CAP_NET_RAW (which the worker never has): seccomp repeats that refusal for
the case where a user namespace hands the worker capabilities over its own net namespace. An
egress worker's filter leaves that rule to its network watch (agentd/sandbox/netwatch.py),
which refuses raw sockets itself and on record: the rule's EPERM would outrank the watch's
notification, and the slot's namespace gives no worker CAP_NET_RAW behind it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

from agentd.sandbox import libc

# Answered with EPERM, grouped by what they would hand the worker.
_DENY_GROUPS: dict[str, tuple[str, ...]] = {
    "mounts, roots and namespaces": (
        "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
        "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
        "sethostname", "setdomainname",
    ),
    "other processes' memory and files": (
        "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
        "kcmp",  # Docker refuses it without CAP_SYS_PTRACE; it only compares other processes' fds
    ),
    "kernel code, tracing and logs": (
        "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
        "delete_module", "create_module", "get_kernel_syms", "query_module", "syslog",
        "lookup_dcookie", "fanotify_init", "uselib", "_sysctl", "sysfs", "ustat",
    ),
    "host-wide state": (
        "acct", "swapon", "swapoff", "reboot", "quotactl", "quotactl_fd", "nfsservctl",
        "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex", "vhangup",
    ),
    "kernel keyrings (not namespaced)": ("keyctl", "add_key", "request_key"),
    "hardware and legacy x86 modes": ("iopl", "ioperm", "vm86", "vm86old"),
    "NUMA memory placement": (
        "mbind", "set_mempolicy", "get_mempolicy", "migrate_pages", "move_pages",
        "set_mempolicy_home_node",
    ),
    "bypasses and large attack surface": (
        "userfaultfd", "open_by_handle_at", "name_to_handle_at",
        "memfd_secret",  # memory the supervisor cannot read: it would blind the watch filter
        "io_uring_setup", "io_uring_enter", "io_uring_register",
    ),
    "unimplemented (as Docker)": (
        "afs_syscall", "getpmsg", "putpmsg", "tuxcall", "security", "vserver",
    ),
}

# Syscalls newer than libseccomp 2.5.4's tables, by number: syscalls added since Linux 5.1
# carry the same number on every architecture agentd supports.
_DENY_NEW = {467: "open_tree_attr"}
# Newer syscalls that were reviewed and stay allowed (the test that compares this module with
# the running kernel's syscall entry points reads these two tables).
_ALLOW_NEW = frozenset({
    "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules",
    "mseal", "setxattrat", "getxattrat", "listxattrat", "removexattrat", "file_getattr",
    "file_setattr",
    "uprobe", "uretprobe",  # x86_64 only; the kernel refuses calls from outside its trampolines
})

# clone() with any of these creates a namespace (linux/sched.h). CLONE_NEWTIME only exists for
# clone3 and unshare, which are refused whole.
_CLONE_NEW_FLAGS = (libc.CLONE_NEWNS, libc.CLONE_NEWCGROUP, libc.CLONE_NEWUTS, libc.CLONE_NEWIPC,
                    libc.CLONE_NEWUSER, libc.CLONE_NEWPID, libc.CLONE_NEWNET)
_TIOCSTI = 0x5412  # push a byte into a terminal's input: types commands into the caller's shell
_TIOCLINUX = 0x541C  # virtual console ioctls, incl. paste of the selection
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # Docker's: PER_LINUX(32), UNAME26, query
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK, _AF_PACKET = 1, 2, 10, 16, 17
_SOCKET_FAMILIES = (_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK)
_SOCK_RAW, _SOCK_TYPE_MASK = 3, 0xF

# Classic BPF (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARGS = 0, 4, 16  # struct seccomp_data
_BPF_MAXINSNS = 4096
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def build_filter(*, raw_sockets: bool = True) -> bytes:
    """Returns the worker's filter as raw BPF (`struct sock_filter[]`); call once, in the launcher.

    `raw_sockets=False` leaves raw sockets (SOCK_RAW, and the AF_PACKET family) out: for an
    egress worker, whose watch filter refuses them itself and on record (agentd/sandbox/
    netwatch.py); an errno here would outrank its notification.

    Raises OSError if libseccomp refuses a rule (a bug here, not a host condition).
    """
    import pyseccomp as scmp  # here, not at the top: only the launcher builds, workers never

    native = scmp.Arch.NATIVE
    filt = scmp.SyscallFilter(scmp.ALLOW)
    # i386 (int 0x80) and x32 (nr | 0x40000000) calls are not in the filter: kill the process,
    # not just the thread (libseccomp's default), so nothing half-dead keeps running.
    filt.set_attr(scmp.Attr.ACT_BADARCH, scmp.KILL_PROCESS)

    def number(name: str) -> int | None:
        nr = int(scmp.resolve_syscall(native, name))
        if nr == -1:  # __NR_SCMP_ERROR: a name libseccomp has never heard of, i.e. a typo here
            raise OSError(errno.EINVAL, f"seccomp: unknown syscall {name!r}")
        return nr if nr >= 0 else None  # other negatives: "not on this architecture"

    eperm = scmp.ERRNO(errno.EPERM)
    for names in _DENY_GROUPS.values():
        for name in names:
            if (nr := number(name)) is not None:
                filt.add_rule(eperm, nr)
    for nr in _DENY_NEW:
        filt.add_rule(eperm, nr)
    # No namespaces through clone(); clone3 passes its flags in memory seccomp cannot read, so it
    # answers ENOSYS and glibc falls back to clone(), as under Docker.
    for flag in _CLONE_NEW_FLAGS:
        filt.add_rule(eperm, "clone", scmp.Arg(0, scmp.MASKED_EQ, flag, flag))
    filt.add_rule(scmp.ERRNO(errno.ENOSYS), "clone3")
    # The kernel reads ioctl's cmd and socket's family as 32-bit ints: compare the low word
    # only, or a caller sets a high bit and walks past the rule.
    for cmd in (_TIOCSTI, _TIOCLINUX):
        filt.add_rule(eperm, "ioctl", scmp.Arg(1, scmp.MASKED_EQ, 0xFFFFFFFF, cmd))
    for family in (_AF_INET, _AF_INET6) if raw_sockets else ():
        filt.add_rule(eperm, "socket", scmp.Arg(0, scmp.MASKED_EQ, 0xFFFFFFFF, family),
                      scmp.Arg(1, scmp.MASKED_EQ, _SOCK_TYPE_MASK, _SOCK_RAW))

    prelude = _allow_values_prelude(
        int(scmp.system_arch()),
        [(int(scmp.resolve_syscall(native, "personality")), _PERSONALITIES, errno.EPERM),
         (int(scmp.resolve_syscall(native, "socket")),
          _SOCKET_FAMILIES if raw_sockets else (*_SOCKET_FAMILIES, _AF_PACKET),
          errno.EAFNOSUPPORT),
         (int(scmp.resolve_syscall(native, "socketpair")), _SOCKET_FAMILIES, errno.EAFNOSUPPORT)])
    fd = os.memfd_create("agentd-seccomp", os.MFD_CLOEXEC)
    try:
        filt.export_bpf(_Fd(fd))
        size = os.lseek(fd, 0, os.SEEK_END)
        body = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    program = prelude + body
    if len(program) // 8 > _BPF_MAXINSNS:  # pragma: no cover - guards future growth of the lists
        raise OSError(errno.E2BIG, f"seccomp filter has {len(program) // 8} instructions")
    return program


class _Fd:
    """What pyseccomp's export_bpf wants: an object with fileno()."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _allow_values_prelude(arch: int, rules: list[tuple[int, tuple[int, ...], int]]) -> bytes:
    """BPF that answers errno for syscall `nr` unless the low 32 bits of its first argument are
    one of `values`; every other call falls through to the program that follows (libseccomp's,
    which starts over with its own arch check)."""
    low_word = _OFF_ARGS + (0 if sys.byteorder == "little" else 4)
    blocks: list[list[tuple[int, int, int | str, int | str]]] = []
    for nr, values, err in rules:
        block: list[tuple[int, int, int | str, int | str]] = [
            (_LD_W_ABS, _OFF_NR, 0, 0),
            (_JEQ_K, nr, 0, "next"),
            (_LD_W_ABS, low_word, 0, 0),
        ]
        block += [(_JEQ_K, value, "end", 0) for value in values]
        block.append((_RET_K, _RET_ERRNO | err, 0, 0))
        blocks.append(block)
    head: list[tuple[int, int, int | str, int | str]] = [
        (_LD_W_ABS, _OFF_ARCH, 0, 0),
        (_JEQ_K, arch, 0, "end"),
    ]
    flat = [head, *blocks]
    total = sum(len(b) for b in flat)
    out = bytearray()
    index = 0
    for block in flat:
        block_end = index + len(block)
        for code, k, jt, jf in block:
            targets = {"end": total, "next": block_end}
            jt_off = targets[jt] - index - 1 if isinstance(jt, str) else jt
            jf_off = targets[jf] - index - 1 if isinstance(jf, str) else jf
            out += _insn(code, k, jt_off, jf_off)
            index += 1
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def enter(program: bytes) -> None:
    """Loads `program` (from `build_filter`) on the calling thread; the last step before execve.

    no_new_privs must already be set (`privileges.drop`). Raises OSError with the errno.
    """
    count, rest = divmod(len(program), 8)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise OSError(errno.EINVAL, f"seccomp: {len(program)} bytes is not a BPF program")
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(count, ctypes.addressof(buf))
    try:
        libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    except OSError as exc:
        raise OSError(exc.errno, f"seccomp: {exc.strerror}") from None
