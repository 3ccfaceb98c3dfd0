"""The seccomp wall, tried for real: tiny Python programs load the filter, then attempt the
forbidden thing and report what the kernel answered.

Most denials come with a control run of the same program without the filter (as root), which
shows that the refusal comes from the filter and not from missing privileges.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pyseccomp
import pytest

from agentd.sandbox import seccomp

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: control runs use privileges"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall ABIs checked are x86_64's"),
]

REPO = Path(__file__).resolve().parents[1]
MARKER = 4000  # errno of the test-only filter below ours: "our filter let this through"

HEADER = '''
import ctypes, errno, json, os, sys
from agentd.sandbox import libc, seccomp
D = json.loads(sys.stdin.read())
NR = D["nr"]
_c = ctypes.CDLL(None, use_errno=True)
_c.syscall.restype = ctypes.c_long

def sc(nr, *args):
    """A raw syscall with 64-bit arguments: its result, or -errno."""
    r = _c.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return -ctypes.get_errno() if r == -1 else r

def call(fn, *args):
    """A Python-level call: 0, or -errno of the OSError it raised."""
    try:
        fn(*args)
        return 0
    except OSError as exc:
        return -exc.errno

def addr(obj):
    return ctypes.addressof(obj)

def wall():
    """Loads the programs given by the test (none for a control run)."""
    if D["programs"]:
        libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        for program in D["programs"]:
            seccomp.enter(bytes.fromhex(program))

def report(**values):
    sys.stdout.write(json.dumps(values))
    sys.stdout.flush()
'''

NAMES = [
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "clone", "clone3", "ptrace",
    "process_vm_readv", "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
    "io_uring_setup", "userfaultfd", "name_to_handle_at", "open_by_handle_at", "personality",
    "ioctl", "socket", "socketpair", "getpid", "memfd_secret",
]
NR = {name: int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)) for name in NAMES}


def spawn(code: str, programs: list[bytes], **data: object) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh Python; `wall()` there loads `programs`, D holds `data`."""
    return subprocess.run(
        [sys.executable, "-c", HEADER + textwrap.dedent(code)],
        input=json.dumps({"nr": NR, "programs": [p.hex() for p in programs], **data}),
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False)


def run(code: str, programs: list[bytes], **data: object) -> dict[str, int]:
    proc = spawn(code, programs, **data)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, int] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="session")
def program() -> bytes:
    return seccomp.build_filter()


class TestBuildFilter:
    def test_is_a_whole_bpf_program(self, program: bytes) -> None:
        """The filter is a whole array of 8-byte sock_filter instructions within BPF_MAXINSNS."""
        assert len(program) % 8 == 0
        assert 0 < len(program) // 8 <= 4096

    def test_is_deterministic(self, program: bytes) -> None:
        """Building twice yields the same bytes, so a launcher restart loads the same filter."""
        assert seccomp.build_filter() == program

    def test_build_is_cheap(self) -> None:
        """Once libseccomp is loaded, building the filter takes well under the 100 ms budget."""
        seccomp.build_filter()
        start = time.perf_counter()
        seccomp.build_filter()
        assert time.perf_counter() - start < 0.1

    def test_worker_never_loads_libseccomp(self, program: bytes) -> None:
        """Entering the filter neither imports pyseccomp nor maps libseccomp into the worker."""
        result = run('''
            wall()
            maps = open("/proc/self/maps").read()
            report(module="pyseccomp" in sys.modules, mapped="libseccomp" in maps)
        ''', [program])
        assert result == {"module": False, "mapped": False}


