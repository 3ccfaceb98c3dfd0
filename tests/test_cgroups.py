"""Conformance suite of the cgroup driver: every backend usable on this host passes the same
tests, with real processes on the real cgroup filesystem (nothing of the kernel is mocked).

Backends, each a value of the `backend` fixture:

- "v2": a cgroup2 root with cpu, memory and pids (production); skipped where there is none.
- "hybrid": v1 limits and accounting, the cgroup2 mount's `cgroup.kill` for kill.
- "v1": the cgroup2 mount ignored, so kill takes the freezer path.
- "v2-nocontrollers": the v2 backend on a cgroup2 mount without controllers (a hybrid host's):
  layout, join, kill, remove and cleanup run for real; the limit tests are skipped.
- "v2-freezer": the same with `cgroup.kill` not used, so kill takes the v2 freezer fallback
  of kernels before 5.14.

Each test works under its own parent cgroup (`agentd-test-<random>`), so it never touches a
running daemon's task cgroups, and leaves nothing behind: the fixtures remove every task
cgroup, reap every child and fail the test if a task cgroup was left over.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from agentd.errors import FailedPrecondition, InvalidArgument, Unavailable
from agentd.sandbox.cgroups import (
    CgroupDriver,
    CgroupLimits,
    TaskCgroup,
    find_hierarchies,
    probe,
)
from agentd.sandbox.cgroups import v2 as cgroups_v2
from agentd.sandbox.spec import Limits

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup tests need root"),
]

MiB = 1 << 20
# Every child waits for a line on stdin before it runs its test code, so that nothing it
# does is charged outside its task cgroup (the parent sends it after add_pid).
PRELUDE = "import os, sys, time\nsys.stdin.readline()\n"


@dataclass
class Backend:
    """A backend under test: `open()` makes a driver on this test's private parent."""

    id: str
    limits: bool
    open: Callable[[], CgroupDriver]


def _open(backend_id: str, parent: str) -> CgroupDriver:
    if not backend_id.startswith("v2-"):
        return probe(prefer=backend_id, parent=parent)
    mounts = [h for h in find_hierarchies() if h.version == 2 and h.mount != "/sys/fs/cgroup"]
    if not mounts:
        raise Unavailable("no cgroup2 mount below /sys/fs/cgroup beside the v1 hierarchies")
    return cgroups_v2.V2Driver.open(mounts, root=mounts[0].mount, parent=parent, required=(),
                                    cgroup_kill=backend_id != "v2-freezer")


def _remove_parents(drivers: list[CgroupDriver]) -> None:
    dirs = {d for driver in drivers for key, d in driver.describe().items()
            if key.startswith("parent")}
    for directory in sorted(dirs, key=len, reverse=True):
        if os.path.isdir(directory):
            os.rmdir(directory)


