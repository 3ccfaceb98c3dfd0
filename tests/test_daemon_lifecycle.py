"""The daemon's life as an operator sees it: start, SIGTERM, SIGKILL, restart, bad configs.

Each test starts its own daemon (`start_daemon`) in a temporary directory, with its own
cgroup parent (`agentd-test-<hex>`), so that the start-up cleanup of stale cgroups of one
daemon never touches the task cgroups of another daemon running on the host (the session
daemon, or another developer's test run). Teardown kills what a failed test left behind
(only processes carrying the test's own marker) and removes that cgroup parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.sandbox.cgroups import find_hierarchies
from tests.conftest import (
    CONFIG,
    DaemonHandle,
    marked_processes,
    sh,
    start_daemon,
    stop_daemon,
    write_daemon_dir,
)

pytestmark = pytest.mark.privileged

# A tool that writes a file in /workspace, double-forks and setsid()s a grandchild, then
# sleeps: after "started" the file is in the task's upper and the grandchild exists, in a
# session of its own, reparented to the tool (pid 1 of its namespace).
DOUBLE_FORK = """
import os, sys, time
with open("/workspace/half-applied", "w") as f:
    f.write("never committed")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
        os._exit(0)
    os._exit(0)
os.wait()
print("started", flush=True)
time.sleep(300)
"""


# --- helpers ---------------------------------------------------------------------------------


def agentd_command() -> list[str]:
    """The installed `agentd` entry point, or the module when it is not installed."""
    script = Path(sys.executable).parent / "agentd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agentd.daemon"]


def command_of(pid: int) -> str:
    """argv[0] of `pid`, or "" if it has gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def wait_for(condition: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def log_events(handle: DaemonHandle, name: str) -> list[dict[str, Any]]:
    """The daemon log's JSON events called `name`, oldest first."""
    found = []
    for line in handle.log().splitlines():
        if f'"{name}"' in line:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
    return found


def audit_records(base: Path) -> list[dict[str, Any]]:
    records = []
    for segment in sorted((base / "state" / "audit").glob("audit-*.jsonl")):
        records += [json.loads(line) for line in segment.read_text().splitlines() if line]
    return records


def cgroup_parents(handle: DaemonHandle) -> list[Path]:
    """agentd's parent cgroup directories, from the `cgroups` field of agentd.ready."""
    ready = log_events(handle, "agentd.ready")
    assert ready, "the daemon log has no agentd.ready event"
    return [Path(v) for k, v in ready[-1]["cgroups"].items() if k.startswith("parent.")]


def task_cgroups(parents: list[Path], task_id: str) -> list[Path]:
    """The task's cgroup directories that exist (v1: parent/task, v2: parent/workers/task)."""
    return [d for p in parents for d in (p / task_id, p / "workers" / task_id) if d.exists()]


def mounts_under(base: Path, pid: str = "self") -> list[str]:
    """Mount points under `base` in the mount namespace of process `pid`."""
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(str(base))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class Bed:
    """One test's daemon directory, config, marker and cgroup parent."""

    base: Path
    config: str
    marker: str
    cgroup_parent: str
    handles: list[DaemonHandle]

    def start(self) -> DaemonHandle:
        handle = start_daemon(self.base, self.config)
        self.handles.append(handle)
        return handle


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.fail("the lifecycle tests need root (namespaces, cgroups, mounts)")
    name = "agentd-test-" + uuid.uuid4().hex[:12]
    config = re.sub(r'(?m)^cgroup_parent = ".*"\n', "", CONFIG)
    config = config.replace("[daemon]\n", f'[daemon]\ncgroup_parent = "{name}"\n', 1)
    bed = Bed(tmp_path / "agentd", config, "agentd-marker-" + uuid.uuid4().hex, name, [])
    bed.base.mkdir()
    yield bed
    for handle in bed.handles:
        if handle.process.poll() is None:
            stop_daemon(handle, signal.SIGKILL)
    # Only processes that carry this test's marker: the tools this test started.
    for pid in marked_processes(bed.marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not marked_processes(bed.marker), 5)
    # A killed orphan stays in its cgroup until the host's init reaps it: retry a while.
    wait_for(lambda: remove_cgroups(own_cgroup_dirs(name)), 5)


def own_cgroup_dirs(name: str) -> list[Path]:
    """Where a daemon of this process with cgroup_parent `name` puts its parent cgroups: the
    relative parent is resolved against this process's own cgroup in every hierarchy."""
    return [Path(h.directory(h.own)) / name for h in find_hierarchies() if h.own is not None]


def remove_cgroups(parents: list[Path]) -> bool:
    """rmdir of `parents` and every cgroup below them, deepest first; True once all are gone."""
    for parent in parents:
        for child in sorted(parent.glob("**/"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                child.rmdir()
    return not any(p.exists() for p in parents)


def start_long_exec(handle: DaemonHandle, run_id: str, argv: list[str], marker: str
                    ) -> tuple[Any, str]:
    """Starts an Exec that prints "started" and runs on; returns (the call, its task id).

    The call is the stream's iterator, positioned after "started"."""
    call = handle.stub().Exec(pb.ExecRequest(run_id=run_id, argv=argv, env={"FOO": marker}),
                              timeout=60)
    first = next(call)
    assert first.output.data == b"started\n"
    allowed = [r for r in audit_records(handle.base)
               if r["event"] == "exec.allowed" and r["run_id"] == run_id]
    assert len(allowed) == 1
    return call, allowed[0]["task_id"]


# --- SIGTERM ---------------------------------------------------------------------------------


class TestSigterm:
    def test_sigterm_during_exec_drains(self, bed: Bed) -> None:
        """SIGTERM ends a running Exec with a SHUTDOWN outcome and its step failed, uncommitted,
        leaves no process, no task cgroup and no upper, stops the launcher and the daemon exits
        0 having recorded the failed step and then the stop."""
        handle = bed.start()
        launcher = log_events(handle, "agentd.ready")[0]["launcher_pid"]
        parents = cgroup_parents(handle)
        assert set(parents) <= set(own_cgroup_dirs(bed.cgroup_parent))
        run = handle.stub().CreateRun(pb.CreateRunRequest(agent="integration"))
        call, task_id = start_long_exec(
            handle, run.run_id, ["/bin/sh", "-c", "echo started; sleep 300 & sleep 300",
                                 bed.marker], bed.marker)
        # "started" comes before the shell forks its two sleeps: wait for both.
        assert wait_for(lambda: len(marked_processes(bed.marker)) >= 2, 5)
        assert task_cgroups(parents, task_id)

        handle.process.send_signal(signal.SIGTERM)
        rest = list(call)  # raises if the RPC ends with an error status
        assert call.code() == grpc.StatusCode.OK
        assert [e.WhichOneof("event") for e in rest] == ["outcome"]
        outcome = rest[0].outcome
        assert outcome.stop_reason == pb.STOP_REASON_SHUTDOWN
        assert outcome.task_id == task_id
        assert not outcome.exited
        assert outcome.signal == 9
        assert not outcome.committed
        assert "shutdown" in outcome.step_failure

        assert handle.process.wait(timeout=15) == 0
        assert marked_processes(bed.marker) == []
        assert task_cgroups(parents, task_id) == []
        assert wait_for(lambda: not alive(launcher), 5), "the launcher outlived the daemon"
        assert not handle.socket("client").exists()
        assert log_events(handle, "agentd.stopped")[-1]["killed"] == 1
        records = audit_records(bed.base)
        exited = [r for r in records if r["event"] == "exec.exited" and r["task_id"] == task_id]
        assert exited[0]["details"]["stop_reason"] == "shutdown"
        assert [r["details"]["step"] for r in records if r["event"] == "step.failed"
                and r["run_id"] == run.run_id] == [1]
        assert not [r for r in records if r["event"] == "step.committing"]
        assert records[-1]["event"] == "daemon.stopped"
        uppers = bed.base / "state" / "workspaces" / "uppers"
        assert not (uppers / f"{run.run_id}.{task_id}").exists()
        assert mounts_under(bed.base) == []

    def test_a_step_queued_behind_a_drained_one_never_runs(self, bed: Bed) -> None:
        """A step waiting its turn when SIGTERM comes is refused (UNAVAILABLE) once the turn
        is its own: the drain killed the running step, and nothing queued starts after it."""
        handle = bed.start()
        stub = handle.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        call, _ = start_long_exec(handle, run.run_id, ["/bin/sh", "-c",
                                                       "echo started; sleep 300", bed.marker],
                                  bed.marker)
        queued = stub.Step.future(pb.StepRequest(run_id=run.run_id, tasks=[pb.TaskSpec(
            name="late", argv=["/bin/sh", "-c", "echo late > late"])]), timeout=60)
        assert wait_for(lambda: log_events(handle, "step.queued"), 10)
        handle.process.send_signal(signal.SIGTERM)
        list(call)
        with pytest.raises(grpc.RpcError) as refused:
            queued.result()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert handle.process.wait(timeout=15) == 0
        records = audit_records(bed.base)
        assert [r["details"]["step"] for r in records if r["event"] == "step.started"
                and r["run_id"] == run.run_id] == [1]

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_idle_daemon_stops_cleanly(self, bed: Bed, sig: signal.Signals) -> None:
        """An idle daemon stops on SIGTERM or SIGINT within a second or two, exit status 0."""
        handle = bed.start()
        started = time.monotonic()
        handle.process.send_signal(sig)
        assert handle.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
        assert "Traceback" not in handle.log()


# --- SIGKILL and restart ---------------------------------------------------------------------


def kill_during_double_fork(bed: Bed) -> tuple[DaemonHandle, str, str, list[Path]]:
    """Starts a daemon and the DOUBLE_FORK tool, then SIGKILLs the daemon mid-Exec.

    Returns (handle, run_id, task_id, cgroup parents)."""
    handle = bed.start()
    parents = cgroup_parents(handle)
    run = handle.stub().CreateRun(pb.CreateRunRequest(agent="integration"))
    call, task_id = start_long_exec(
        handle, run.run_id, ["/usr/bin/python3", "-c", DOUBLE_FORK, bed.marker], bed.marker)
    assert len(marked_processes(bed.marker)) == 2  # the tool and its setsid()'d grandchild
    # The running task's upper is a mount, made in the daemon's own mount namespace only.
    upper = bed.base / "state" / "workspaces" / "uppers" / f"{run.run_id}.{task_id}"
    assert str(upper) in mounts_under(bed.base, str(handle.process.pid))
    assert mounts_under(bed.base) == []
    handle.process.send_signal(signal.SIGKILL)
    handle.process.wait(timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    return handle, run.run_id, task_id, parents


class TestSigkill:
    def test_sigkill_leaves_no_process_of_the_task(self, bed: Bed) -> None:
        """SIGKILL of the daemon takes the launcher and, within seconds, every process of a
        running task with it, a double-forked setsid()'d grandchild included."""
        handle, _, _, _ = kill_during_double_fork(bed)
        launcher = log_events(handle, "agentd.ready")[0]["launcher_pid"]
        assert wait_for(lambda: not alive(launcher), 3), "the launcher survived the daemon"
        wait_for(lambda: not marked_processes(bed.marker), 3)
        survivors = {pid: command_of(pid) for pid in marked_processes(bed.marker)}
        assert survivors == {}, "processes of the task survived the daemon by 3 s"
        assert mounts_under(bed.base) == [], "a mount of the daemon survived it on the host"

    def test_restart_cleans_up_and_serves(self, bed: Bed) -> None:
        """A new daemon on the same directory removes the stale task cgroup (and kills what
        is in it), records the interrupted step as failed with nothing of it applied (the
        file its tool wrote is not in the workspace, its upper is gone), serves Exec again,
        and still lists the runs created before."""
        _, run_id, task_id, parents = kill_during_double_fork(bed)
        second = bed.start()
        assert cgroup_parents(second) == parents
        recovered = log_events(second, "agentd.recovered")
        assert recovered, "the restarted daemon did not report a recovery"
        assert task_id in recovered[-1]["stale_cgroups_removed"]
        assert task_cgroups(parents, task_id) == []
        assert wait_for(lambda: not marked_processes(bed.marker), 3)
        started = [r for r in audit_records(bed.base) if r["event"] == "daemon.started"]
        assert len(started) == 2
        assert task_id in started[-1]["details"]["stale_cgroups_removed"]

        assert started[-1]["details"]["recovered"]["interrupted_steps"] == [
            {"run_id": run_id, "step": 1}]
        uppers = bed.base / "state" / "workspaces" / "uppers"
        assert not (uppers / f"{run_id}.{task_id}").exists()
        assert mounts_under(bed.base, str(second.process.pid)) == []

        stub = second.stub()
        runs = stub.ListRuns(pb.ListRunsRequest()).runs
        assert run_id in {r.run_id for r in runs}
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        assert (run.tasks_run, run.step) == (1, 0)
        [interrupted] = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps
        assert (interrupted.step, interrupted.state) == (1, pb.STEP_STATE_FAILED)
        assert "daemon stopped" in interrupted.reason
        assert os.listdir(run.workspace) == []
        result = sh(stub, run_id, "echo back; test -e half-applied || echo absent; touch new")
        assert result.stdout == b"back\nabsent\n"
        assert result.outcome is not None
        assert result.outcome.exit_code == 0
        assert (result.outcome.committed, result.outcome.step) == (True, 1)
        assert stop_daemon(second) == 0


# --- configuration errors --------------------------------------------------------------------


def run_agentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*agentd_command(), *args], capture_output=True, text=True,
                          timeout=30, check=False)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, one line on stderr starting "agentd: " holding each of `expected`, no trace."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("agentd: ")
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` that contains `text`."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


class TestConfigErrors:
    @pytest.fixture
    def directory(self, tmp_path: Path) -> Path:
        write_daemon_dir(tmp_path)
        return tmp_path

    def assert_nothing_started(self, directory: Path) -> None:
        assert not (directory / "run").exists(), "a bad config still created the runtime dir"
        assert not (directory / "state").exists(), "a bad config still created the state dir"

    def test_unknown_config_key(self, directory: Path) -> None:
        """An unknown key in the config stops the start with exit 2, naming file and key."""
        config = directory / "agentd.toml"
        config.write_text(CONFIG.replace("[daemon]\n", "[daemon]\nstate_dri = \"x\"\n", 1))
        assert_clean_failure(run_agentd("--config", str(config)), str(config),
                             "daemon.state_dri")
        self.assert_nothing_started(directory)

    def test_unknown_stage_in_config(self, directory: Path) -> None:
        """An agent at a stage that does not exist stops the start, naming the agent."""
        config = directory / "agentd.toml"
        config.write_text(CONFIG.replace('stage = "production"', 'stage = "prod"'))
        assert_clean_failure(run_agentd("--config", str(config)), str(config),
                             "agents.integration-userns.stage")
        self.assert_nothing_started(directory)

    def test_policy_error_names_file_and_line(self, directory: Path) -> None:
        """A policy with an unknown field stops the start, naming the policy file and line."""
        policy = directory / "policies" / "integration.yaml"
        policy.write_text(policy.read_text().replace("      pids: 32", "      pidz: 32"))
        line = line_of(policy, "pidz")
        message = assert_clean_failure(run_agentd("--config", str(directory / "agentd.toml")),
                                       f"{policy}:{line}:", "pidz")
        assert "pids" in message  # the suggestion
        self.assert_nothing_started(directory)

    def test_unknown_stage_in_policy_names_file_and_line(self, directory: Path) -> None:
        """A policy section for a stage that does not exist is refused with its line."""
        policy = directory / "policies" / "integration.yaml"
        policy.write_text(policy.read_text().replace("  production:", "  produktion:"))
        line = line_of(policy, "produktion:")
        assert_clean_failure(run_agentd("--config", str(directory / "agentd.toml")),
                             f"{policy}:{line}:", "produktion")
        self.assert_nothing_started(directory)

    def test_policy_yaml_syntax_error(self, directory: Path) -> None:
        """A policy that is not YAML is refused naming the file and a line."""
        policy = directory / "policies" / "integration.yaml"
        policy.write_text("apiVersion: agentd/v1\nkind: Policy\nstages: [\n")
        message = assert_clean_failure(run_agentd("--config", str(directory / "agentd.toml")),
                                       str(policy))
        assert re.search(re.escape(str(policy)) + r":\d+:", message)

    def test_missing_policy_file(self, directory: Path) -> None:
        """A config naming a policy file that does not exist is refused naming that file."""
        (directory / "policies" / "cve-triage.yaml").unlink()
        assert_clean_failure(run_agentd("--config", str(directory / "agentd.toml")),
                             str(directory / "policies" / "cve-triage.yaml"))

    def test_missing_config_file(self, tmp_path: Path) -> None:
        """A config path that does not exist is refused naming it."""
        missing = tmp_path / "absent.toml"
        assert_clean_failure(run_agentd("--config", str(missing)), str(missing), "not found")

    def test_toml_syntax_error(self, directory: Path) -> None:
        """A config that is not TOML is refused naming the file and the line."""
        config = directory / "agentd.toml"
        config.write_text("[daemon]\nstate_dir = \n")
        assert_clean_failure(run_agentd("--config", str(config)), str(config), "line 2")

    def test_check_of_a_good_config_prints_ok(self, directory: Path) -> None:
        """`agentd --check` on a good config prints "<config>: ok" and exits 0, starting
        nothing."""
        config = directory / "agentd.toml"
        result = run_agentd("--check", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{config}: ok\n"
        self.assert_nothing_started(directory)

    def test_check_of_a_bad_policy_fails(self, directory: Path) -> None:
        """`agentd --check` validates every agent's policy: a bad one is exit 2 with its line."""
        policy = directory / "policies" / "integration.yaml"
        policy.write_text(policy.read_text().replace("      pids: 32", "      pidz: 32"))
        line = line_of(policy, "pidz")
        result = run_agentd("--check", "--config", str(directory / "agentd.toml"))
        assert_clean_failure(result, f"{policy}:{line}:")
        assert "ok" not in result.stdout
