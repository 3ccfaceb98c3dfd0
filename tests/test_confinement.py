"""Escape attempts against the real sandbox: each test runs one attack inside a worker, through the
real daemon's gRPC API, and asserts that it failed, and how (the errno, the signal or the outcome).

Nothing of the kernel is mocked. Most attempts are small Python programs run by the worker's
/usr/bin/python3 (`in_worker`): a prelude gives them raw syscalls by number (resolved on the host
by libseccomp, so the file runs on x86_64 and aarch64) and `attempt()`, which turns an OSError into
its errno name; each program fills the dict `out`, printed as JSON on stdout. Where the host must
judge (a process that should be gone, a file the daemon must not have followed), the test looks
at the host directly.

The `integration` agent (tests/policy_cases/integration.yaml) is the target: exec under /bin,
/usr/bin, /usr/sbin, /sbin, /usr/local/bin, /usr/lib; memory 128 MiB, pids 32, tmp 16 MiB,
open_files 128, output 1 MiB; `integration-userns` is the same with a user namespace.

Several walls often refuse the same attempt (seccomp, the missing capability, Landlock, the
read-only mount); where the first wall to answer differs between kernels the assertion accepts
each specific errno a wall gives, never "any failure".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pyseccomp
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from tests.conftest import DaemonHandle, Result, execute, sh

pytestmark = pytest.mark.privileged

Stub = agentd_pb2_grpc.AgentdStub

PYTHON = "/usr/bin/python3"
MiB = 1 << 20
MEMORY_LIMIT = 128 * MiB
TMP_LIMIT = 16 * MiB
OPEN_FILES = 128
OUTPUT_LIMIT = 1 * MiB
WORKER_UID = 65534

# Every syscall an attempt calls by number, resolved for the running architecture.
_SYSCALL_NAMES = (
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "clone", "clone3",
    "sethostname", "ptrace", "process_vm_readv", "pidfd_open", "pidfd_getfd", "init_module",
    "finit_module", "delete_module", "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
    "userfaultfd", "io_uring_setup", "open_by_handle_at", "name_to_handle_at", "personality",
    "fsopen", "open_tree", "kexec_load", "reboot", "syslog", "swapon", "iopl", "clock_settime",
    "ioctl", "capset", "mknodat", "memfd_create", "socket",
)
SYSCALLS = {name: nr for name in _SYSCALL_NAMES
            if (nr := int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))) >= 0}

PRELUDE = r'''
import ctypes, errno, json, os, struct, sys
NR = json.loads(sys.argv[1])
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
out = {}

def ename(e):
    return errno.errorcode.get(e, str(e))

def syscall(call, *args):
    """A raw syscall, every argument a full register: "ok" or the errno's name."""
    r = _libc.syscall(ctypes.c_long(NR[call]), *(ctypes.c_long(a) for a in args))
    return "ok" if r != -1 else ename(ctypes.get_errno())

def libc(fn, *args):
    """A libc wrapper (ints passed as full registers, bytes as char *): "ok" or the errno."""
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return "ok" if getattr(_libc, fn)(*args) != -1 else ename(ctypes.get_errno())

