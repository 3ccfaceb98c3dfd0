"""Observability, against a real daemon: Prometheus metrics on the unix socket (and a loopback
address), `agentctl status`, and every state change logged with its caller."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.cli.main import main
from agentd.client import AgentdClient
from tests.conftest import (
    CONFIG,
    DaemonHandle,
    daemon_base,
    execute,
    sh,
    start_daemon,
    stop_daemon,
    write_daemon_dir,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = free_port()


@pytest.fixture(scope="module")
def handle() -> Iterator[DaemonHandle]:
    base = daemon_base()
    config = CONFIG.replace("[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{PORT}"\n', 1)
    daemon = start_daemon(base, config)
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(base, ignore_errors=True)


def scrape_unix(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agentd\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def log_events(handle: DaemonHandle, event: str) -> list[dict[str, object]]:
    found = []
    for line in handle.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


class TestMetrics:
    def test_an_exec_and_a_refusal_move_their_metrics(self, handle: DaemonHandle) -> None:
        """After one committed Exec that writes a file and one refused call, the unix socket's
        exposition has the spawn and step phases, the committed step, the refusal under its
        rule, the audit fsyncs, the worker limit and the run's workspace bytes."""
        metrics_socket = handle.base / "run" / "agentd-metrics.sock"
        assert metrics_socket.stat().st_mode & 0o777 == 0o660
        before = scrape_unix(metrics_socket)
        stub = handle.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        done = sh(stub, run_id, "head -c 100000 /dev/zero > big; echo ok")
        assert done.outcome is not None
        assert done.outcome.committed
        with pytest.raises(grpc.RpcError) as refused:
            execute(stub, run_id, ["/opt/not-granted"])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        rule = next(json.loads(line)["details"]["rule"] for line in _audit_lines(handle)
                    if '"exec.refused"' in line and run_id in line)
        assert rule

        deadline = time.monotonic() + 10
        while True:  # the workspace size is measured off the reply path
            after = scrape_unix(metrics_socket)
            if value(after, "agentd_workspace_bytes", run_id=run_id) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert value(after, "agentd_workspace_bytes", run_id=run_id) >= 100_000
        for phase in ("cgroup", "launch", "run", "cleanup"):
            assert value(after, "agentd_spawn_seconds_count", phase=phase) > \
                value(before, "agentd_spawn_seconds_count", phase=phase)
        for phase in ("tasks", "committed", "total"):
            assert value(after, "agentd_step_seconds_count", phase=phase) > \
                value(before, "agentd_step_seconds_count", phase=phase)
        assert value(after, "agentd_steps_total", state="committed") >= 1
        assert value(after, "agentd_refusals_total", rule=rule) == \
            value(before, "agentd_refusals_total", rule=rule) + 1
        assert value(after, "agentd_audit_fsync_seconds_count") > \
            value(before, "agentd_audit_fsync_seconds_count")
        assert value(after, "agentd_workers_limit") == 64
        assert value(after, "agentd_workers_in_use") == 0
        assert value(after, "agentd_audit_writable") == 1
        assert value(after, "agentd_state_free_bytes") > 0

        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        closed = scrape_unix(metrics_socket)
        assert ("agentd_workspace_bytes", (("run_id", run_id),)) not in samples(closed)

    def test_the_loopback_address_serves_the_same(self, handle: DaemonHandle) -> None:
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert "agentd_workers_limit" in body.decode()

    def test_a_non_loopback_address_is_refused_with_file_and_field(self,
                                                                  tmp_path: Path) -> None:
        config = write_daemon_dir(tmp_path, CONFIG.replace(
            "[daemon]\n", '[daemon]\nmetrics_listen = "0.0.0.0:9464"\n', 1))
        done = subprocess.run([sys.executable, "-m", "agentd.daemon", "--check", "--config",
                               str(config)], check=False, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        assert str(config) in done.stderr
        assert "daemon.metrics_listen" in done.stderr
        assert "not a loopback address" in done.stderr
        assert "Traceback" not in done.stderr


def _audit_lines(handle: DaemonHandle) -> list[str]:
    return [line for seg in sorted((handle.base / "state" / "audit").glob("audit-*.jsonl"))
            for line in seg.read_text().splitlines()]


class TestStatus:
    def test_status_shows_a_running_worker(self, handle: DaemonHandle,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        """While a task sleeps, status counts it; the human and JSON forms agree."""
        stub = handle.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        sleeper = threading.Thread(target=sh, args=(stub, run_id, "sleep 3"))
        sleeper.start()
        try:
            with AgentdClient(str(handle.socket())) as client:
                deadline = time.monotonic() + 10
                while client.status().workers_in_use < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                status = client.status()
            assert status.workers_in_use == 1
            assert status.max_workers == 64
            assert status.open_runs >= 1
            assert status.audit_writable
            assert status.audit_records > 0
            assert status.cgroup_backend in ("v1", "hybrid", "v2")
            assert status.state_free_bytes > 0
            assert status.state_reserve_bytes == 64 << 20
            assert main(["--socket", str(handle.socket()), "status", "--json"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert shown["workers_in_use"] == 1
            assert shown["metrics_listen"] == f"127.0.0.1:{PORT}"
            assert main(["--socket", str(handle.socket()), "status"]) == 0
            human = capsys.readouterr().out
            assert "workers:   1 of 64 in use" in human
            assert "audit:     writable" in human
        finally:
            sleeper.join()
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        with AgentdClient(str(handle.socket())) as client:
            assert client.status().workers_in_use == 0


class TestLogs:
    def test_every_state_change_is_logged_with_its_caller(self, handle: DaemonHandle) -> None:
        """A step, a rollback, a fork, a refusal and a close each leave a log line with the
        caller's uid (SO_PEERCRED), not only the exec events."""
        stub = handle.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        sh(stub, run_id, "echo a > a")
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=0))
        forked = stub.Fork(pb.ForkRequest(run_id=run_id, step=0)).run_id
        with pytest.raises(grpc.RpcError):
            execute(stub, run_id, ["/opt/not-granted"])
        stub.CloseRun(pb.CloseRunRequest(run_id=forked))
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        time.sleep(0.2)
        for event, key, wanted in (("step.committed", "run_id", run_id),
                                   ("run.rolled_back", "run_id", run_id),
                                   ("run.forked", "run_id", forked),
                                   ("step.refused", "run_id", run_id),
                                   ("run.closed", "run_id", run_id)):
            lines = [e for e in log_events(handle, event) if e.get(key) == wanted]
            assert lines, f"no {event} log line for {wanted}"
            assert lines[-1]["uid"] == 0, lines[-1]