@pytest.fixture(params=["v2", "hybrid", "v1", "v2-nocontrollers", "v2-freezer"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    backend_id: str = request.param
    parent = f"agentd-test-{uuid.uuid4().hex[:12]}"
    drivers: list[CgroupDriver] = []

    def open_driver() -> CgroupDriver:
        driver = _open(backend_id, parent)
        drivers.append(driver)
        return driver

    try:
        open_driver()
    except Unavailable as exc:
        pytest.skip(f"{backend_id} backend is not usable on this host: {exc}")
    yield Backend(backend_id, not backend_id.startswith("v2-"), open_driver)
    leftovers = drivers[0].cleanup_stale()
    _remove_parents(drivers)
    assert leftovers == [], f"task cgroups left behind: {leftovers}"


@dataclass
class Tasks:
    """Creates task cgroups and child processes, and cleans both up whatever happens."""

    driver: CgroupDriver
    cgroups: list[TaskCgroup] = field(default_factory=list)
    children: list[subprocess.Popen[str]] = field(default_factory=list)

    def create(self, limits: CgroupLimits | None = None) -> TaskCgroup:
        cgroup = self.driver.create(f"t-{uuid.uuid4().hex}", limits or CgroupLimits())
        self.cgroups.append(cgroup)
        return cgroup

    def start(self, code: str, *args: str) -> subprocess.Popen[str]:
        """`python -c code args` with pipes for stdin and stdout, outside any task cgroup."""
        child = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        return child

    def spawn(self, cgroup: TaskCgroup, code: str, *args: str) -> subprocess.Popen[str]:
        """Starts `code` in `cgroup`: the parent adds it, then lets it run."""
        child = self.start(PRELUDE + code, *args)
        cgroup.add_pid(child.pid)
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        return child

    def close(self) -> None:
        try:
            for cgroup in self.cgroups:
                cgroup.remove()
        finally:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                child.wait()
                for stream in (child.stdin, child.stdout):
                    try:
                        if stream is not None:
                            stream.close()
                    except BrokenPipeError:
                        pass


@pytest.fixture
def tasks(backend: Backend) -> Iterator[Tasks]:
    made = Tasks(backend.open())
    try:
        yield made
    finally:
        made.close()


def _needs_limits(backend: Backend) -> None:
    if not backend.limits:
        pytest.skip(f"{backend.id} has no controllers to enforce limits with")


def _dirs(cgroup: TaskCgroup) -> list[str]:
    return [os.path.dirname(path) for path in cgroup.join_paths()]


def _alive_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


class TestMemoryLimit:
    def test_hog_is_oom_killed(self, backend: Backend, tasks: Tasks) -> None:
        """A process allocating past the memory limit is OOM-killed; usage() says so, with a
        peak near the limit."""
        _needs_limits(backend)
        limit = 64 * MiB
        cgroup = tasks.create(CgroupLimits(memory_bytes=limit))
        hog = tasks.spawn(cgroup, "chunks = [b'x' * (1 << 20) for _ in range(1024)]\n"
                                  "print('survived', flush=True)")
        assert hog.wait(timeout=20) == -signal.SIGKILL
        usage = cgroup.usage()
        assert usage.oom_killed
        assert limit // 2 <= usage.peak_memory_bytes <= limit + 4 * MiB


class TestPidsLimit:
    def test_forks_past_the_limit_fail(self, backend: Backend, tasks: Tasks) -> None:
        """With a pids limit of 8, forks past it fail with EAGAIN and usage() says the limit
        was hit."""
        _needs_limits(backend)
        cgroup = tasks.create(CgroupLimits(pids=8))
        forker = tasks.spawn(cgroup, """
made = failed = 0
for _ in range(20):
    try:
        pid = os.fork()
    except BlockingIOError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    made += 1
print(made, failed, flush=True)
""")
        made, failed = map(int, _line(forker).split())
        assert made <= 7
        assert failed >= 13
        usage = cgroup.usage()
        assert usage.pids_limit_hit
        assert not usage.oom_killed


class TestCpuLimit:
    def test_busy_loop_is_throttled(self, backend: Backend, tasks: Tasks) -> None:
        """A busy loop under a 0.2-core limit gets about 0.2 s of CPU in 1 s of wall time."""
        _needs_limits(backend)
        cgroup = tasks.create(CgroupLimits(cpu=0.2))
        started = time.monotonic()
        loop = tasks.spawn(cgroup, "end = time.monotonic() + 1.0\n"
                                   "while time.monotonic() < end:\n    pass\n")
        assert loop.wait(timeout=30) == 0
        wall = time.monotonic() - started
        usage = cgroup.usage()
        # The whole process, interpreter start-up included, is held to 0.2 cores: compare with
        # its own wall time (slow on an emulated CPU), plus one CFS period of slack.
        assert 0.05 <= usage.cpu_seconds <= 0.2 * wall + 0.1
        assert not usage.pids_limit_hit


class TestUsage:
    def test_counts_cpu_time(self, backend: Backend, tasks: Tasks) -> None:
        """usage() counts the CPU time of an unlimited busy loop and reports no limit hit."""
        cgroup = tasks.create()
        loop = tasks.spawn(cgroup, "end = time.monotonic() + 0.3\n"
                                   "while time.monotonic() < end:\n    pass\n")
        assert loop.wait(timeout=10) == 0
        usage = cgroup.usage()
        assert 0.1 <= usage.cpu_seconds <= 1.0
        assert not usage.oom_killed
        assert not usage.pids_limit_hit


class TestKill:
    def test_double_forked_setsid_grandchild_dies(self, backend: Backend, tasks: Tasks) -> None:
        """kill() kills a grandchild that double-forked and called setsid()."""
        cgroup = tasks.create()
        child = tasks.spawn(cgroup, """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(60)
    os._exit(0)
time.sleep(60)
""")
        pidfd = os.pidfd_open(int(_line(child)))
        try:
            cgroup.kill()
            assert select.select([pidfd], [], [], 0)[0] == [pidfd], "grandchild survived"
        finally:
            os.close(pidfd)
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert not cgroup.populated()

    def test_fork_bomb_dies(self, backend: Backend, tasks: Tasks) -> None:
        """kill() empties a cgroup where every process forks in a loop (bounded by pids)."""
        _needs_limits(backend)
        marker = f"forkbomb-{uuid.uuid4().hex}"
        cgroup = tasks.create(CgroupLimits(pids=32))
        tasks.spawn(cgroup, """
print('go', flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
""", marker)
        assert _line(tasks.children[-1]) == "go"
        time.sleep(0.3)
        started = time.monotonic()
        cgroup.kill()
        assert time.monotonic() - started < 5
        assert not cgroup.populated()
        assert _alive_with(marker) == []

    def test_fork_and_exit_chain_dies(self, backend: Backend, tasks: Tasks) -> None:
        """kill() catches a process that keeps forking and exiting, so its pid never stays."""
        marker = f"chain-{uuid.uuid4().hex}"
        cgroup = tasks.create()
        tasks.spawn(cgroup, """
print('go', flush=True)
while True:
    try:
        if os.fork() > 0:
            os._exit(0)
    except OSError:
        pass
""", marker)
        assert _line(tasks.children[-1]) == "go"
        time.sleep(0.3)
        cgroup.kill()
        assert not cgroup.populated()
        assert _alive_with(marker) == []

    def test_kill_of_an_empty_cgroup_returns(self, backend: Backend, tasks: Tasks) -> None:
        """kill() on a cgroup without processes returns at once."""
        cgroup = tasks.create()
        started = time.monotonic()
        cgroup.kill()
        assert time.monotonic() - started < 0.5


class TestRemove:
    def test_leaves_no_directory(self, backend: Backend, tasks: Tasks) -> None:
        """remove() kills the processes and removes the cgroup from every hierarchy; a second
        remove() is a no-op."""
        cgroup = tasks.create()
        sleeper = tasks.spawn(cgroup, "time.sleep(60)")
        dirs = _dirs(cgroup)
        assert all(os.path.isdir(d) for d in dirs)
        cgroup.remove()
        assert [d for d in dirs if os.path.exists(d)] == []
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        cgroup.remove()
        assert not cgroup.populated()


class TestCleanupStale:
    def test_new_driver_removes_leftovers(self, backend: Backend, tasks: Tasks) -> None:
        """A new driver's cleanup_stale() kills and removes task cgroups left by an old one."""
        left = tasks.create()
        sleeper = tasks.spawn(left, "time.sleep(60)")
        dirs = _dirs(left)
        assert backend.open().cleanup_stale() == [left.name]
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert [d for d in dirs if os.path.exists(d)] == []
        assert backend.open().cleanup_stale() == []


class TestCreate:
    def test_existing_name_is_refused(self, backend: Backend, tasks: Tasks) -> None:
        """create() of a name that exists fails and leaves the existing cgroup alone."""
        cgroup = tasks.create()
        with pytest.raises(FailedPrecondition, match=cgroup.name):
            tasks.driver.create(cgroup.name, CgroupLimits(pids=4))
        assert all(os.path.isdir(d) for d in _dirs(cgroup))

    @pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "cgroup.procs", "-x"])
    def test_bad_name_is_refused(self, backend: Backend, tasks: Tasks, name: str) -> None:
        """create() refuses a name that is not one plain path component."""
        with pytest.raises(InvalidArgument):
            tasks.driver.create(name, CgroupLimits())


