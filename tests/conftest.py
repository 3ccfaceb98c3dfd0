"""Shared fixtures: the real daemon, started once per session on unix sockets in a tmp dir.

Integration tests talk gRPC to it exactly as a client would; nothing of the kernel is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc

REPO = Path(__file__).resolve().parent.parent

CONFIG = """
[daemon]
state_dir = "state"
runtime_dir = "run"
policy_dir = "policies"
log_format = "json"
log_level = "debug"
drain_seconds = 2.0
tree_head_interval = 5.0
# The tests request and approve as root on both sockets; TestApprovalIdentity runs daemons
# without this to check that approval needs another uid.
allow_self_approval = true
# Its own cgroup subtree: a daemon removes every task cgroup it finds under its parent at
# start, so daemons sharing one would kill each other's workers.
cgroup_parent = "agentd-test-{instance}"

[agents.integration]
policy = "integration.yaml"
stage = "prototype"

[agents.integration-userns]
policy = "integration.yaml"
stage = "production"

[agents.shell-helper]
policy = "shell-helper.yaml"
stage = "prototype"

[agents.cve-triage]
policy = "cve-triage.yaml"
stage = "prototype"
"""


@dataclass
class Result:
    """What one Exec streamed back."""

    stdout: bytes = b""
    stderr: bytes = b""
    events: list[pb.ExecEvent] = field(default_factory=list)
    outcome: pb.Outcome | None = None

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass
class DaemonHandle:
    base: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def socket(self, role: str = "client") -> Path:
        name = {"client": "agentd.sock", "approver": "agentd-approver.sock",
                "admin": "agentd-admin.sock"}[role]
        return self.base / "run" / name

    def channel(self, role: str = "client") -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.socket(role)}")

    def stub(self, role: str = "client") -> agentd_pb2_grpc.AgentdStub:
        return agentd_pb2_grpc.AgentdStub(self.channel(role))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# The suite's agents meet violations on purpose (the confinement battery runs at production):
# its daemons demote nobody. tests/test_stages.py replaces this block where it tests demotion.
TEST_GATES = """
gates:
  pilot:
    demote_on: []
  production:
    demote_on: []
"""


def write_daemon_dir(base: Path, config: str = CONFIG) -> Path:
    """A daemon directory: config, the repository's stage ceilings (without demotion, see
    TEST_GATES) and the test policies."""
    policies = base / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    stages = (REPO / "policies" / "stages.yaml").read_text()
    (policies / "stages.yaml").write_text(stages + TEST_GATES)
    for name in ("shell-helper.yaml", "cve-triage.yaml"):
        shutil.copy(REPO / "policies" / name, policies)
    shutil.copy(REPO / "tests" / "policy_cases" / "integration.yaml", policies)
    path = base / "agentd.toml"
    # Stable per directory: a daemon restarted on the same directory finds its own leftovers.
    instance = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:8]
    path.write_text(config.replace("{instance}", instance))
    return path


def remove_cgroup_parents(config_path: Path) -> None:
    """Removes the (empty) per-instance cgroup parents a test daemon made."""
    text = config_path.read_text()
    marker = 'cgroup_parent = "'
    if marker not in text:
        return
    name = text.split(marker, 1)[1].split('"', 1)[0]
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        mount = controllers.split(",")[0].removeprefix("name=") or "unified"
        for parent in (Path("/sys/fs/cgroup", mount, own.lstrip("/"), name),
                       Path("/sys/fs/cgroup", mount, name)):
            if parent.is_dir():
                for child in sorted(parent.glob("**/"), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        child.rmdir()


def start_daemon(base: Path, config: str = CONFIG, timeout: float = 30.0, *,
                 keep_files: bool = False, prefix: Sequence[str] = ()) -> DaemonHandle:
    """A daemon on `base`; with `keep_files`, on the config and policies already there (a
    restart that must see files a test changed). `prefix`: a command that execs the daemon's
    (tests/fake_internet.py's `trusting`), so that its pid is the daemon's."""
    config_path = base / "agentd.toml" if keep_files else write_daemon_dir(base, config)
    log_path = base / "daemon.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([*prefix, sys.executable, "-m", "agentd.daemon", "--config",
                                    str(config_path)], stdout=log_file, stderr=log_file)
    handle = DaemonHandle(base, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agentd exited with {process.returncode}:\n{handle.log()}")
        if handle.socket("admin").exists():
            try:
                grpc.channel_ready_future(handle.channel()).result(timeout=1)
                return handle
            except grpc.FutureTimeoutError:
                pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"agentd did not become ready in {timeout} s:\n{handle.log()}")


def stop_daemon(handle: DaemonHandle, sig: int = signal.SIGTERM) -> int:
    if handle.process.poll() is None:
        handle.process.send_signal(sig)
        try:
            handle.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            handle.process.kill()
            handle.process.wait()
    if sig != signal.SIGKILL:
        remove_cgroup_parents(handle.base / "agentd.toml")
    return handle.process.returncode


def marked_processes(marker: str) -> list[int]:
    """Pids of host processes whose command line or environment carries `marker`."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                if needle in Path(f"/proc/{entry}/{name}").read_bytes():
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def wait_until_gone(marker: str, timeout: float = 3.0) -> list[int]:
    """Waits for every process carrying `marker` to go; returns those still there."""
    deadline = time.monotonic() + timeout
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def daemon_base() -> Path:
    """A directory for a test daemon that an unprivileged uid can cross (pytest's are 0700):
    a worker in a user namespace reaches its mount points with no privilege over host inodes.
    """
    base = Path(tempfile.mkdtemp(prefix="agentd-test-"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="agentctl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonHandle]:
    if os.geteuid() != 0:
        pytest.fail("the integration tests need root (namespaces, cgroups, mounts)")
    base = daemon_base()
    handle = start_daemon(base)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def stub(daemon: DaemonHandle) -> agentd_pb2_grpc.AgentdStub:
    return daemon.stub()


@pytest.fixture
def run_id(stub: agentd_pb2_grpc.AgentdStub) -> Iterator[str]:
    """A fresh run of the `integration` agent, closed after the test."""
    run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
    yield run.run_id
    with contextlib.suppress(grpc.RpcError):
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))


def execute(stub: agentd_pb2_grpc.AgentdStub, run_id: str, argv: list[str], *,
            env: dict[str, str] | None = None, stdin: bytes = b"", cwd: str = "",
            timeout: float = 0.0) -> Result:
    """Runs one Exec to completion and gathers its stream."""
    result = Result()
    request = pb.ExecRequest(run_id=run_id, argv=argv, env=env or {}, stdin=stdin, cwd=cwd,
                             timeout_seconds=timeout)
    for event in stub.Exec(request, timeout=120):
        result.events.append(event)
        if event.HasField("output"):
            if event.output.stream == pb.STREAM_KIND_STDOUT:
                result.stdout += event.output.data
            else:
                result.stderr += event.output.data
        else:
            result.outcome = event.outcome
    assert result.outcome is not None, "the stream ended without an outcome"
    return result


def sh(stub: agentd_pb2_grpc.AgentdStub, run_id: str, script: str, **kwargs: object) -> Result:
    """Runs `/bin/sh -c script` in a worker."""
    return execute(stub, run_id, ["/bin/sh", "-c", script], **kwargs)  # type: ignore[arg-type]