def attempt(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return ename(exc.errno)
    return "ok"

def buf(data):
    """A C buffer holding `data`, kept alive for the whole program; returns its address."""
    b = ctypes.create_string_buffer(data, len(data) + 1)
    _keep.append(b)
    return ctypes.addressof(b)
_keep = []
'''


def in_worker(stub: Stub, run_id: str, body: str, *, timeout: float = 20.0,
              **kwargs: Any) -> dict[str, Any]:
    """Runs `body` (after PRELUDE) with the worker's python3 and returns its `out` dict."""
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    result = execute(stub, run_id, [PYTHON, "-c", code, json.dumps(SYSCALLS)], timeout=timeout,
                     **kwargs)
    assert result.outcome is not None
    failure = (result.outcome.summary, result.stderr.decode(errors="replace")[-2000:])
    assert result.outcome.exited, failure
    assert result.outcome.exit_code == 0, failure
    return json.loads(result.text.strip().splitlines()[-1])


def run_python(stub: Stub, run_id: str, code: str, **kwargs: Any) -> Result:
    """Runs a bare python3 program in the worker and returns what it streamed."""
    return execute(stub, run_id, [PYTHON, "-c", textwrap.dedent(code)], **kwargs)


def in_background(fn: Callable[..., Result], *args: Any, **kwargs: Any
                  ) -> tuple[threading.Thread, list[Result]]:
    """Starts fn(*args, **kwargs) in a thread; its result lands in the returned list."""
    results: list[Result] = []
    thread = threading.Thread(target=lambda: results.append(fn(*args, **kwargs)))
    thread.start()
    return thread, results


def host_pgrep(pattern: str) -> list[str]:
    """Processes on the host whose command line matches `pattern`."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return found.stdout.splitlines()


def children_of(pid: int) -> list[int]:
    """Host pids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def workspace_of(stub: Stub, run_id: str) -> Path:
    return Path(stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace)


def digest(path: str) -> tuple[str, int]:
    data = Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest(), os.stat(path).st_mtime_ns


def _killed_from_outside(outcome: pb.Outcome) -> bool:
    """SIGKILL with no stop reason: not this daemon's doing. Another agentd started on this host
    (a concurrent test session) removes every task cgroup under the shared parent at start-up;
    a test that must see its own timeout retries then."""
    return not outcome.exited and outcome.signal == signal.SIGKILL and \
        outcome.stop_reason == pb.STOP_REASON_NONE


@pytest.fixture
def userns_run(stub: Stub) -> Iterator[str]:
    """A fresh run of the `integration-userns` agent (production stage, user namespace)."""
    run = stub.CreateRun(pb.CreateRunRequest(agent="integration-userns"))
    yield run.run_id
    with contextlib.suppress(grpc.RpcError):
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))


# --- processes ---------------------------------------------------------------------------------


class TestProcessIsolation:
    """The worker sees and reaches only its own processes."""

    def test_proc_lists_only_the_workers_own_pids(self, stub: Stub, run_id: str) -> None:
        """/proc of a single-process tool lists exactly pid 1, the tool itself."""
        out = in_worker(stub, run_id, """
            out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            out["self"] = os.getpid()
            out["ppid"] = os.getppid()
        """)
        assert out == {"pids": [1], "self": 1, "ppid": 0}

    def test_ps_shows_only_the_workers_processes(self, stub: Stub, run_id: str) -> None:
        """`ps` (or a /proc walk where ps is absent) shows the shell and its child only."""
        if os.path.exists("/bin/ps"):
            result = sh(stub, run_id, "ps -e -o pid= | sort -n")
            assert result.text.split() == ["1", "2", "3"], result.text  # sh, ps, sort
        else:
            result = sh(stub, run_id, "ls /proc | grep -E '^[0-9]+$' | sort -n")
            assert result.text.split() == ["1", "2", "3", "4"], result.text

    def test_the_daemon_and_launcher_pids_are_invisible(self, stub: Stub, run_id: str,
                                                        daemon: DaemonHandle) -> None:
        """/proc/<daemon pid> and /proc/<launcher pid> do not exist inside the worker."""
        pids = [daemon.process.pid, *children_of(daemon.process.pid)]
        assert len(pids) >= 2, "the launcher should be a child of the daemon"
        out = in_worker(stub, run_id, f"""
            for pid in {pids!r}:
                out[str(pid)] = [attempt(os.stat, f"/proc/{{pid}}"),
                                 attempt(os.kill, pid, 0)]
        """)
        assert out == {str(pid): ["ENOENT", "ESRCH"] for pid in pids}

    def test_namespaces_differ_from_the_hosts(self, stub: Stub, run_id: str) -> None:
        """pid, mount, net, ipc, uts and cgroup namespaces are all new (inode numbers differ)."""
        kinds = ["pid", "mnt", "net", "ipc", "uts", "cgroup"]
        out = in_worker(stub, run_id, f"""
            for kind in {kinds!r}:
                out[kind] = os.readlink(f"/proc/self/ns/{{kind}}")
        """)
        host = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in kinds}
        assert all(out[kind] != host[kind] for kind in kinds), (out, host)

    def test_kill_minus_one_reaches_only_the_workers_processes(self, stub: Stub,
                                                               run_id: str) -> None:
        """kill(-1, SIGKILL) kills the worker's own child but no host process survives unseen:
        a host `sleep` stays alive and kill(<its pid>) is ESRCH."""
        victim = subprocess.Popen(["sleep", "60"])
        try:
            out = in_worker(stub, run_id, f"""
                import signal, time
                child = os.fork()
                if child == 0:
                    time.sleep(30)
                    os._exit(0)
                out["probe"] = attempt(os.kill, {victim.pid}, 0)
                out["kill_all"] = attempt(os.kill, -1, signal.SIGKILL)
                out["child"] = os.waitpid(child, 0)[1]
                out["kill_host"] = attempt(os.kill, {victim.pid}, signal.SIGKILL)
            """)
            assert out == {"probe": "ESRCH", "kill_all": "ok", "child": signal.SIGKILL,
                           "kill_host": "ESRCH"}
            time.sleep(0.1)
            assert victim.poll() is None, "a host process died of the worker's kill(-1)"
        finally:
            victim.kill()
            victim.wait()

    def test_no_daemon_or_launcher_fd_is_inherited(self, stub: Stub, run_id: str) -> None:
        """The tool starts with exactly fds 0, 1 and 2 (pipes), 3 (the write end of its step's
        writes pipe) and 4 (its sealed channel snapshot, which it cannot change): nothing of the
        daemon or the launcher."""
        out = in_worker(stub, run_id, """
            import fcntl
            fds = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    fds[fd] = os.readlink("/proc/self/fd/" + fd)
                except OSError:  # the listing's own directory fd, closed by now
                    pass
            out["fds"] = fds
            out["env"] = [os.environ.get("AGENTD_WRITES_FD"), os.environ.get("AGENTD_CHANNELS_FD")]
            out["access"] = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in range(5)]
            out["seals"] = fcntl.fcntl(4, fcntl.F_GET_SEALS)
            out["snapshot"] = json.loads(os.pread(4, 65536, 0))
            out["overwrite"] = attempt(os.pwrite, 4, b"{}", 0)
            out["truncate"] = attempt(os.ftruncate, 4, 0)
            out["grow"] = attempt(os.ftruncate, 4, 1 << 20)
            out["unseal"] = attempt(fcntl.fcntl, 4, fcntl.F_ADD_SEALS, 0)
        """)
        fds = {int(fd): target for fd, target in out.pop("fds").items()}
        assert sorted(fds) == [0, 1, 2, 3, 4], fds
        assert all(fds[fd].startswith("pipe:") for fd in (0, 1, 2, 3)), fds
        assert len({fds[fd] for fd in (0, 1, 2, 3)}) == 4, fds  # four different pipes
        assert fds[4] == "/memfd:agentd-channels (deleted)", fds
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        assert out.pop("seals") & seals == seals
        assert out == {"env": ["3", "4"],
                       "access": [os.O_RDONLY, os.O_WRONLY, os.O_WRONLY, os.O_WRONLY, os.O_RDWR],
                       "snapshot": {}, "overwrite": "EPERM", "truncate": "EPERM",
                       "grow": "EPERM", "unseal": "EPERM"}

    def test_a_concurrent_worker_is_invisible(self, stub: Stub, run_id: str) -> None:
        """While another run's worker runs, this worker cannot see or signal it."""
        marker = "agentd-neighbour-" + secrets.token_hex(6)
        other = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        thread, results = in_background(
            run_python, stub, other,
            f"import os\nos.execv('/bin/sleep', [{marker[::-1]!r}[::-1], '20'])")
        try:
            deadline = time.monotonic() + 10
            while not (found := host_pgrep(marker)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert found, "the neighbour never started"
            host_pid = int(found[0].split()[0])
            out = in_worker(stub, run_id, f"""
                seen = []
                for p in os.listdir("/proc"):
                    if p.isdigit():
                        with open(f"/proc/{{p}}/cmdline", "rb") as f:
                            seen.append(f.read().decode(errors="replace"))
                out["neighbour_seen"] = any({marker[::-1]!r}[::-1] in c for c in seen)
                out["signal"] = attempt(os.kill, {host_pid}, 9)
            """)
            assert out == {"neighbour_seen": False, "signal": "ESRCH"}
            assert host_pgrep(marker), "the neighbour must have survived this worker"
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=other))
            thread.join(timeout=30)
        assert results
        assert results[0].outcome is not None
        assert results[0].outcome.stop_reason == pb.STOP_REASON_CANCELLED
        assert host_pgrep(marker) == [], "the neighbour outlived CloseRun"


# --- mounts and namespaces ---------------------------------------------------------------------

MS_RDONLY, MS_REMOUNT, MS_BIND = 0x1, 0x20, 0x1000


class TestMounts:
    """The worker can neither mount nor change its mounts."""

    def test_mount_tmpfs_is_refused(self, stub: Stub, run_id: str) -> None:
        """mount("tmpfs", "/tmp", "tmpfs") fails with EPERM."""
        out = in_worker(stub, run_id, """
            out["tmpfs"] = libc("mount", b"tmpfs", b"/tmp", b"tmpfs", 0, None)
        """)
        assert out == {"tmpfs": "EPERM"}

    def test_bind_mount_is_refused(self, stub: Stub, run_id: str) -> None:
        """Binding /usr over /workspace fails with EPERM."""
        out = in_worker(stub, run_id, f"""
            out["bind"] = libc("mount", b"/usr", b"/workspace", None, {MS_BIND}, None)
        """)
        assert out == {"bind": "EPERM"}

    def test_remount_root_read_write_is_refused(self, stub: Stub, run_id: str) -> None:
        """Remounting / (or /usr) read-write fails with EPERM, and / stays read-only (EROFS)."""
        out = in_worker(stub, run_id, f"""
            out["root"] = libc("mount", None, b"/", None, {MS_REMOUNT | MS_BIND}, None)
            out["usr"] = libc("mount", None, b"/usr", None, {MS_REMOUNT | MS_BIND}, None)
            out["write"] = attempt(os.open, "/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
        """)
        assert out == {"root": "EPERM", "usr": "EPERM", "write": "EROFS"}

    def test_new_mount_api_is_refused(self, stub: Stub, run_id: str) -> None:
        """fsopen("tmpfs") and open_tree(OPEN_TREE_CLONE) fail with EPERM."""
        out = in_worker(stub, run_id, """
            out["fsopen"] = syscall("fsopen", buf(b"tmpfs"), 0)
            out["open_tree"] = syscall("open_tree", -100, buf(b"/usr"), 1)  # OPEN_TREE_CLONE
        """)
        assert out == {"fsopen": "EPERM", "open_tree": "EPERM"}

    def test_umount_of_a_mask_is_refused(self, stub: Stub, run_id: str) -> None:
        """umount2 of /proc/kallsyms' mask (to reveal the real file) fails with EPERM."""
        out = in_worker(stub, run_id, """
            out["umount"] = syscall("umount2", buf(b"/proc/kallsyms"), 2)  # MNT_DETACH
        """)
        assert out == {"umount": "EPERM"}

    def test_pivot_root_is_refused(self, stub: Stub, run_id: str) -> None:
        """pivot_root(".", ".") fails with EPERM."""
        out = in_worker(stub, run_id, """
            os.chdir("/tmp")
            out["pivot_root"] = syscall("pivot_root", buf(b"."), buf(b"."))
        """)
        assert out == {"pivot_root": "EPERM"}

    def test_sysfs_is_absent_and_cannot_be_mounted(self, stub: Stub, run_id: str) -> None:
        """/sys does not exist, and mounting sysfs (or cgroupfs) fails with EPERM."""
        out = in_worker(stub, run_id, """
            out["sys"] = attempt(os.stat, "/sys")
            out["sysfs"] = libc("mount", b"sysfs", b"/tmp", b"sysfs", 0, None)
            out["cgroup2"] = libc("mount", b"cgroup2", b"/tmp", b"cgroup2", 0, None)
            # the release_agent escape (CVE-2022-0492) starts with a v1 hierarchy of one's own
            out["cgroup1"] = libc("mount", b"cgroup", b"/tmp", b"cgroup", 0, b"rdma")
        """)
        assert out == {"sys": "ENOENT", "sysfs": "EPERM", "cgroup2": "EPERM", "cgroup1": "EPERM"}


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000


class TestNamespaces:
    """No new namespace, and no way into another one."""

    def test_unshare_user_namespace_is_refused(self, stub: Stub, run_id: str) -> None:
        """unshare(CLONE_NEWUSER) fails with EPERM."""
        out = in_worker(stub, run_id, f"""
            out["user"] = libc("unshare", {CLONE_NEWUSER})
        """)
        assert out == {"user": "EPERM"}

    def test_unshare_mount_pid_net_namespaces_is_refused(self, stub: Stub, run_id: str) -> None:
        """unshare of a mount, pid or net namespace fails with EPERM."""
        out = in_worker(stub, run_id, f"""
            for name, flag in (("mnt", {CLONE_NEWNS}), ("pid", {CLONE_NEWPID}),
                               ("net", {CLONE_NEWNET})):
                out[name] = libc("unshare", flag)
        """)
        assert out == {"mnt": "EPERM", "pid": "EPERM", "net": "EPERM"}

    def test_unshare_binary_fails(self, stub: Stub, run_id: str) -> None:
        """`unshare -U -r` (map root in a new user namespace) fails and never runs `id`."""
        result = execute(stub, run_id, ["/usr/bin/unshare", "-U", "-r", "/usr/bin/id", "-u"])
        assert result.outcome is not None
        assert result.outcome.exited
        assert result.outcome.exit_code != 0
        assert b"Operation not permitted" in result.stderr
        assert result.stdout == b""

    def test_clone_with_new_user_namespace_is_refused(self, stub: Stub, run_id: str) -> None:
        """clone(CLONE_NEWUSER) fails with EPERM, clone3 (flags in memory) with ENOSYS."""
        out = in_worker(stub, run_id, f"""
            r = _libc.syscall(ctypes.c_long(NR["clone"]), ctypes.c_long({CLONE_NEWUSER} | 17),
                              ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0),
                              ctypes.c_long(0))
            if r == 0:  # the child of a clone that should not have happened
                os._exit(0)
            out["clone"] = "ok" if r != -1 else ename(ctypes.get_errno())
            # The kernel keeps the low 32 bits of clone's flags: high bits must not hide the flag.
            r = _libc.syscall(ctypes.c_long(NR["clone"]),
                              ctypes.c_long({CLONE_NEWUSER} | 17 | 1 << 32), ctypes.c_long(0),
                              ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
            if r == 0:
                os._exit(0)
            out["clone_high_bits"] = "ok" if r != -1 else ename(ctypes.get_errno())
            args = struct.pack("=QQQQQQQQ", {CLONE_NEWUSER}, 0, 0, 0, 17, 0, 0, 0)
            out["clone3"] = syscall("clone3", buf(args), 64)
        """)
        assert out == {"clone": "EPERM", "clone_high_bits": "EPERM", "clone3": "ENOSYS"}

    def test_setns_into_pid1s_namespaces_is_refused(self, stub: Stub, run_id: str) -> None:
        """setns() on each /proc/1/ns/* (pid 1 is the tool itself) fails with EPERM."""
        kinds = ["mnt", "pid", "net", "ipc", "uts", "cgroup", "user"]
        out = in_worker(stub, run_id, f"""
            for kind in {kinds!r}:
                fd = os.open(f"/proc/1/ns/{{kind}}", os.O_RDONLY)
                out[kind] = syscall("setns", fd, 0)
        """)
        assert out == dict.fromkeys(kinds, "EPERM")

    def test_host_namespaces_are_unreachable(self, stub: Stub, run_id: str,
                                             daemon: DaemonHandle) -> None:
        """The daemon's /proc/<pid>/ns/* (the host's namespaces) do not exist in the worker."""
        pid = daemon.process.pid
        out = in_worker(stub, run_id, f"""
            for kind in ("mnt", "pid", "net", "user"):
                out[kind] = attempt(os.open, "/proc/{pid}/ns/" + kind, os.O_RDONLY)
            out["root"] = attempt(os.stat, "/proc/{pid}/root/etc/shadow")
        """)
        assert out == {"mnt": "ENOENT", "pid": "ENOENT", "net": "ENOENT", "user": "ENOENT",
                       "root": "ENOENT"}

    def test_sethostname_is_refused(self, stub: Stub, run_id: str) -> None:
        """sethostname() fails with EPERM and the hostname stays the worker's own."""
        out = in_worker(stub, run_id, """
            out["sethostname"] = libc("sethostname", b"pwned", 5)
            out["hostname"] = os.uname().nodename
        """)
        assert out == {"sethostname": "EPERM", "hostname": "agentd"}
        assert os.uname().nodename != "pwned"


# --- other processes and the kernel ------------------------------------------------------------

PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206


class TestPtrace:
    """No process may trace or read another's memory, not even its own child."""

    def test_ptrace_attach_to_a_sibling_is_refused(self, stub: Stub, run_id: str) -> None:
        """PTRACE_ATTACH and PTRACE_SEIZE on a forked child fail with EPERM."""
        out = in_worker(stub, run_id, f"""
            import time
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            out["attach"] = syscall("ptrace", {PTRACE_ATTACH}, child, 0, 0)
            out["seize"] = syscall("ptrace", {PTRACE_SEIZE}, child, 0, 0)
            os.kill(child, 9)
            os.waitpid(child, 0)
        """)
        assert out == {"attach": "EPERM", "seize": "EPERM"}

    def test_ptrace_traceme_is_refused(self, stub: Stub, run_id: str) -> None:
        """PTRACE_TRACEME fails with EPERM in pid 1 (whose parent is the launcher, outside) and
        in a forked child."""
        out = in_worker(stub, run_id, f"""
            out["pid1"] = syscall("ptrace", {PTRACE_TRACEME}, 0, 0, 0)
            r, w = os.pipe()
            child = os.fork()
            if child == 0:
                os.write(w, syscall("ptrace", {PTRACE_TRACEME}, 0, 0, 0).encode())
                os._exit(0)
            os.waitpid(child, 0)
            out["child"] = os.read(r, 64).decode()
        """)
        assert out == {"pid1": "EPERM", "child": "EPERM"}

    def test_reading_a_siblings_memory_is_refused(self, stub: Stub, run_id: str) -> None:
        """process_vm_readv and pidfd_getfd on a forked child fail with EPERM."""
        out = in_worker(stub, run_id, """
            import time
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            local = ctypes.create_string_buffer(8)
            iov_l = struct.pack("=QQ", ctypes.addressof(local), 8)
            iov_r = struct.pack("=QQ", id(out), 8)
            out["process_vm_readv"] = syscall("process_vm_readv", child, buf(iov_l), 1,
                                              buf(iov_r), 1, 0)
            pidfd = os.pidfd_open(child)
            out["pidfd_getfd"] = syscall("pidfd_getfd", pidfd, 0, 0)
            os.kill(child, 9)
            os.waitpid(child, 0)
        """)
        assert out == {"process_vm_readv": "EPERM", "pidfd_getfd": "EPERM"}


# mount(0, 0, 0, 0, 0) through the i386 ABI (`int 0x80`, eax = 21), from executable memory.
INT80_MOUNT = """
import ctypes, mmap
mem = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
mem.write(bytes.fromhex("b815000000" "31db31c931d231f631ff" "cd80" "c3"))
print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(mem)))())
"""
# mount through the x32 ABI: the x86_64 number with __X32_SYSCALL_BIT.
X32_MOUNT = """
import ctypes
libc = ctypes.CDLL(None)
libc.syscall.restype = ctypes.c_long
print(libc.syscall(ctypes.c_long(0x40000000 | 165), 0, 0, 0, 0, 0))
"""


class TestKernelInterfaces:
    """Kernel code, tracing, keyrings and host-wide knobs are out of reach."""

    def test_init_module_is_refused(self, stub: Stub, run_id: str) -> None:
        """init_module() with a module image fails with EPERM."""
        out = in_worker(stub, run_id, """
            image = b"\\x7fELF" + bytes(60)
            out["init_module"] = syscall("init_module", buf(image), len(image), buf(b""))
        """)
        assert out == {"init_module": "EPERM"}

    def test_finit_module_and_delete_module_are_refused(self, stub: Stub, run_id: str) -> None:
        """finit_module() on an open file and delete_module() fail with EPERM."""
        out = in_worker(stub, run_id, """
            fd = os.open("/usr/bin/true", os.O_RDONLY)
            out["finit_module"] = syscall("finit_module", fd, buf(b""), 0)
            out["delete_module"] = syscall("delete_module", buf(b"agentd_none"), os.O_NONBLOCK)
        """)
        assert out == {"finit_module": "EPERM", "delete_module": "EPERM"}

    def test_bpf_is_refused(self, stub: Stub, run_id: str) -> None:
        """bpf(BPF_MAP_CREATE) of a one-entry array fails with EPERM."""
        out = in_worker(stub, run_id, """
            attr = struct.pack("=IIII", 2, 4, 4, 1) + bytes(56)  # BPF_MAP_TYPE_ARRAY
            out["bpf"] = syscall("bpf", 0, buf(attr), len(attr))
        """)
        assert out == {"bpf": "EPERM"}

    def test_keyrings_are_refused(self, stub: Stub, run_id: str) -> None:
        """keyctl(JOIN_SESSION_KEYRING), add_key and request_key fail with EPERM."""
        out = in_worker(stub, run_id, """
            out["keyctl"] = syscall("keyctl", 1, 0)  # KEYCTL_JOIN_SESSION_KEYRING
            out["add_key"] = syscall("add_key", buf(b"user"), buf(b"agentd-test"), buf(b"x"), 1,
                                     -2)  # KEY_SPEC_PROCESS_KEYRING
            out["request_key"] = syscall("request_key", buf(b"user"), buf(b"agentd-test"), 0, 0)
        """)
        assert out == {"keyctl": "EPERM", "add_key": "EPERM", "request_key": "EPERM"}

    def test_perf_event_open_is_refused(self, stub: Stub, run_id: str) -> None:
        """perf_event_open of a user-only software counter on itself fails with EPERM."""
        out = in_worker(stub, run_id, """
            attr = bytearray(128)
            struct.pack_into("=IIQ", attr, 0, 1, 128, 0)  # SOFTWARE, size, CPU_CLOCK
            struct.pack_into("=Q", attr, 40, 1 | 1 << 5 | 1 << 6)  # disabled, !kernel, !hv
            out["perf"] = syscall("perf_event_open", buf(bytes(attr)), 0, -1, -1, 0)
        """)
        assert out == {"perf": "EPERM"}

    def test_userfaultfd_is_refused(self, stub: Stub, run_id: str) -> None:
        """userfaultfd(UFFD_USER_MODE_ONLY) fails with EPERM and /dev/userfaultfd is absent."""
        out = in_worker(stub, run_id, """
            out["userfaultfd"] = syscall("userfaultfd", 1 | os.O_CLOEXEC)
            out["dev"] = attempt(os.stat, "/dev/userfaultfd")
        """)
        assert out == {"userfaultfd": "EPERM", "dev": "ENOENT"}

    def test_io_uring_setup_is_refused(self, stub: Stub, run_id: str) -> None:
        """io_uring_setup(1 entry) fails with EPERM."""
        out = in_worker(stub, run_id, """
            out["io_uring"] = syscall("io_uring_setup", 1, buf(bytes(120)))
        """)
        assert out == {"io_uring": "EPERM"}

    def test_file_handles_are_refused(self, stub: Stub, run_id: str) -> None:
        """name_to_handle_at and open_by_handle_at (the shocker escape) fail with EPERM."""
        out = in_worker(stub, run_id, """
            handle = struct.pack("=Ii", 128, 0) + bytes(128)
            mount_id = buf(bytes(4))
            out["name_to_handle_at"] = syscall("name_to_handle_at", -100, buf(b"/workspace"),
                                               buf(handle), mount_id, 0)
            root = struct.pack("=Ii", 8, 1) + struct.pack("=Q", 2)  # ext4: inode 2, the fs root
            fd = os.open("/workspace", os.O_RDONLY)
            out["open_by_handle_at"] = syscall("open_by_handle_at", fd, buf(root), os.O_RDONLY)
        """)
        assert out == {"name_to_handle_at": "EPERM", "open_by_handle_at": "EPERM"}

    def test_personality_flags_are_refused(self, stub: Stub, run_id: str) -> None:
        """personality(READ_IMPLIES_EXEC) and personality(ADDR_NO_RANDOMIZE) fail with EPERM;
        querying (0xffffffff) still works."""
        out = in_worker(stub, run_id, """
            out["read_implies_exec"] = syscall("personality", 0x0400000)
            out["addr_no_randomize"] = syscall("personality", 0x0040000)
            out["query"] = syscall("personality", 0xFFFFFFFF)
        """)
        assert out == {"read_implies_exec": "EPERM", "addr_no_randomize": "EPERM",
                       "query": "ok"}

    def test_host_wide_syscalls_are_refused(self, stub: Stub, run_id: str) -> None:
        """reboot (bad magic), kexec_load, swapon, syslog, clock_settime and iopl fail with
        EPERM."""
        out = in_worker(stub, run_id, """
            out["reboot"] = syscall("reboot", 0, 0, 0, 0)  # invalid magic: never reboots
            out["kexec_load"] = syscall("kexec_load", 0, 0, 0, 0)
            out["swapon"] = syscall("swapon", buf(b"/tmp/swap"), 0)
            out["syslog"] = syscall("syslog", 3, buf(bytes(64)), 64)  # SYSLOG_ACTION_READ_ALL
            out["clock_settime"] = syscall("clock_settime", 0, buf(bytes(16)))
            if "iopl" in NR:
                out["iopl"] = syscall("iopl", 3)
        """)
        expected = dict.fromkeys(["reboot", "kexec_load", "swapon", "syslog", "clock_settime"],
                                 "EPERM")
        if "iopl" in SYSCALLS:
            expected["iopl"] = "EPERM"
        assert out == expected

    def test_kernel_symbols_and_memory_are_masked(self, stub: Stub, run_id: str) -> None:
        """/proc/kallsyms, /proc/keys, /proc/timer_list read empty; /proc/kcore is absent or
        empty; /proc/kmsg yields nothing."""
        out = in_worker(stub, run_id, """
            for name in ("kallsyms", "keys", "timer_list"):
                path = "/proc/" + name
                out[name] = open(path).read() if os.path.exists(path) else ""
            out["kcore"] = os.stat("/proc/kcore").st_size if os.path.exists("/proc/kcore") else 0
            fd = os.open("/proc/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            out["kmsg"] = attempt(os.read, fd, 4096)
            out["kmsg_data"] = os.read(fd, 4096).decode() if out["kmsg"] == "ok" else ""
        """)
        assert out["kallsyms"] == out["keys"] == out["timer_list"] == ""
        assert out["kcore"] == 0
        assert out["kmsg_data"] == ""

    def test_sysrq_trigger_is_not_writable(self, stub: Stub, run_id: str) -> None:
        """Opening /proc/sysrq-trigger for writing fails (ENOENT on a kernel without it,
        EACCES/EROFS where it exists); nothing is ever written."""
        out = in_worker(stub, run_id, """
            out["open"] = attempt(os.open, "/proc/sysrq-trigger", os.O_WRONLY)
        """)
        expected = {"ENOENT"} if not os.path.exists("/proc/sysrq-trigger") else {"EACCES", "EROFS"}
        assert out["open"] in expected

    @pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 syscall ABIs")
    def test_i386_syscall_abi_kills_the_process(self, stub: Stub, run_id: str) -> None:
        """A 32-bit `int 0x80` mount() (outside the filter's arch) kills the caller (SIGSYS)."""
        out = in_worker(stub, run_id, f"""
            import subprocess
            p = subprocess.run([sys.executable, "-c", {INT80_MOUNT!r}], capture_output=True)
            out["returncode"] = p.returncode
            out["stdout"] = p.stdout.decode()
        """)
        # SIGSEGV where the kernel has no IA32 emulation: the call never ran either way.
        assert out["returncode"] in (-signal.SIGSYS, -signal.SIGSEGV), out
        assert out["stdout"] == ""

    @pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 syscall ABIs")
    def test_x32_syscall_abi_kills_the_process(self, stub: Stub, run_id: str) -> None:
        """An x32 syscall (nr | 0x40000000) of mount kills the caller with SIGSYS."""
        out = in_worker(stub, run_id, f"""
            import subprocess
            p = subprocess.run([sys.executable, "-c", {X32_MOUNT!r}], capture_output=True)
            out["returncode"] = p.returncode
            out["stdout"] = p.stdout.decode()
        """)
        assert out == {"returncode": -signal.SIGSYS, "stdout": ""}


# --- files -------------------------------------------------------------------------------------


class TestHostFiles:
    """Only the granted host paths exist in the worker's root."""

    def test_shadow_is_absent(self, stub: Stub, run_id: str) -> None:
        """/etc/shadow and /etc/gshadow do not exist; /etc holds only the worker's own files and
        the granted /etc/ssl and /etc/alternatives."""
        out = in_worker(stub, run_id, """
            out["shadow"] = attempt(open, "/etc/shadow")
            out["gshadow"] = attempt(open, "/etc/gshadow")
            out["etc"] = sorted(os.listdir("/etc"))
            out["passwd"] = open("/etc/passwd").read()
        """)
        assert out["shadow"] == out["gshadow"] == "ENOENT"
        assert out["etc"] == ["alternatives", "group", "hostname", "hosts", "passwd", "ssl"]
        host_passwd = Path("/etc/passwd").read_text()
        assert out["passwd"] != host_passwd

    def test_ungranted_host_directories_are_absent(self, stub: Stub, run_id: str) -> None:
        """/root, /home, /var, /run, /boot, /srv, /opt, /mnt do not exist; / holds only the
        grants, /workspace, /tmp, /proc and /dev."""
        dirs = ["/root", "/home", "/var", "/run", "/boot", "/srv", "/opt", "/mnt", "/sys"]
        out = in_worker(stub, run_id, f"""
            for d in {dirs!r}:
                out[d] = attempt(os.stat, d)
            out["/"] = sorted(os.listdir("/"))
        """)
        assert out.pop("/") == ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr",
                                "workspace"]
        assert out == dict.fromkeys(dirs, "ENOENT")

    def test_daemon_state_dir_is_invisible(self, stub: Stub, run_id: str,
                                           daemon: DaemonHandle) -> None:
        """The daemon's directory, state database, audit log, workspace layers and sockets do
        not exist in the worker, and /workspace/.. is the worker's own root."""
        paths = [daemon.base, daemon.base / "state", daemon.base / "state" / "state.db",
                 daemon.base / "state" / "audit", daemon.base / "state" / "workspaces",
                 workspace_of(stub, run_id), daemon.socket("client"),
                 daemon.socket("admin"), daemon.base / "agentd.toml"]
        assert all(p.exists() for p in paths)
        out = in_worker(stub, run_id, f"""
            for p in {[str(p) for p in paths]!r}:
                out[p] = attempt(os.stat, p)
            out["parent"] = os.stat("/workspace/..").st_ino == os.stat("/").st_ino
        """)
        assert out == {**{str(p): "ENOENT" for p in paths}, "parent": True}

    def test_daemon_environment_is_unreachable(self, stub: Stub, run_id: str,
                                               daemon: DaemonHandle) -> None:
        """/proc/<daemon pid>/environ does not exist in the worker."""
        pid = daemon.process.pid
        out = in_worker(stub, run_id, f"""
            out["environ"] = attempt(open, "/proc/{pid}/environ", "rb")
        """)
        assert out == {"environ": "ENOENT"}

    def test_worker_environment_is_only_the_expected_set(self, stub: Stub, run_id: str) -> None:
        """The tool's environ is PATH, HOME, TMPDIR, AGENTD_TASK_ID, LANG, the step's
        AGENTD_WRITES_FD and AGENTD_CHANNELS_FD and the requested GREETING; nothing of the
        daemon's environment leaks."""
        result = execute(stub, run_id, ["/usr/bin/env", "-0"], env={"GREETING": "hi"})
        assert result.outcome is not None
        assert result.outcome.exit_code == 0
        env = dict(item.split("=", 1) for item in result.text.split("\0") if item)
        assert set(env) == {"PATH", "HOME", "TMPDIR", "AGENTD_TASK_ID", "LANG", "GREETING",
                            "AGENTD_WRITES_FD", "AGENTD_CHANNELS_FD"}
        assert env["AGENTD_TASK_ID"] == result.outcome.task_id
        assert (env["HOME"], env["TMPDIR"], env["GREETING"]) == ("/workspace", "/tmp", "hi")
        assert (env["AGENTD_WRITES_FD"], env["AGENTD_CHANNELS_FD"]) == ("3", "4")

    def test_loader_variables_are_refused_by_policy(self, stub: Stub, run_id: str) -> None:
        """A request that sets LD_PRELOAD is refused with PERMISSION_DENIED before any worker."""
        with pytest.raises(grpc.RpcError) as info:
            execute(stub, run_id, ["/usr/bin/true"], env={"LD_PRELOAD": "/workspace/evil.so"})
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


class TestWrites:
    """Writes land only in /workspace and /tmp."""

    def test_root_is_read_only(self, stub: Stub, run_id: str) -> None:
        """Creating a file or directory in / fails with EROFS."""
        out = in_worker(stub, run_id, """
            out["file"] = attempt(os.open, "/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
            out["dir"] = attempt(os.mkdir, "/pwned")
            out["symlink"] = attempt(os.symlink, "/workspace", "/pwned")
        """)
        assert out == {"file": "EROFS", "dir": "EROFS", "symlink": "EROFS"}

    def test_usr_is_read_only(self, stub: Stub, run_id: str) -> None:
        """Creating /usr/pwned fails with EROFS; opening /usr/bin/true for writing fails with
        EACCES or EROFS."""
        out = in_worker(stub, run_id, """
            out["create"] = attempt(os.open, "/usr/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
            out["overwrite"] = attempt(os.open, "/usr/bin/true", os.O_WRONLY)
            out["chmod"] = attempt(os.chmod, "/usr/bin/true", 0o4777)
        """)
        assert out["create"] == "EROFS"
        assert out["overwrite"] in ("EACCES", "EROFS")
        assert out["chmod"] in ("EPERM", "EROFS")

    def test_etc_is_read_only(self, stub: Stub, run_id: str) -> None:
        """Creating /etc/pwned fails with EROFS; rewriting /etc/passwd with EACCES or EROFS."""
        out = in_worker(stub, run_id, """
            out["create"] = attempt(os.open, "/etc/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
            out["passwd"] = attempt(os.open, "/etc/passwd", os.O_WRONLY)
            out["ssl"] = attempt(os.open, "/etc/ssl/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
        """)
        assert out["create"] == out["ssl"] == "EROFS"
        assert out["passwd"] in ("EACCES", "EROFS")

    def test_proc_sys_is_read_only(self, stub: Stub, run_id: str) -> None:
        """Opening kernel knobs under /proc/sys for writing fails with EACCES or EROFS."""
        knobs = [k for k in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/hostname",
                             "/proc/sys/vm/drop_caches", "/proc/sys/kernel/modprobe",
                             "/proc/sys/kernel/unprivileged_userns_clone")
                 if os.path.exists(k)]
        out = in_worker(stub, run_id, f"""
            for knob in {knobs!r}:
                out[knob] = attempt(os.open, knob, os.O_WRONLY)  # never written to
        """)
        assert set(out) == set(knobs)
        assert all(v in ("EACCES", "EROFS") for v in out.values()), out

    def test_hardlinks_to_host_files_are_refused(self, stub: Stub, run_id: str) -> None:
        """Hard-linking a granted host file (same filesystem as the workspace here) into
        /workspace or /tmp fails with EXDEV: no pinning of host setuid binaries."""
        out = in_worker(stub, run_id, """
            for src in ("/usr/bin/su", "/usr/bin/passwd", "/etc/ssl/openssl.cnf"):
                if os.path.exists(src):
                    out[src] = [attempt(os.link, src, "/workspace/pinned"),
                                attempt(os.link, src, "/tmp/pinned")]
        """)
        assert out, "no granted host file to link"
        assert all(v == ["EXDEV", "EXDEV"] for v in out.values()), out

    def test_workspace_and_tmp_are_writable(self, stub: Stub, run_id: str) -> None:
        """The two writable places work (so the refusals above are not a broken worker)."""
        out = in_worker(stub, run_id, """
            for d in ("/workspace", "/tmp"):
                with open(d + "/ok", "w") as f:
                    f.write("ok")
                out[d] = open(d + "/ok").read()
        """)
        assert out == {"/workspace": "ok", "/tmp": "ok"}
        assert (workspace_of(stub, run_id) / "ok").stat().st_uid == WORKER_UID


class TestSymlinks:
    """Symlinks resolve inside the worker's root, and the daemon never follows them."""

    def test_workspace_symlink_to_shadow_resolves_inside_the_worker(
            self, stub: Stub, run_id: str) -> None:
        """/workspace/link -> /etc/shadow made in the worker reads ENOENT and writes EROFS; on the
        host it stays a dangling-for-the-worker symlink and /etc/shadow is untouched."""
        before = digest("/etc/shadow")
        out = in_worker(stub, run_id, """
            os.symlink("/etc/shadow", "/workspace/link")
            os.symlink("../../../../../../etc/shadow", "/workspace/rel")
            out["read"] = attempt(open, "/workspace/link")
            out["read_rel"] = attempt(open, "/workspace/rel")
            out["write"] = attempt(open, "/workspace/link", "w")
        """)
        assert out == {"read": "ENOENT", "read_rel": "ENOENT", "write": "EROFS"}
        link = workspace_of(stub, run_id) / "link"
        assert link.is_symlink()
        assert os.readlink(link) == "/etc/shadow"
        assert digest("/etc/shadow") == before

    def test_host_side_symlink_to_a_host_secret_is_unreadable(
            self, stub: Stub, run_id: str, tmp_path: Path, daemon: DaemonHandle) -> None:
        """Symlinks planted on the host in the run's current top layer (what the next Exec
        mounts), to a world-readable host secret (absolute, relative, via /proc/<daemon>/root)
        and to /etc/shadow, read ENOENT."""
        secret = tmp_path / "secret.txt"
        secret.write_text("TOP-SECRET")
        secret.chmod(0o644)
        workspace = workspace_of(stub, run_id)
        os.symlink(secret, workspace / "abs")
        os.symlink("../" * 20 + str(secret).lstrip("/"), workspace / "rel")
        os.symlink(f"/proc/{daemon.process.pid}/root{secret}", workspace / "proc")
        os.symlink("/etc/shadow", workspace / "shadow")
        out = in_worker(stub, run_id, """
            for name in ("abs", "rel", "proc", "shadow"):
                out[name] = attempt(open, "/workspace/" + name)
            out["planted"] = all(os.path.islink("/workspace/" + name)
                                 for name in ("abs", "rel", "proc", "shadow"))
        """)
        assert out == {**dict.fromkeys(["abs", "rel", "proc", "shadow"], "ENOENT"),
                       "planted": True}

    def test_close_run_does_not_follow_workspace_symlinks(self, stub: Stub, run_id: str,
                                                          tmp_path: Path) -> None:
        """Deleting the run's layers at CloseRun deletes the worker's committed symlinks, never
        their host targets (a directory and a file outside the workspace)."""
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "keep").write_text("keep")
        base = workspace_of(stub, run_id)
        out = in_worker(stub, run_id, f"""
            os.symlink({str(victim)!r}, "/workspace/dirlink")
            os.makedirs("/workspace/sub/deeper")
            os.symlink({str(victim / "keep")!r}, "/workspace/sub/deeper/filelink")
            os.symlink({str(victim)!r} + "/", "/workspace/sub/slash")
            out["ok"] = True
        """)
        assert out == {"ok": True}
        workspace = workspace_of(stub, run_id)
        assert (workspace / "dirlink").is_symlink()
        assert (workspace / "sub" / "deeper" / "filelink").is_symlink()
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        assert not workspace.exists()
        assert not base.exists()
        assert (victim / "keep").read_text() == "keep"
        assert sorted(p.name for p in victim.iterdir()) == ["keep"]


# --- network and terminal ----------------------------------------------------------------------


class TestNetwork:
    """Nothing leaves the worker: a net namespace with only loopback."""

    def test_tcp_connect_out_of_the_box_fails(self, stub: Stub, run_id: str) -> None:
        """connect() to 1.1.1.1:80 fails (EACCES from Landlock's TCP rule, else ENETUNREACH)."""
        out = in_worker(stub, run_id, """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            out["connect"] = attempt(s.connect, ("1.1.1.1", 80))
        """)
        assert out["connect"] in ("EACCES", "ENETUNREACH")

    def test_udp_to_the_outside_is_unroutable(self, stub: Stub, run_id: str) -> None:
        """connect() and sendto() of a UDP socket towards 1.1.1.1:53 fail with ENETUNREACH."""
        out = in_worker(stub, run_id, """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out["connect"] = attempt(s.connect, ("1.1.1.1", 53))
            out["sendto"] = attempt(s.sendto, b"x", ("1.1.1.1", 53))
        """)
        assert out == {"connect": "ENETUNREACH", "sendto": "ENETUNREACH"}

    def test_only_loopback_exists(self, stub: Stub, run_id: str) -> None:
        """The only interface is lo, and there is no IPv4 route at all."""
        out = in_worker(stub, run_id, """
            import socket
            out["interfaces"] = [name for _, name in socket.if_nameindex()]
            out["routes"] = open("/proc/net/route").read().splitlines()[1:]
        """)
        assert out == {"interfaces": ["lo"], "routes": []}

    def test_raw_and_packet_sockets_are_refused(self, stub: Stub, run_id: str) -> None:
        """SOCK_RAW on AF_INET/AF_INET6 fails with EPERM; AF_PACKET and AF_VSOCK with
        EAFNOSUPPORT."""
        out = in_worker(stub, run_id, """
            import socket
            out["raw4"] = attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, 1)
            out["raw6"] = attempt(socket.socket, socket.AF_INET6, socket.SOCK_RAW, 58)
            out["packet"] = attempt(socket.socket, 17, socket.SOCK_RAW, 0)
            out["vsock"] = attempt(socket.socket, 40, socket.SOCK_STREAM, 0)
            # socket() reads its family as a 32-bit int: high bits must not hide it.
            out["raw4_high_bits"] = syscall("socket", 2 | 1 << 32, 3, 1)
            out["packet_high_bits"] = syscall("socket", 17 | 1 << 32, 3, 0)
        """)
        assert out == {"raw4": "EPERM", "raw6": "EPERM", "packet": "EAFNOSUPPORT",
                       "vsock": "EAFNOSUPPORT", "raw4_high_bits": "EPERM",
                       "packet_high_bits": "EAFNOSUPPORT"}


TIOCSTI = 0x5412


class TestTerminal:
    """No controlling terminal, and no typing into any terminal."""

    def test_dev_tty_has_no_controlling_terminal(self, stub: Stub, run_id: str) -> None:
        """Opening /dev/tty fails with ENXIO: the worker is in a session without a terminal."""
        out = in_worker(stub, run_id, """
            out["tty"] = attempt(os.open, "/dev/tty", os.O_RDWR)
            out["sid_is_self"] = os.getsid(0) == os.getpid()
        """)
        assert out == {"tty": "ENXIO", "sid_is_self": True}

    def test_tiocsti_on_a_pty_is_refused(self, stub: Stub, run_id: str) -> None:
        """TIOCSTI on both ends of a fresh pty fails with EPERM, also with high bits set in the
        command word (which the kernel truncates to 32 bits)."""
        out = in_worker(stub, run_id, f"""
            import fcntl
            master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
            fcntl.ioctl(master, 0x40045431, struct.pack("i", 0))  # TIOCSPTLCK: unlockpt
            n = struct.unpack("i", fcntl.ioctl(master, 0x80045430, bytes(4)))[0]  # TIOCGPTN
            slave = os.open(f"/dev/pts/{{n}}", os.O_RDWR | os.O_NOCTTY)
            c = buf(b"x")
            out["master"] = syscall("ioctl", master, {TIOCSTI}, c)
            out["slave"] = syscall("ioctl", slave, {TIOCSTI}, c)
            out["high_bits"] = syscall("ioctl", slave, {TIOCSTI | 1 << 32}, c)
        """)
        assert out == {"master": "EPERM", "slave": "EPERM", "high_bits": "EPERM"}


# --- privileges --------------------------------------------------------------------------------


class TestPrivileges:
    """An unprivileged uid with no capabilities, and no way to gain any."""

    def test_capabilities_are_all_zero(self, stub: Stub, run_id: str) -> None:
        """Every capability set is empty, no_new_privs is set, seccomp filters, uid is 65534."""
        out = in_worker(stub, run_id, """
            for line in open("/proc/self/status"):
                key, value = line.split(":", 1)
                out[key] = value.split()
        """)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(out[cap][0], 16) == 0, (cap, out[cap])
        assert out["NoNewPrivs"] == ["1"]
        assert out["Seccomp"] == ["2"]
        assert out["Uid"] == out["Gid"] == [str(WORKER_UID)] * 4
        assert out["Groups"] == []

    def test_setuid_zero_is_refused(self, stub: Stub, run_id: str) -> None:
        """setuid(0), setresuid(0,0,0), setgid(0), setgroups([0]) fail with EPERM; capset cannot
        raise a capability."""
        out = in_worker(stub, run_id, """
            out["setuid"] = attempt(os.setuid, 0)
            out["setresuid"] = attempt(os.setresuid, 0, 0, 0)
            out["setgid"] = attempt(os.setgid, 0)
            out["setgroups"] = attempt(os.setgroups, [0])
            header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
            data = struct.pack("=IIIIII", 1 << 21, 1 << 21, 0, 0, 0, 0)  # CAP_SYS_ADMIN
            out["capset"] = syscall("capset", buf(header), buf(data))
            out["euid"] = os.geteuid()
        """)
        assert out == {"setuid": "EPERM", "setresuid": "EPERM", "setgid": "EPERM",
                       "setgroups": "EPERM", "capset": "EPERM", "euid": WORKER_UID}

    def test_core_dumps_are_off(self, stub: Stub, run_id: str) -> None:
        """RLIMIT_CORE is 0 and cannot be raised; a crashing child leaves no core file."""
        out = in_worker(stub, run_id, """
            import resource
            out["core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
            out["raise"] = libc("setrlimit", resource.RLIMIT_CORE, buf(struct.pack("=qq", -1, -1)))
            child = os.fork()
            if child == 0:
                os.abort()
            out["status"] = os.WTERMSIG(os.waitpid(child, 0)[1])
            out["files"] = sorted(os.listdir("/workspace"))
        """)
        assert out == {"core": [0, 0], "raise": "EPERM", "status": signal.SIGABRT, "files": []}

    def test_setuid_bit_in_workspace_gains_nothing(self, stub: Stub, run_id: str) -> None:
        """A copy of a binary made setuid in /workspace stays owned by 65534 (chown to root is
        EPERM) and cannot be executed (EACCES); on the host it is owned by the worker uid."""
        out = in_worker(stub, run_id, """
            import shutil, subprocess
            shutil.copy("/usr/bin/id", "/workspace/suid-id")
            out["chmod"] = attempt(os.chmod, "/workspace/suid-id", 0o4755)
            out["chown"] = attempt(os.chown, "/workspace/suid-id", 0, 0)
            out["exec"] = attempt(subprocess.run, ["/workspace/suid-id", "-u"])
        """)
        assert out == {"chmod": "ok", "chown": "EPERM", "exec": "EACCES"}
        st = (workspace_of(stub, run_id) / "suid-id").stat()
        assert (st.st_uid, st.st_gid) == (WORKER_UID, WORKER_UID)

    def test_setuid_root_binaries_run_unprivileged(self, stub: Stub, run_id: str) -> None:
        """The host's setuid-root mount(8) runs with euid 65534 (it says 'must be superuser')
        and su(1) fails: /usr is nosuid and no_new_privs is set."""
        if not os.stat("/usr/bin/mount").st_mode & 0o4000:
            pytest.skip("the host's mount(8) is not setuid")
        result = execute(stub, run_id, ["/usr/bin/mount", "-t", "tmpfs", "none", "/tmp"])
        assert result.outcome is not None
        assert result.outcome.exit_code != 0
        # util-linux words it either way, and only when geteuid() != 0
        assert b"must be superuser" in result.stderr or b"only root" in result.stderr, \
            result.stderr
        su = execute(stub, run_id, ["/usr/bin/su", "-c", "/usr/bin/id -u", "root"])
        assert su.outcome is not None
        assert su.outcome.exit_code != 0
        assert b"0" not in su.stdout.split()
        out = in_worker(stub, run_id, """
            out["usr"] = [l.split()[5] for l in open("/proc/self/mountinfo")
                          if l.split()[4] == "/usr"][0].split(",")
        """)
        assert "nosuid" in out["usr"]


# --- exec --------------------------------------------------------------------------------------


class TestLandlockExec:
    """Only the policy's executables run; files the agent writes do not."""

    def test_binary_copied_to_workspace_or_tmp_cannot_be_executed(self, stub: Stub,
                                                                   run_id: str) -> None:
        """execve of /bin/true copied into /workspace or /tmp fails with EACCES."""
        out = in_worker(stub, run_id, """
            import shutil
            for d in ("/workspace", "/tmp"):
                shutil.copy("/usr/bin/true", d + "/true")
                os.chmod(d + "/true", 0o755)
                out[d] = attempt(os.execv, d + "/true", ["true"])
        """)
        assert out == {"/workspace": "EACCES", "/tmp": "EACCES"}

    # ld.so is always exec-allowed (every dynamic binary needs it), and it maps any readable
    # ELF with PROT_EXEC: a noexec mount is what stops it ("failed to map segment").
    def test_binary_copied_to_workspace_cannot_run_through_the_loader(self, stub: Stub,
                                                                       run_id: str) -> None:
        """`ld.so /workspace/x` (or /tmp/x) must not run a binary the agent wrote: writable
        places need noexec, or the exec allow-list means nothing."""
        loader = "/lib64/ld-linux-x86-64.so.2" if platform.machine() == "x86_64" \
            else "/lib/ld-linux-aarch64.so.1"
        out = in_worker(stub, run_id, f"""
            import shutil, subprocess
            for d in ("/workspace", "/tmp"):
                shutil.copy("/usr/bin/id", d + "/agent-id")
                p = subprocess.run([{loader!r}, d + "/agent-id", "-u"], capture_output=True)
                out[d] = [p.returncode, p.stdout.decode().strip()]
        """)
        for d in ("/workspace", "/tmp"):
            assert out[d][1] == "", (
                f"ESCAPE: {loader} ran an agent-written binary from {d} ({out[d]})")
            assert out[d][0] != 0

    # Landlock never restricts files on internal mounts (memfd's shm_mnt), so a memfd passes
    # the EXECUTE rule; vm.memfd_noexec=2 in the worker's pid namespace refuses it (EACCES).
    def test_memfd_cannot_be_executed(self, stub: Stub, run_id: str) -> None:
        """execve of a memfd holding an ELF (the fileless-exec trick) must not run it."""
        out = in_worker(stub, run_id, """
            import subprocess
            fd = os.memfd_create("agent", 0)
            os.write(fd, open("/usr/bin/id", "rb").read())
            try:
                p = subprocess.run([f"/proc/self/fd/{fd}", "-u"], pass_fds=[fd],
                                   capture_output=True)
                out["run"] = [p.returncode, p.stdout.decode().strip()]
            except OSError as exc:
                out["run"] = ename(exc.errno)
        """)
        assert out["run"] in ("EACCES", "EPERM"), (
            f"ESCAPE: a memfd was executed outside exec.allow ({out['run']})")


class TestChroot:
    """No chroot, so no chroot-and-climb escape."""

    def test_chroot_is_refused(self, stub: Stub, run_id: str) -> None:
        """chroot("/tmp/jail") fails with EPERM."""
        out = in_worker(stub, run_id, """
            os.mkdir("/tmp/jail")
            out["chroot"] = attempt(os.chroot, "/tmp/jail")
        """)
        assert out == {"chroot": "EPERM"}

    def test_classic_chroot_fchdir_escape_stays_inside(self, stub: Stub, run_id: str) -> None:
        """The classic escape (keep a dir fd, chroot deeper, fchdir out, climb '..', chroot '.')
        fails at chroot with EPERM, and climbing never leaves the worker's root."""
        out = in_worker(stub, run_id, """
            root_ino = os.stat("/").st_ino
            fd = os.open("/", os.O_RDONLY)
            os.makedirs("/tmp/jail/inner")
            out["chroot_in"] = attempt(os.chroot, "/tmp/jail")
            os.fchdir(fd)
            for _ in range(64):
                os.chdir("..")
            out["chroot_out"] = attempt(os.chroot, ".")
            out["at_root"] = os.stat(".").st_ino == root_ino
            out["listing"] = sorted(os.listdir("."))
            out["shadow"] = attempt(os.stat, "etc/shadow")
        """)
        assert out["chroot_in"] == out["chroot_out"] == "EPERM"
        assert out["at_root"] is True
        assert "workspace" in out["listing"]
        assert "home" not in out["listing"]
        assert out["shadow"] == "ENOENT"


class TestDevices:
    """A minimal /dev: no disks, no way to make device nodes."""

    def test_dev_holds_only_the_minimal_set(self, stub: Stub, run_id: str) -> None:
        """/dev has null, zero, full, random, urandom, tty, pts, ptmx, shm and the fd links."""
        out = in_worker(stub, run_id, """
            out["dev"] = sorted(os.listdir("/dev"))
        """)
        assert out["dev"] == ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
                              "stdin", "stdout", "tty", "urandom", "zero"]

    def test_block_devices_are_absent_and_mknod_is_refused(self, stub: Stub,
                                                           run_id: str) -> None:
        """/dev/sda, /dev/vda, /dev/mem, /dev/kmsg are absent; mknod of a block device (sda) in
        /tmp or /workspace fails (EACCES from Landlock, or EPERM without CAP_MKNOD)."""
        devices = ["/dev/sda", "/dev/vda", "/dev/mem", "/dev/kmsg", "/dev/kvm"]
        out = in_worker(stub, run_id, f"""
            import stat
            for d in {devices!r}:
                out[d] = attempt(os.stat, d)
            for d in ("/tmp", "/workspace"):
                out[d] = attempt(os.mknod, d + "/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
                out[d + "/chr"] = attempt(os.mknod, d + "/mem", stat.S_IFCHR | 0o600,
                                          os.makedev(1, 1))
        """)
        assert all(out[d] == "ENOENT" for d in devices), out
        for d in ("/tmp", "/workspace", "/tmp/chr", "/workspace/chr"):
            assert out[d] in ("EACCES", "EPERM"), (d, out[d])


# --- resources ---------------------------------------------------------------------------------


class TestResources:
    """Bombs hit the limits, the worker is stopped, and the daemon keeps serving."""

    def test_fork_bomb_is_stopped_for_pids(self, stub: Stub, run_id: str) -> None:
        """A fork bomb ends with stop_reason PIDS, and the daemon still runs the next task."""
        result = run_python(stub, run_id, """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """, timeout=20)
        assert result.outcome is not None
        assert result.outcome.stop_reason == pb.STOP_REASON_PIDS, result.outcome
        assert result.outcome.pids_limit_hit
        assert result.outcome.wall_seconds < 15
        after = sh(stub, run_id, "echo still-serving")
        assert after.text == "still-serving\n"

    def test_memory_bomb_is_stopped_for_memory(self, stub: Stub, run_id: str) -> None:
        """Allocating without end ends with stop_reason MEMORY and a peak near 128 MiB."""
        result = run_python(stub, run_id, """
            chunks = []
            while True:
                chunks.append(b"x" * (1 << 20))
        """, timeout=20)
        assert result.outcome is not None
        assert result.outcome.stop_reason == pb.STOP_REASON_MEMORY, result.outcome
        assert result.outcome.signal == signal.SIGKILL
        assert 0.85 * MEMORY_LIMIT <= result.outcome.peak_memory_bytes <= MEMORY_LIMIT + MiB

    def test_filling_tmp_hits_enospc(self, stub: Stub, run_id: str) -> None:
        """Writing /tmp without end fails with ENOSPC at 16 MiB and the tool ends normally."""
        out = in_worker(stub, run_id, """
            written = 0
            with open("/tmp/fill", "wb", buffering=0) as f:
                try:
                    while True:
                        written += f.write(b"x" * 65536)
                except OSError as exc:
                    out["errno"] = ename(exc.errno)
            out["written"] = written
        """)
        assert out["errno"] == "ENOSPC"
        assert TMP_LIMIT - MiB <= out["written"] <= TMP_LIMIT

    def test_exhausting_file_descriptors_hits_emfile(self, stub: Stub, run_id: str) -> None:
        """Opening files without end fails with EMFILE once fd 127 is taken (open_files 128)."""
        out = in_worker(stub, run_id, """
            import resource
            fds = []
            try:
                while True:
                    fds.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                out["errno"] = ename(exc.errno)
            out["highest"] = max(fds)
            limit = buf(struct.pack("=QQ", 4096, 4096))
            out["raise"] = libc("setrlimit", resource.RLIMIT_NOFILE, limit)
        """)
        assert out["errno"] == "EMFILE"
        assert out["highest"] == OPEN_FILES - 1
        assert out["raise"] == "EPERM"

    def test_output_flood_is_stopped(self, stub: Stub, run_id: str) -> None:
        """`yes` ends with stop_reason OUTPUT after at most 1 MiB of output."""
        result = execute(stub, run_id, ["/usr/bin/yes"], timeout=20)
        assert result.outcome is not None
        assert result.outcome.stop_reason == pb.STOP_REASON_OUTPUT
        assert len(result.stdout) + len(result.stderr) <= OUTPUT_LIMIT

    def test_double_fork_and_setsid_do_not_outlive_the_timeout(self, stub: Stub,
                                                               run_id: str) -> None:
        """A grandchild daemonized with double fork + setsid is gone from the host as soon as the
        TIMEOUT outcome arrives."""
        for _ in range(3):
            marker = "agentd-escapee-" + secrets.token_hex(6)
            thread, results = in_background(run_python, stub, run_id, f"""
                import os, time
                if os.fork() == 0:
                    os.setsid()
                    if os.fork() == 0:
                        os.execv("/bin/sleep", [{marker[::-1]!r}[::-1], "300"])
                    os._exit(0)
                time.sleep(300)
            """, timeout=2)
            deadline = time.monotonic() + 10
            while not host_pgrep(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = bool(host_pgrep(marker))
            thread.join(timeout=30)
            assert seen, "the escapee never started: the test proves nothing"
            assert results
            outcome = results[0].outcome
            assert outcome is not None
            assert host_pgrep(marker) == [], "a process of the task outlived its outcome"
            if not _killed_from_outside(outcome):
                break
        assert outcome.stop_reason == pb.STOP_REASON_TIMEOUT, outcome

    def test_orphans_die_with_the_tool(self, stub: Stub, run_id: str) -> None:
        """When the tool (pid 1) exits at once, its detached grandchild is gone from the host by
        the time the outcome arrives."""
        marker = "agentd-orphan-" + secrets.token_hex(6)
        result = run_python(stub, run_id, f"""
            import os
            r, w = os.pipe()
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.close(r)
                    os.write(w, b"x")
                    os.execv("/bin/sleep", [{marker[::-1]!r}[::-1], "300"])
                os._exit(0)
            os.close(w)
            os.read(r, 1)
            print("forked")
        """, timeout=10)
        assert result.outcome is not None
        assert result.outcome.exit_code == 0
        assert result.text == "forked\n"
        assert host_pgrep(marker) == [], "an orphan of the task outlived its outcome"


# --- user namespace ----------------------------------------------------------------------------


class TestUserNamespace:
    """With a user namespace, root inside maps to nothing outside."""

    def test_root_inside_is_not_root_outside(self, stub: Stub, userns_run: str) -> None:
        """In the integration-userns worker only uid 65534 is mapped (onto itself), capabilities
        are zero, and a file it creates is owned by 65534 on the host."""
        out = in_worker(stub, userns_run, """
            out["uid_map"] = open("/proc/self/uid_map").read().split()
            out["gid_map"] = open("/proc/self/gid_map").read().split()
            out["euid"] = os.geteuid()
            out["capeff"] = [l.split()[1] for l in open("/proc/self/status")
                             if l.startswith("CapEff")][0]
            out["setuid"] = attempt(os.setuid, 0)
            out["unshare"] = libc("unshare", 0x10000000)
            open("/workspace/made-in-userns", "w").close()
        """)
        # setuid(0) is EINVAL, not EPERM: uid 0 does not exist in this namespace at all.
        assert out == {"uid_map": ["65534", "65534", "1"], "gid_map": ["65534", "65534", "1"],
                       "euid": WORKER_UID, "capeff": "0000000000000000", "setuid": "EINVAL",
                       "unshare": "EPERM"}
        st = (workspace_of(stub, userns_run) / "made-in-userns").stat()
        assert (st.st_uid, st.st_gid) == (WORKER_UID, WORKER_UID)