class TestJoin:
    def test_child_joins_by_writing_zero(self, backend: Backend, tasks: Tasks) -> None:
        """A child that writes "0" into each of join_paths() is in the cgroup in every
        hierarchy, per /proc/<pid>/cgroup."""
        cgroup = tasks.create()
        child = tasks.start("import sys, time\n"
                            "for path in sys.argv[1:]:\n"
                            "    with open(path, 'w') as f:\n"
                            "        f.write('0')\n"
                            "print('joined', flush=True)\n"
                            "time.sleep(60)\n", *cgroup.join_paths())
        assert _line(child) == "joined"
        with open(f"/proc/{child.pid}/cgroup") as f:
            membership = [line.rstrip("\n").split(":", 2) for line in f]
        for directory in _dirs(cgroup):
            mount, fstype, options = _mount_of(directory)
            relative = directory[len(mount):]
            assert any(path == relative and (
                (fstype == "cgroup2" and listed == "")
                or (fstype == "cgroup" and listed and set(listed.split(",")) <= options))
                for _, listed, path in membership), (directory, membership)
        assert cgroup.populated()

    def test_populated_follows_the_processes(self, backend: Backend, tasks: Tasks) -> None:
        """populated() is true while a process is in the cgroup and false once it exits."""
        cgroup = tasks.create()
        assert not cgroup.populated()
        child = tasks.spawn(cgroup, "sys.stdin.readline()")
        assert cgroup.populated()
        assert child.stdin is not None
        child.stdin.write("exit\n")
        child.stdin.flush()
        assert child.wait(timeout=5) == 0
        deadline = time.monotonic() + 2
        while cgroup.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not cgroup.populated()