class TestEnter:
    def test_needs_no_new_privs(self, program: bytes) -> None:
        """Without no_new_privs, an unprivileged process cannot load the filter (EACCES)."""
        result = run('''
            os.setresuid(65534, 65534, 65534)
            report(r=call(seccomp.enter, bytes.fromhex(D["programs"][0])))
        ''', [program])
        assert result == {"r": -errno.EACCES}

    @pytest.mark.parametrize("blob", [b"", b"\0" * 9, b"\0" * 8 * 4097])
    def test_rejects_bytes_that_are_not_a_program(self, blob: bytes) -> None:
        """Bytes that cannot be a BPF program are refused with EINVAL before reaching the kernel."""
        with pytest.raises(OSError) as info:
            seccomp.enter(blob)
        assert info.value.errno == errno.EINVAL

    def test_is_fast(self, program: bytes) -> None:
        """Loading the finished program in a worker costs well under a millisecond or so."""
        result = run('''
            import time
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
            program = bytes.fromhex(D["programs"][0])
            start = time.perf_counter_ns()
            seccomp.enter(program)
            report(ns=time.perf_counter_ns() - start)
        ''', [program])
        assert result["ns"] < 5_000_000


@dataclass(frozen=True)
class Case:
    """A forbidden call: what to set up first, the call itself, its errno under the filter, and
    what the control run (no filter, as root) shows."""

    id: str
    code: str
    denied: int
    control: str | None  # "succeeds", "differs" (fails otherwise), None: no control run


def case(id: str, *parts: str, denied: int, control: str | None = "succeeds") -> Case:
    return Case(id, "".join(textwrap.dedent(part) for part in parts), denied, control)


SETUP_MNT_NS = '''
    import tempfile
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    target = tempfile.mkdtemp()
'''
FILE_HANDLE = '''
    class Handle(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint32), ("type", ctypes.c_int32),
                    ("data", ctypes.c_char * 128)]
    handle, mount_id = Handle(128, 0), ctypes.c_int(0)
'''
BPF_MAP_CREATE = '''
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)   # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    r = sc(NR["bpf"], 0, addr(attr), 128)       # BPF_MAP_CREATE
'''
PERF_SW_CLOCK = '''
    attr = (ctypes.c_uint32 * 32)(1, 128)       # PERF_TYPE_SOFTWARE, size; config 0: CPU clock
    r = sc(NR["perf_event_open"], addr(attr), 0, -1, -1, 0)
'''

