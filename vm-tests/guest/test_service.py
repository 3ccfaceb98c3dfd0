"""agentd as operators run it: the packaged units under systemd, on cgroup v2, driven only
through what an operator has (agentctl, systemctl, journalctl, /proc and /sys).

The classes run in file order and share the one service of this VM: the first one needs the
service not yet started (activation), later ones restart and stop it on purpose. Limits come
from the `e2e` agent's policy (vm-tests/guest/etc/e2e.yaml): 64 MiB, 32 pids, 0.5 cpu, 20 s.
"""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

UNIT = "agentd.service"
SOCKETS = ("agentd.socket", "agentd-approver.socket", "agentd-admin.socket")
CLIENT_SOCKET = "/run/agentd/agentd.sock"
AGENTCTL = "/usr/local/bin/agentctl"
CGROUP = Path("/sys/fs/cgroup/system.slice/agentd.service")
AUDIT_DIR = "/var/lib/agentd/audit"
MiB = 1 << 20

pytestmark = pytest.mark.timeout(240)


# --- helpers -----------------------------------------------------------------------------

def sh(*argv: str, check: bool = True, timeout: float = 120,
       user: str | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs a command, as `user` (with that user's groups) if given; output captured."""
    if user is not None:
        argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kw)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n"
                             f"stdout: {done.stdout}\nstderr: {done.stderr}")
    return done


def agentctl(*args: str, check: bool = True, timeout: float = 120,
             user: str | None = None) -> subprocess.CompletedProcess[str]:
    return sh(AGENTCTL, "--socket", CLIENT_SOCKET, *args, check=check, timeout=timeout,
              user=user)


def show(prop: str, unit: str = UNIT) -> str:
    return sh("systemctl", "show", "-P", prop, unit).stdout.strip()


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.2)


def pids_of(*argv: str) -> list[int]:
    """Processes whose command line is exactly `argv` (not agentctl, whose line contains it)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except OSError:
                pass  # exited meanwhile
    return found


def cgroup_of(pid: int) -> Path:
    line = Path(f"/proc/{pid}/cgroup").read_text().strip()  # "0::/system.slice/..."
    return Path("/sys/fs/cgroup" + line.split("::", 1)[1])


def cgroup_dirs() -> set[Path]:
    return {Path(root) for root, _, _ in os.walk(CGROUP)} if CGROUP.exists() else set()


def describe_cgroups() -> str:
    """The unit's cgroup tree with each cgroup's processes, for assertion messages."""
    lines = []
    for d in sorted(cgroup_dirs()):
        try:
            procs = (d / "cgroup.procs").read_text().split()
        except OSError as exc:
            procs = [str(exc)]
        cmds = []
        for pid in procs[:5]:
            try:
                cmds.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                            .decode(errors="replace").strip())
            except OSError:
                cmds.append(pid)
        lines.append(f"{d.relative_to(CGROUP.parent)}: {cmds}")
    return "\n".join(lines)


@pytest.fixture
def no_cgroup_left() -> Iterator[None]:
    """Fails the test if a cgroup below agentd's unit that it made outlives it."""
    before = cgroup_dirs()
    yield
    try:
        wait_until("the tool's cgroups to be removed", lambda: cgroup_dirs() <= before, 10)
    except AssertionError:
        raise AssertionError("cgroups left behind:\n" + describe_cgroups()) from None


def new_run(label: str = "") -> str:
    run_id = agentctl("run", "create", "--agent", "e2e", "--label", label).stdout.strip()
    assert run_id, "run create printed no id"
    return run_id


@pytest.fixture(scope="module")
def run_id() -> str:
    """One run of the e2e agent shared by the exec and limit tests."""
    return new_run("vm-suite")