def _mount_of(directory: str) -> tuple[str, str, set[str]]:
    """The cgroup mount holding `directory`: mount point, fs type, super options."""
    best = ("", "", set[str]())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point, fstype = fields[4], fields[sep + 1]
            if fstype in ("cgroup", "cgroup2") and directory.startswith(point + "/") and len(
                    point) > len(best[0]):
                best = (point, fstype, set(fields[sep + 3].split(",")))
    return best


class TestCgroupLimits:
    def test_rejects_nonsense(self) -> None:
        """Limits that no cgroup can enforce are refused with InvalidArgument."""
        for bad in ({"memory_bytes": 0}, {"pids": 0}, {"cpu": 0.0}, {"cpu": float("nan")}):
            with pytest.raises(InvalidArgument):
                CgroupLimits(**bad)

    def test_from_worker_limits(self) -> None:
        """from_limits() takes the cgroup part of a worker's limits; the quota is per 100 ms."""
        limits = CgroupLimits.from_limits(Limits(memory_bytes=256 * MiB, pids=64, cpu=0.5))
        assert limits == CgroupLimits(memory_bytes=256 * MiB, pids=64, cpu=0.5)
        assert limits.cpu_quota_us() == 50_000
        assert CgroupLimits(cpu=0.001).cpu_quota_us() == 1000


class TestProbe:
    def test_unknown_backend_is_refused(self) -> None:
        """probe() refuses a backend name it does not know."""
        with pytest.raises(InvalidArgument, match="unknown cgroup backend"):
            probe(prefer="v3")

    def test_missing_root_is_named(self) -> None:
        """probe() on a path without cgroups raises Unavailable naming the path."""
        with pytest.raises(Unavailable, match="/nonexistent/cgroup"):
            probe(root="/nonexistent/cgroup")

    def test_v2_refusal_names_what_is_missing(self) -> None:
        """Where v2 is unusable, probe(prefer="v2") says why rather than falling back."""
        parent = f"agentd-test-{uuid.uuid4().hex[:12]}"
        try:
            driver = probe(prefer="v2", parent=parent)
        except Unavailable:
            pass
        else:
            _remove_parents([driver])
            pytest.skip("v2 is usable on this host")
        with pytest.raises(Unavailable, match=r"is not a cgroup2 mount|controllers"):
            probe(prefer="v2", parent=parent)