CASES = [
    case("mount", SETUP_MNT_NS, '''
        wall()
        r = call(libc.mount, "none", target, "tmpfs", 0)
    ''', denied=errno.EPERM),
    case("umount2", SETUP_MNT_NS, '''
        libc.mount("none", target, "tmpfs", 0)
        wall()
        r = call(libc.umount2, target, 0)
    ''', denied=errno.EPERM),
    case("pivot_root", SETUP_MNT_NS, '''
        wall()
        r = call(libc.pivot_root, target, target)
    ''', denied=errno.EPERM, control="differs"),
    case("chroot", '''
        wall()
        r = call(os.chroot, "/")
    ''', denied=errno.EPERM),
    case("unshare-user", '''
        wall()
        r = call(libc.unshare, libc.CLONE_NEWUSER)
    ''', denied=errno.EPERM),
    case("unshare-files", '''
        wall()
        r = call(libc.unshare, 0x400)  # CLONE_FILES: harmless, but unshare is refused whole
    ''', denied=errno.EPERM),
    case("setns", '''
        fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
        wall()
        r = call(libc.setns, fd, libc.CLONE_NEWUTS)
    ''', denied=errno.EPERM),
    case("ptrace-seize", '''
        import signal, time
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        wall()
        r = sc(NR["ptrace"], 0x4206, pid, 0, 0)  # PTRACE_SEIZE
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    ''', denied=errno.EPERM),
    case("process_vm_readv", '''
        src, dst = ctypes.create_string_buffer(b"secret"), ctypes.create_string_buffer(6)
        class Iov(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        local, remote = Iov(addr(dst), 6), Iov(addr(src), 6)
        wall()
        r = sc(NR["process_vm_readv"], os.getpid(), addr(local), 1, addr(remote), 1, 0)
    ''', denied=errno.EPERM),
    case("bpf", '''
        wall()
    ''', BPF_MAP_CREATE, denied=errno.EPERM),
    case("keyctl", '''
        wall()
        r = sc(NR["keyctl"], 0, -2, 1)  # GET_KEYRING_ID of the process keyring
    ''', denied=errno.EPERM),
    case("add_key", '''
        wall()
        kind, name = ctypes.create_string_buffer(b"user"), ctypes.create_string_buffer(b"agentd")
        payload = ctypes.create_string_buffer(b"x")
        r = sc(NR["add_key"], addr(kind), addr(name), addr(payload), 1, -2)  # process keyring
    ''', denied=errno.EPERM),
    case("request_key", '''
        wall()
        r = sc(NR["request_key"], ctypes.cast(ctypes.c_char_p(b"user"), ctypes.c_void_p).value,
               ctypes.cast(ctypes.c_char_p(b"agentd-missing"), ctypes.c_void_p).value, 0, 0)
    ''', denied=errno.EPERM, control="differs"),
    case("perf_event_open", '''
        wall()
    ''', PERF_SW_CLOCK, denied=errno.EPERM),
    case("io_uring_setup", '''
        params = (ctypes.c_uint8 * 120)()
        wall()
        r = sc(NR["io_uring_setup"], 1, addr(params))
    ''', denied=errno.EPERM),
    case("userfaultfd", '''
        wall()
        r = sc(NR["userfaultfd"], os.O_CLOEXEC)
    ''', denied=errno.EPERM),
    case("name_to_handle_at", FILE_HANDLE, '''
        wall()
        r = sc(NR["name_to_handle_at"], -100,
               ctypes.cast(ctypes.c_char_p(b"/etc/passwd"), ctypes.c_void_p).value,
               addr(handle), addr(mount_id), 0)
    ''', denied=errno.EPERM),
    case("open_by_handle_at", FILE_HANDLE, '''
        assert sc(NR["name_to_handle_at"], -100,
                  ctypes.cast(ctypes.c_char_p(b"/etc/passwd"), ctypes.c_void_p).value,
                  addr(handle), addr(mount_id), 0) == 0
        root = os.open("/", os.O_RDONLY)
        wall()
        r = sc(NR["open_by_handle_at"], root, addr(handle), os.O_RDONLY)
    ''', denied=errno.EPERM),
    case("memfd_secret", '''
        wall()
        r = sc(NR["memfd_secret"], 0)  # memory /proc/<pid>/mem cannot read: blinds a supervisor
    ''', denied=errno.EPERM),
    case("personality-no-aslr", '''
        wall()
        r = sc(NR["personality"], 0x0040000)  # ADDR_NO_RANDOMIZE
    ''', denied=errno.EPERM),
    case("personality-read-implies-exec", '''
        wall()
        r = sc(NR["personality"], 0x0400000)  # READ_IMPLIES_EXEC
    ''', denied=errno.EPERM),
    case("personality-high-bits", '''
        wall()
        r = sc(NR["personality"], (1 << 32) | 0x0040000)  # the kernel reads only the low 32 bits
    ''', denied=errno.EPERM),
    case("ioctl-TIOCSTI", '''
        master, slave = os.openpty()
        byte = ctypes.c_char(b"x")
        wall()
        r = sc(NR["ioctl"], slave, 0x5412, addr(byte))
    ''', denied=errno.EPERM),
    case("ioctl-TIOCSTI-high-bits", '''
        master, slave = os.openpty()
        byte = ctypes.c_char(b"x")
        wall()
        r = sc(NR["ioctl"], slave, (1 << 32) | 0x5412, addr(byte))  # cmd is a 32-bit int
    ''', denied=errno.EPERM),
    case("ioctl-TIOCLINUX", '''
        master, slave = os.openpty()
        sub = ctypes.c_char(b"\\x02")  # TIOCL_SETSEL
        wall()
        r = sc(NR["ioctl"], slave, 0x541C, addr(sub))
    ''', denied=errno.EPERM, control="differs"),
    case("socket-AF_PACKET", '''
        wall()
        r = sc(NR["socket"], 17, 3, 0)
    ''', denied=errno.EAFNOSUPPORT),
    case("socket-AF_PACKET-high-bits", '''
        wall()
        r = sc(NR["socket"], (1 << 32) | 17, 3, 0)  # family is a 32-bit int
    ''', denied=errno.EAFNOSUPPORT),
    case("socket-AF_VSOCK", '''
        wall()
        r = sc(NR["socket"], 40, 1, 0)
    ''', denied=errno.EAFNOSUPPORT, control=None),
    case("socketpair-AF_PACKET", '''
        fds = (ctypes.c_int * 2)()
        wall()
        r = sc(NR["socketpair"], 17, 3, 0, addr(fds))
    ''', denied=errno.EAFNOSUPPORT, control="differs"),
    case("socket-AF_INET-SOCK_RAW", '''
        wall()
        r = sc(NR["socket"], 2, 3 | os.O_CLOEXEC, 1)  # SOCK_RAW | SOCK_CLOEXEC, ICMP
    ''', denied=errno.EPERM),
    case("socket-AF_INET6-SOCK_RAW", '''
        wall()
        r = sc(NR["socket"], 10, 3, 58)  # ICMPv6
    ''', denied=errno.EPERM),
    case("clone3", '''
        args = (ctypes.c_uint64 * 11)()
        args[4] = 17  # exit_signal SIGCHLD
        wall()
        r = sc(NR["clone3"], addr(args), 88)
        if r == 0:
            os._exit(0)
    ''', denied=errno.ENOSYS),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
class TestDenied:
    def test_filter_refuses(self, case: Case, program: bytes) -> None:
        """Under the filter the call answers the designed errno."""
        result = run(case.code + "\nreport(r=r)\n", [program])
        assert result == {"r": -case.denied}

    def test_control_without_filter(self, case: Case) -> None:
        """Without the filter the same call succeeds as root, or at least fails differently."""
        if case.control is None:
            pytest.skip("no meaningful control: the kernel may lack the feature")
        result = run(case.code + "\nreport(r=r)\n", [])
        if case.control == "succeeds":
            assert result["r"] >= 0
        else:
            assert result["r"] != -case.denied


CLONE_FLAGS = {"NEWNS": 0x00020000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000,
               "NEWIPC": 0x08000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000,
               "NEWNET": 0x40000000, "NEWUSER|high-bit": (1 << 32) | 0x10000000}
CLONE_EACH = '''
    results = {}
    wall()
    for name, flag in D["flags"].items():
        r = sc(NR["clone"], flag | 17, 0, 0, 0, 0)  # | SIGCHLD; no stack: fork-like
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        results[name] = min(r, 0)
    report(**results)
'''


class TestClone:
    def test_namespace_flags_refused(self, program: bytes) -> None:
        """clone() with any CLONE_NEW* flag answers EPERM, even with high bits set beside it."""
        result = run(CLONE_EACH, [program], flags=CLONE_FLAGS)
        assert result == dict.fromkeys(CLONE_FLAGS, -errno.EPERM)

    def test_namespace_flags_work_without_filter(self) -> None:
        """Without the filter root creates each namespace, so the refusal is the filter's."""
        assert run(CLONE_EACH, [], flags=CLONE_FLAGS) == dict.fromkeys(CLONE_FLAGS, 0)

    def test_plain_clone_forks(self, program: bytes) -> None:
        """A raw clone(SIGCHLD) still forks a child that runs and exits normally."""
        result = run('''
            wall()
            pid = sc(NR["clone"], 17, 0, 0, 0, 0)
            if pid == 0:
                os._exit(7)
            _, status = os.waitpid(pid, 0)
            report(code=os.waitstatus_to_exitcode(status))
        ''', [program])
        assert result == {"code": 7}


class TestAllowed:
    def test_fork_and_wait(self, program: bytes) -> None:
        """os.fork works and the parent reaps the child's exit code."""
        result = run('''
            wall()
            pid = os.fork()
            if pid == 0:
                os._exit(5)
            report(code=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        ''', [program])
        assert result == {"code": 5}

    def test_exec(self, program: bytes) -> None:
        """execve of /bin/true works, directly in a forked child and through subprocess."""
        result = run('''
            import subprocess
            wall()
            pid = os.fork()
            if pid == 0:
                os.execve("/bin/true", ["true"], {})
            direct = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            report(direct=direct, subprocess=subprocess.run(["/bin/true"]).returncode)
        ''', [program])
        assert result == {"direct": 0, "subprocess": 0}

    def test_threads(self, program: bytes) -> None:
        """Threads start (glibc falls back from clone3's ENOSYS to clone) and run."""
        result = run('''
            import threading
            wall()
            seen = []
            threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report(n=len(seen))
        ''', [program])
        assert result == {"n": 4}

    def test_read_files(self, program: bytes) -> None:
        """Reading files and listing directories works."""
        result = run('''
            wall()
            report(n=len(open("/etc/os-release").read()) > 0, ls=len(os.listdir("/etc")) > 0)
        ''', [program])
        assert result == {"n": True, "ls": True}

    def test_loopback_tcp(self, program: bytes) -> None:
        """A TCP server and client talk over loopback."""
        result = run('''
            import socket
            wall()
            server = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            client.sendall(b"ping")
            report(echo=conn.recv(4) == b"ping")
        ''', [program])
        assert result == {"echo": True}

    def test_allowed_socket_families(self, program: bytes) -> None:
        """AF_UNIX pairs, AF_INET6 UDP, netlink route sockets and ICMP ping sockets still open."""
        result = run('''
            import socket
            wall()
            socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
            socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG)
            report(ok=1)
        ''', [program])
        assert result == {"ok": 1}

    def test_safe_personalities(self, program: bytes) -> None:
        """The personalities Docker allows (query, PER_LINUX, PER_LINUX32, UNAME26) still work."""
        result = run('''
            wall()
            values = [0xFFFFFFFF, 0x0008, 0x20000, 0x20008, 0x0000]
            report(r=min(sc(NR["personality"], v) for v in values))
        ''', [program])
        assert result["r"] >= 0

    def test_other_tty_ioctls(self, program: bytes) -> None:
        """ioctls other than TIOCSTI/TIOCLINUX, such as TIOCGWINSZ, work on a terminal."""
        result = run('''
            master, slave = os.openpty()
            wall()
            size = (ctypes.c_ushort * 4)()
            report(r=sc(NR["ioctl"], slave, 0x5413, addr(size)))
        ''', [program])
        assert result == {"r": 0}


INT80 = '''
    import mmap
    # mov eax, NR; int 0x80; ret -- an i386 syscall from a 64-bit process
    code = b"\\xb8" + (20).to_bytes(4, "little") + b"\\xcd\\x80\\xc3"  # i386 getpid
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(addr(ctypes.c_char.from_buffer(page)))
    wall()
    report(r=fn(), pid=os.getpid())
'''
X32 = '''
    wall()
    report(r=sc(0x40000000 | NR["getpid"]), pid=os.getpid())
'''


class TestForeignAbis:
    def test_int80_kills(self, program: bytes) -> None:
        """An i386 syscall through int 0x80 kills the whole process with SIGSYS."""
        proc = spawn(INT80, [program])
        assert proc.returncode == -signal.SIGSYS, proc.stderr

    def test_int80_works_without_filter(self) -> None:
        """Without the filter the same int 0x80 call runs (this kernel has IA32 emulation)."""
        proc = spawn(INT80, [])
        if proc.returncode == -signal.SIGSEGV:
            pytest.skip("kernel without IA32 emulation: nothing to bypass")
        result = json.loads(proc.stdout)
        assert result["r"] == result["pid"]

    def test_x32_kills(self, program: bytes) -> None:
        """An x32 syscall (nr | 0x40000000) kills the whole process with SIGSYS."""
        proc = spawn(X32, [program])
        assert proc.returncode == -signal.SIGSYS, proc.stderr

    def test_x32_without_filter_is_not_killed(self) -> None:
        """Without the filter the x32 call returns normally (ENOSYS without CONFIG_X86_X32_ABI)."""
        result = run(X32, [])
        assert result["r"] in (result["pid"], -errno.ENOSYS)


# Refused by Docker's default profile to a container without capabilities (moby
# profiles/seccomp/default.json as of 2024, x86_64 names), plus what agentd refuses beyond it.
DOCKER_REFUSES = [
    "_sysctl", "acct", "add_key", "afs_syscall", "bpf", "chroot", "clock_settime",
    "create_module", "delete_module", "fanotify_init", "finit_module", "fsconfig", "fsmount",
    "fsopen", "fspick", "get_kernel_syms", "get_mempolicy", "getpmsg", "init_module", "ioperm",
    "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind",
    "migrate_pages", "mount", "mount_setattr", "move_mount", "move_pages", "nfsservctl",
    "open_by_handle_at", "open_tree", "perf_event_open", "pidfd_getfd", "pivot_root",
    "process_madvise", "putpmsg", "query_module", "quotactl", "quotactl_fd", "reboot",
    "request_key", "security", "set_mempolicy", "set_mempolicy_home_node", "setdomainname",
    "sethostname", "setns", "settimeofday", "swapoff", "swapon", "syslog", "sysfs", "tuxcall",
    "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vhangup", "vserver",
]
AGENTD_ALSO_REFUSES = [
    "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "name_to_handle_at", "clock_adjtime", "adjtimex",
]


def marker_filter(names: list[str]) -> bytes:
    """A test-only filter that answers MARKER for `names`; loaded below agentd's, it shows
    which of them agentd's filter lets through, without ever running one."""
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in names:
        filt.add_rule(pyseccomp.ERRNO(MARKER), name)
    with open(os.memfd_create("marker"), "w+b") as f:
        filt.export_bpf(f)
        return os.pread(f.fileno(), 1 << 16, 0)


class TestDenyList:
    def test_at_least_as_strict_as_docker(self, program: bytes) -> None:
        """Every syscall Docker refuses an unprivileged container, and agentd's extras, is EPERM."""
        names = DOCKER_REFUSES + AGENTD_ALSO_REFUSES
        numbers = {n: int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n)) for n in names}
        result = run('''
            wall()
            report(**{name: sc(nr, 0, 0, 0, 0, 0, 0) for name, nr in D["numbers"].items()})
        ''', [marker_filter(names), program], numbers=numbers)
        assert {n: r for n, r in result.items() if r != -errno.EPERM} == {}

    def test_every_kernel_syscall_was_reviewed(self) -> None:
        """Each syscall entry point of the running kernel is known to libseccomp or reviewed in
        seccomp.py, so a kernel upgrade cannot slip an unreviewed syscall past the deny-list."""
        try:
            symbols = Path("/proc/kallsyms").read_text()
        except OSError:
            pytest.skip("no /proc/kallsyms")
        entries = set(re.findall(r" __x64_sys_(\w+)$", symbols, re.MULTILINE))
        # Compat and internal entry points of other ABIs that share the symbol prefix.
        internal = re.compile(r"^(ia32_|old_?|new|s390_)|(16|32)$"
                              r"|^(ni_syscall|mmap_pgoff|llseek|gethostname)$")
        reviewed = set(seccomp._DENY_NEW.values()) | seccomp._ALLOW_NEW
        unknown = {name for name in entries
                   if not internal.search(name) and name not in reviewed
                   and pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == -1}
        assert unknown == set()