class Background:
    """An `agentctl exec` left running, to act on the service while its tool runs."""

    def __init__(self, run: str, *cmd: str) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(
            [AGENTCTL, "--socket", CLIENT_SOCKET, "exec", run, "--", *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(f"the tool {cmd} to start", lambda: bool(pids_of(*cmd)), 60)
        self.pid = pids_of(*cmd)[0]

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


# --- the tests ---------------------------------------------------------------------------

class TestSocketActivation:
    def test_sockets_listen_before_the_service_runs(self) -> None:
        """At boot the three sockets are listening and agentd itself has not started."""
        for sock in SOCKETS:
            assert show("ActiveState", sock) == "active", sock
        assert show("ActiveState") == "inactive"

    def test_socket_modes_and_groups_carry_the_roles(self) -> None:
        """client and approver sockets are 0660 to their groups, admin is 0600 root."""
        expected = {"agentd.sock": (0o660, "agentd"),
                    "agentd-approver.sock": (0o660, "agentd-approvers"),
                    "agentd-admin.sock": (0o600, "root")}
        for name, (mode, group) in expected.items():
            st = os.stat(f"/run/agentd/{name}")
            assert (st.st_mode & 0o777, grp.getgrgid(st.st_gid).gr_name, st.st_uid) == \
                (mode, group, 0), name

    def test_first_connection_starts_the_service(self) -> None:
        """A client connecting to the socket activates agentd, which answers that call."""
        done = agentctl("run", "list", "--all", timeout=180)
        assert done.returncode == 0
        assert show("ActiveState") == "active"
        assert show("SubState") == "running"
        assert show("NRestarts") == "0"

    def test_ready_only_when_serving(self) -> None:
        """Type=notify: the daemon said READY=1 with its status text, and it is the main
        process (not a forked child) that systemd tracks."""
        assert show("Type") == "notify"
        assert show("StatusText") == "serving"
        main_pid = int(show("MainPID"))
        assert "agentd" in Path(f"/proc/{main_pid}/cmdline").read_text()

    def test_group_member_is_a_client(self) -> None:
        """A user in the agentd group may use the client socket..."""
        assert agentctl("run", "list", "--all", user="e2e-client").returncode == 0

    def test_others_are_refused_by_the_kernel(self) -> None:
        """...a user outside it cannot even connect, and nobody but root reaches admin."""
        done = agentctl("run", "list", user="nobody", check=False)
        assert done.returncode != 0
        done = sh(AGENTCTL, "--socket", "/run/agentd/agentd-admin.sock", "run", "list",
                  user="e2e-client", check=False)
        assert done.returncode != 0


@pytest.mark.usefixtures("no_cgroup_left")
class TestExec:
    def test_output_and_exit_code(self, run_id: str) -> None:
        """Exec streams the tool's output and agentctl exits with the tool's code."""
        done = agentctl("exec", run_id, "--", "/bin/echo", "hello from the vm")
        assert done.stdout == "hello from the vm\n"
        done = agentctl("exec", run_id, "--", "/bin/sh", "-c", "echo err >&2; exit 7",
                        check=False)
        assert (done.returncode, done.stderr.splitlines()[0]) == (7, "err")

    def test_worker_is_confined(self, run_id: str) -> None:
        """The tool runs as nobody, as pid 1 of its own pid namespace, without the host's
        files: the confinement is there when started by the real service."""
        script = 'id -u; echo $$; test -e /etc/agentd/agentd.toml && echo leak || echo ok'
        done = agentctl("exec", run_id, "--", "/bin/sh", "-c", script)
        uid, pid, leak = done.stdout.split()
        assert uid == "65534"
        assert int(pid) < 10
        assert leak == "ok"

    def test_workers_live_in_the_delegated_subtree(self, run_id: str) -> None:
        """A running tool's cgroup is below agentd's unit, in workers/, with the policy's
        memory, pids and cpu limits written by the cgroup v2 backend."""
        bg = Background(run_id, "/bin/sleep", "3.0101")
        group = cgroup_of(bg.pid)
        try:
            assert group.is_relative_to(CGROUP / "workers"), group
            task = group
            while task.parent != CGROUP / "workers":
                task = task.parent
            assert (task / "memory.max").read_text().strip() == str(64 * MiB)
            assert (task / "pids.max").read_text().strip() == "32"
            assert (task / "cpu.max").read_text().split() == ["50000", "100000"]
        finally:
            rc, _, err = bg.finish()
        assert rc == 0, err


@pytest.mark.usefixtures("no_cgroup_left")
class TestLimits:
    def test_memory_limit_kills_the_tool(self, run_id: str) -> None:
        """A tool allocating past 64 MiB is killed by the kernel, and agentctl says why."""
        done = agentctl("exec", run_id, "--", "/usr/bin/python3", "-c",
                        "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])",
                        check=False, timeout=180)
        assert done.returncode == 128 + signal.SIGKILL, done.stderr
        assert "memory" in done.stderr.lower()
        assert show("ActiveState") == "active"  # OOMPolicy=continue: the service goes on
        assert show("NRestarts") == "0"

    def test_pids_limit_stops_forks(self, run_id: str) -> None:
        """Past 32 processes forks fail; the tool goes on and the outcome says so."""
        script = ("n=0; for i in $(seq 1 60); do sleep 5 & n=$((n+1)); done 2>/dev/null; "
                  "kill $(jobs -p) 2>/dev/null; echo started")
        done = agentctl("exec", run_id, "--", "/bin/sh", "-c", script, check=False,
                        timeout=180)
        assert "pids" in done.stderr.lower(), done.stderr

    def test_cpu_limit_throttles(self, run_id: str) -> None:
        """A busy loop gets about half a core (cpu: 0.5), not the two the VM has."""
        prog = ("import os, time\nt = time.monotonic()\nwhile time.monotonic() - t < 4: pass\n"
                "c = os.times()\nprint((c.user + c.system) / (time.monotonic() - t))")
        done = agentctl("exec", run_id, "--", "/usr/bin/python3", "-c", prog, timeout=180)
        share = float(done.stdout.split()[-1])
        assert 0.2 < share < 0.75, share

    def test_timeout_kills_a_double_forked_tree(self, run_id: str) -> None:
        """On timeout the whole cgroup dies (cgroup.kill): a setsid'd, double-forked
        grandchild that left the tool's session is gone too, and so is its cgroup."""
        script = "(setsid /bin/sleep 301.5 &); exec /bin/sleep 302.5"
        started = time.monotonic()
        done = agentctl("exec", run_id, "--timeout", "3", "--", "/bin/sh", "-c", script,
                        check=False, timeout=120)
        assert time.monotonic() - started < 60
        assert done.returncode == 128 + signal.SIGKILL, done.stderr
        assert "time" in done.stderr.lower(), done.stderr
        wait_until("the tree to be gone",
                   lambda: not pids_of("/bin/sleep", "301.5")
                   and not pids_of("/bin/sleep", "302.5"), 10)
        # (no_cgroup_left checks that its cgroup is gone too)


class TestRestartAndStop:
    def test_restart_during_work_leaves_no_worker(self) -> None:
        """`systemctl restart` while a tool runs: the tool and its cgroup are gone, the
        daemon is back, and its workers/ holds no stale cgroup."""
        run = new_run("restart")
        idle = cgroup_dirs()
        bg = Background(run, "/bin/sleep", "303.5")
        task_group = cgroup_of(bg.pid)
        old_pid = show("MainPID")
        sh("systemctl", "restart", UNIT, timeout=120)
        rc, _, _ = bg.finish()
        assert rc != 0  # the call ended: stopped by the shutdown, or the connection dropped
        assert not pids_of("/bin/sleep", "303.5")
        assert not task_group.exists()
        assert show("ActiveState") == "active"
        assert show("MainPID") != old_pid
        assert cgroup_dirs() <= idle, describe_cgroups()
        assert not [d for d in (CGROUP / "workers").iterdir() if d.is_dir()], describe_cgroups()

    def test_stop_leaves_nothing_and_the_sockets(self) -> None:
        """`systemctl stop` with a tool running: nothing of the unit survives; the sockets
        stay, so the next caller starts agentd again."""
        run = new_run("stop")
        bg = Background(run, "/bin/sleep", "304.5")
        sh("systemctl", "stop", UNIT, timeout=120)
        bg.finish()
        assert show("ActiveState") == "inactive"
        assert not pids_of("/bin/sleep", "304.5")
        assert not CGROUP.exists() or not (CGROUP / "cgroup.procs").read_text().strip()
        for sock in SOCKETS:
            assert show("ActiveState", sock) == "active", sock

    def test_state_survives_stop_and_start(self) -> None:
        """Runs and their history survive a stop and a start; the audit log grows across
        it and verifies from its files alone."""
        run = new_run("persist")
        agentctl("exec", run, "--", "/bin/true")
        before = json.loads(agentctl("run", "show", run, "--json").stdout)
        sh("systemctl", "stop", UNIT, timeout=120)
        sh("systemctl", "start", UNIT, timeout=180)
        after = json.loads(agentctl("run", "show", run, "--json").stdout)
        assert after["run_id"] == run
        assert after["tasks_run"] == before["tasks_run"] >= 1
        listed = agentctl("run", "list", "--all", "--json").stdout
        assert run in {r["run_id"] for r in json.loads(listed)["runs"]}
        verify = sh(AGENTCTL, "audit", "verify", AUDIT_DIR, "--deep")
        assert verify.returncode == 0, verify.stdout + verify.stderr

    def test_socket_reactivates_after_stop(self) -> None:
        """After a stop, a connection starts agentd again (the restart is lazy)."""
        sh("systemctl", "stop", UNIT, timeout=120)
        agentctl("run", "list", "--all", timeout=180)
        assert show("ActiveState") == "active"


@pytest.fixture
def entries() -> list[dict[str, object]]:
    """This boot's journal entries of agentd.service."""
    done = sh("journalctl", "-u", UNIT, "-o", "json", "--no-pager", "-b")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


class TestJournal:
    def test_logs_are_structured(self, entries: list[dict[str, object]]) -> None:
        """agentd's lines in the journal are JSON objects with an event name."""
        messages = [e["MESSAGE"] for e in entries
                    if e.get("_SYSTEMD_UNIT") == UNIT and isinstance(e.get("MESSAGE"), str)]
        events = []
        for message in messages:
            assert isinstance(message, str)
            if message.startswith("{"):
                events.append(json.loads(message).get("event"))
        assert "agentd.ready" in events, messages[-20:]

    def test_watchdog_is_petted(self) -> None:
        """WatchdogSec=30s is in force and the daemon, up for longer than that, was never
        restarted by it."""
        assert show("WatchdogUSec") == "30s"
        entered = int(show("ActiveEnterTimestampMonotonic"))
        now = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        if now - entered < 35e6:
            time.sleep((35e6 - (now - entered)) / 1e6)
        assert show("ActiveState") == "active"
        assert show("NRestarts") == "0"
        log = sh("journalctl", "-u", UNIT, "--no-pager", "-b").stdout
        assert not re.search(r"[Ww]atchdog timeout", log)


class TestObservability:
    def test_status_and_metrics_under_systemd(self, run_id: str) -> None:
        """Under the real service: `agentctl status` reports the v2 backend and a writable
        audit log; the metrics socket is 0660 and serves the spawn histogram after an exec;
        agentd's mounts (uppers, a worker's root) live in its own mount namespace, never on
        the host."""
        status = json.loads(agentctl("status", "--json").stdout)
        assert status["cgroup_backend"] == "v2"
        assert status["audit_writable"] is True
        assert status["max_workers"] >= 1
        agentctl("exec", run_id, "--", "/bin/true")
        metrics = Path("/run/agentd/agentd-metrics.sock")
        assert metrics.stat().st_mode & 0o777 == 0o660
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(metrics))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agentd\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b'agentd_spawn_seconds_count{phase="launch"}' in data
        bg = Background(run_id, "/bin/sleep", "3.0202")
        try:
            main = show("MainPID")
            assert os.stat(f"/proc/{main}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
            assert "/var/lib/agentd/workspaces/" not in Path("/proc/self/mountinfo").read_text()
        finally:
            rc, _, err = bg.finish()
        assert rc == 0, err

    def test_cold_workers_are_cloned_into_their_cgroup(self, run_id: str) -> None:
        """On cgroup v2 the launcher clones a cold worker straight into its cgroup (clone3
        CLONE_INTO_CGROUP: no cgroup.procs write); agentd_spawns_total counts it so. (This
        VM's 6.1 kernel has no `lowerdir+`, so it has no warm pool: every worker is cold.)"""
        agentctl("exec", run_id, "--", "/bin/true")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect("/run/agentd/agentd-metrics.sock")
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agentd\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        found = re.search(rb'agentd_spawns_total\{how="cold_into_cgroup"\} ([0-9.e+]+)', data)
        assert found is not None, data[-2000:]
        assert float(found.group(1)) >= 1
        assert b'agentd_spawns_total{how="cold"}' not in data
        log = sh("journalctl", "-u", UNIT, "--no-pager", "-b").stdout
        assert "clone_into_cgroup_off" not in log


class TestReload:
    def test_systemctl_reload_reloads_policies_in_place(self) -> None:
        """`systemctl reload agentd` (ExecReload: SIGHUP) reads every policy again without a
        restart: the same main pid, and the reload in the journal."""
        before = show("MainPID")
        sh("systemctl", "reload", UNIT, timeout=120)
        deadline = time.monotonic() + 60
        log = ""
        while time.monotonic() < deadline:
            log = sh("journalctl", "-u", UNIT, "--no-pager", "-b").stdout
            if "policy.reloaded" in log:
                break
            time.sleep(0.5)
        assert "policy.reloaded" in log
        assert show("MainPID") == before
        assert show("ActiveState") == "active"