class TestV2DelegateLayout:
    def test_daemon_moves_to_a_leaf_and_workers_get_controllers(self) -> None:
        """Opened from inside a delegated cgroup that holds processes, the v2 backend moves
        them into <delegated>/daemon and enables controllers for workers/<task>."""
        # The delegated cgroup is made on a cgroup2 mount below /sys/fs/cgroup with any
        # controller (hugetlb on a hybrid host stands in for cpu/memory/pids), enabled on the
        # way down as systemd does for a Delegate=yes unit; the "service" is a subprocess.
        mounts = [h for h in find_hierarchies() if h.version == 2]
        if not mounts:
            pytest.skip("no cgroup2 mount")
        mount = mounts[0].mount
        with open(f"{mount}/cgroup.controllers") as f:
            available = f.read().split()
        if not available:
            pytest.skip(f"{mount} offers no controller to delegate")
        controller = "hugetlb" if "hugetlb" in available else available[0]
        top = f"/agentd-test-{uuid.uuid4().hex[:12]}"
        service = f"{top}/agentd.service"
        enabled_at_root = _enable(mount, controller)
        os.makedirs(f"{mount}{service}")
        try:
            _enable(f"{mount}{top}", controller)
            out = subprocess.run([sys.executable, "-c", _SERVICE, mount, service, controller],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert out.returncode == 0, out.stderr
            seen = json.loads(out.stdout)
        finally:
            for sub in ("workers/t-1", "workers", "daemon", ""):
                path = f"{mount}{service}/{sub}".rstrip("/")
                if os.path.isdir(path):
                    os.rmdir(path)
            os.rmdir(f"{mount}{top}")
            if enabled_at_root:
                with open(f"{mount}/cgroup.subtree_control", "w") as f:
                    f.write(f"-{controller}")
        assert seen["describe"]["parent"] == f"{mount}{service}"
        assert seen["describe"]["parent.workers"] == f"{mount}{service}/workers"
        assert seen["describe"]["daemon_leaf"] == f"{mount}{service}/daemon"
        assert seen["own"] == seen["launcher"] == f"{service}/daemon"
        assert controller in seen["service_subtree"]
        assert controller in seen["workers_subtree"]
        assert controller in seen["task_controllers"]
        assert seen["reopened"]["parent"] == f"{mount}{service}"
        assert seen["reopened"]["daemon_leaf"] == ""


def _enable(directory: str, controller: str) -> bool:
    """Enables `controller` in `directory`'s subtree_control; False if it already was."""
    with open(f"{directory}/cgroup.subtree_control") as f:
        if controller in f.read().split():
            return False
    with open(f"{directory}/cgroup.subtree_control", "w") as f:
        f.write(f"+{controller}")
    return True


# The "service" of TestV2DelegateLayout: joins the delegated cgroup as systemd would start
# it, starts a "launcher" there, then opens the v2 backend twice (the second time from inside
# the daemon leaf, as a restarted driver would) and reports what it sees as JSON.
_SERVICE = """
import json, os, subprocess, sys
from agentd.sandbox.cgroups import CgroupLimits, find_hierarchies
from agentd.sandbox.cgroups.v2 import V2Driver
mount, service, controller = sys.argv[1:]
with open(f"{mount}{service}/cgroup.procs", "w") as f:
    f.write("0")
launcher = subprocess.Popen(["sleep", "30"])
def cgroup_of(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        return next(l.split(":", 2)[2].strip() for l in f if l.startswith("0::"))
def read(path):
    with open(path) as f:
        return f.read().split()
try:
    driver = V2Driver.open(find_hierarchies(mount), root=mount, parent=None,
                           required=[controller])
    task = driver.create("t-1", CgroupLimits())
    reopened = V2Driver.open(find_hierarchies(mount), root=mount, parent=None,
                             required=[controller])
    seen = {"describe": driver.describe(), "reopened": reopened.describe(),
            "own": cgroup_of("self"), "launcher": cgroup_of(launcher.pid),
            "service_subtree": read(f"{mount}{service}/cgroup.subtree_control"),
            "workers_subtree": read(f"{mount}{service}/workers/cgroup.subtree_control"),
            "task_controllers": read(f"{mount}{service}/workers/t-1/cgroup.controllers")}
    task.remove()
finally:
    launcher.kill()
    launcher.wait()
print(json.dumps(seen))
"""
