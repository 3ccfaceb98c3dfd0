"""Output streams and the launcher under abuse, on real daemons: callers that never read,
more streams than worker slots, idle connections, and a launcher stopped with SIGSTOP.

Memory is asserted (daemon RSS growth), never time: latencies are printed for the report.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.api.limits import MAX_MESSAGE_BYTES
from agentd.scheduler.output import REPLY_OUTPUT_BYTES, CappedOutput
from agentd.scheduler.plan import MAX_TASKS
from tests.conftest import CONFIG, REPO, DaemonHandle, daemon_base, start_daemon, stop_daemon

Stub = agentd_pb2_grpc.AgentdStub

WORKERS = 8
STALLED = WORKERS - 1  # one slot is left for the other client
BEYOND = 3  # streams past max_concurrent_workers
IDLE = 8  # connections that never send anything
PRINT = 15 * 1024 * 1024  # what each stalled tool prints: just under the 16 MiB output limit


def config(launcher_timeout: float) -> str:
    return CONFIG.replace("tree_head_interval = 5.0", f"""tree_head_interval = 5.0
max_concurrent_workers = {WORKERS}
launcher_timeout_seconds = {launcher_timeout}""") + """
[agents.stream]
policy = "stream.yaml"
stage = "prototype"
"""


def start(launcher_timeout: float) -> DaemonHandle:
    base = daemon_base()
    policies = base / "policies"
    policies.mkdir()
    policy = (REPO / "tests" / "policy_cases" / "integration.yaml").read_text()
    policy = policy.replace("name: integration", "name: stream").replace(
        "output: 1MiB", "output: 16MiB").replace("wall_time: 30s", "wall_time: 60s")
    (policies / "stream.yaml").write_text(policy)
    return start_daemon(base, config(launcher_timeout))


@pytest.fixture(scope="module")
def slow_watchdog() -> Iterator[DaemonHandle]:
    """A daemon whose launcher watchdog is too slow to matter: the daemon's own wall time."""
    handle = start(launcher_timeout=600)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(handle.base, ignore_errors=True)


@pytest.fixture(scope="module")
def quick_watchdog() -> Iterator[DaemonHandle]:
    handle = start(launcher_timeout=1.5)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(handle.base, ignore_errors=True)


def new_run(stub: Stub) -> str:
    return stub.CreateRun(pb.CreateRunRequest(agent="stream")).run_id  # type: ignore[no-any-return]


def exec_request(run_id: str, script: str, timeout: float = 0.0) -> pb.ExecRequest:
    return pb.ExecRequest(run_id=run_id, argv=["/bin/sh", "-c", script],
                          timeout_seconds=timeout)


def outcome(stub: Stub, request: pb.ExecRequest) -> pb.Outcome:
    last = None
    for event in stub.Exec(request, timeout=120):
        last = event
    assert last is not None
    assert last.HasField("outcome")
    return last.outcome


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1)) * 1024


def launcher_pid(daemon: DaemonHandle) -> int:
    found = re.findall(r'"event": "launcher.started", "pid": (\d+)|'
                       r'"pid": (\d+)[^\n]*"event": "launcher.started"', daemon.log())
    assert found, daemon.log()
    pid = int(next(p for p in found[-1] if p))
    assert b"agentd.sandbox.launcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def wait_for(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


class TestBackpressure:
    def test_stalled_readers_do_not_grow_the_daemon_or_starve_others(
            self, slow_watchdog: DaemonHandle) -> None:
        """Callers that never read while their tools print 15 MiB each, IDLE connections that
        send nothing: another client's Exec beside STALLED of them completes; with every slot
        held, BEYOND more are refused at once (RESOURCE_EXHAUSTED); the daemon's RSS grows by
        little because the tools block in write(2)."""
        daemon = slow_watchdog
        stub = daemon.stub()
        pid = daemon.process.pid
        outcome(stub, exec_request(new_run(stub), "true"))  # warm: imports, first worker
        before = rss_bytes(pid)
        idle = []
        for _ in range(IDLE):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(daemon.socket()))
            idle.append(conn)
        channels = [daemon.channel() for _ in range(WORKERS)]
        marker = f"stalled-{os.getpid()}"

        def stall(channel: grpc.Channel) -> grpc.RpcContext:
            call = agentd_pb2_grpc.AgentdStub(channel).Exec(exec_request(
                new_run(stub), f"echo {marker}; head -c {PRINT} /dev/zero; echo done", 50),
                timeout=120)
            assert marker.encode() in next(call).output.data  # started; then no more reads
            return call

        stalled = [stall(ch) for ch in channels[:STALLED]]
        try:
            time.sleep(3)  # time for the tools to print everything, were nothing pushing back
            other = grpc.insecure_channel(f"unix:{daemon.socket()}")
            began = time.monotonic()
            result = outcome(agentd_pb2_grpc.AgentdStub(other), exec_request(
                new_run(stub), "echo other"))
            latency = time.monotonic() - began
            other.close()
            assert result.exited
            assert result.exit_code == 0
            stalled.append(stall(channels[STALLED]))  # now every worker slot is held
            refused = 0
            for _ in range(BEYOND):
                with pytest.raises(grpc.RpcError) as info:
                    outcome(stub, exec_request(new_run(stub), "true"))
                refused += info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused == BEYOND
            time.sleep(3)
            grown = rss_bytes(pid) - before
            print(f"\nRSS growth with {WORKERS} stalled streams: {grown / 2**20:.1f} MiB; "
                  f"other client's Exec beside {STALLED} of them: {latency * 1e3:.0f} ms")
            # Without backpressure each stalled stream holds its 15 MiB (and copies of it).
            assert grown < 64 * 2**20, f"daemon grew by {grown / 2**20:.1f} MiB"
            # A stalled stream resumes where it stopped: its output is whole once read.
            rest = b"".join(e.output.data for e in stalled[0] if e.HasField("output"))
            assert len(rest) == PRINT + len(b"done\n")
        finally:
            for call in stalled:
                call.cancel()
            for ch in channels:
                ch.close()
            for conn in idle:
                conn.close()

    def test_a_reading_client_gets_all_output_in_order(self, slow_watchdog: DaemonHandle
                                                       ) -> None:
        """Pausing and resuming the pipes loses and reorders nothing (and prints MB/s)."""
        stub = slow_watchdog.stub()
        count = 1_500_000  # about 10 MiB of numbered lines
        began = time.monotonic()
        data = b"".join(e.output.data for e in stub.Exec(exec_request(
            new_run(stub), f"seq 1 {count}"), timeout=120) if e.HasField("output"))
        took = time.monotonic() - began
        print(f"\nreading client: {len(data) / 2**20 / took:.1f} MiB/s")
        assert data.split(b"\n")[:-1] == [str(i).encode() for i in range(1, count + 1)]


class TestReplyCap:
    def test_unary_step_keeps_a_capped_prefix_with_a_marker(self, slow_watchdog: DaemonHandle
                                                            ) -> None:
        """A Step reply holds at most REPLY_OUTPUT_BYTES of a stream plus a marker saying how
        much more there was; the full 8 MiB would not fit the message limit of two tasks."""
        stub = slow_watchdog.stub()
        total = 8 * 2**20
        reply = stub.Step(pb.StepRequest(run_id=new_run(stub), tasks=[
            pb.TaskSpec(name="big", argv=["/bin/sh", "-c", f"head -c {total} /dev/zero"])]),
            timeout=120)
        out = reply.tasks[0].stdout
        assert out.startswith(b"\0" * REPLY_OUTPUT_BYTES)
        marker = f"[... {total - REPLY_OUTPUT_BYTES} bytes more, streamed ...]".encode()
        assert out[REPLY_OUTPUT_BYTES:].strip() == marker
        assert reply.tasks[0].outcome.stdout_bytes == total

    def test_chunks_across_the_cap(self) -> None:
        kept = CappedOutput(cap=5)
        for chunk in (b"abc", b"defg", b"", b"hij"):
            kept.add(chunk)
        assert kept.value() == b"abcde\n[... 5 bytes more, streamed ...]\n"
        exact = CappedOutput(cap=3)
        exact.add(b"abc")
        assert exact.value() == b"abc"

    def test_the_largest_reply_fits_the_message_limit(self) -> None:
        assert MAX_TASKS * 2 * (REPLY_OUTPUT_BYTES + 64) < MAX_MESSAGE_BYTES // 2


class TestStuckLauncher:
    def test_wall_time_is_enforced_without_the_launcher(self, slow_watchdog: DaemonHandle
                                                        ) -> None:
        """With the launcher stopped, a running tool's wall time still ends its step (the
        daemon kills the cgroup and, hearing nothing, reaps it); after SIGCONT the launcher's
        late report is ignored without a traceback."""
        daemon = slow_watchdog
        stub = daemon.stub()
        launcher = launcher_pid(daemon)
        calls = stub.Exec(exec_request(new_run(stub), "echo up; sleep 60", timeout=2),
                          timeout=120)
        assert next(calls).output.data == b"up\n"
        os.kill(launcher, signal.SIGSTOP)
        try:
            result = list(calls)[-1].outcome
        finally:
            os.kill(launcher, signal.SIGCONT)
        assert result.stop_reason == pb.STOP_REASON_TIMEOUT, result
        assert not result.exited
        wait_for(lambda: "launcher.late_message" in daemon.log())
        assert outcome(stub, exec_request(new_run(stub), "echo again")).exit_code == 0
        assert launcher_pid(daemon) == launcher  # it was slow, not replaced
        assert "InvalidStateError" not in daemon.log()
        assert "Traceback" not in daemon.log()

    def test_a_stopped_launcher_is_replaced_and_every_call_completes(
            self, quick_watchdog: DaemonHandle) -> None:
        """SIGSTOP the launcher while a step with a short wall time runs and new Execs arrive
        on other runs: the watchdog kills and replaces it; the running step ends (timeout or
        killed), each new call succeeds or fails UNAVAILABLE, and later calls succeed."""
        daemon = quick_watchdog
        stub = daemon.stub()
        old = launcher_pid(daemon)
        calls = stub.Exec(exec_request(new_run(stub), "echo up; sleep 60", timeout=3),
                          timeout=120)
        assert next(calls).output.data == b"up\n"
        os.kill(old, signal.SIGSTOP)
        results: dict[int, object] = {}

        def one(i: int) -> None:
            try:
                results[i] = outcome(stub, exec_request(new_run(stub), f"echo {i}"))
            except grpc.RpcError as exc:
                results[i] = exc.code()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        running = list(calls)[-1].outcome
        for thread in threads:
            thread.join(120)
        assert not running.exited, running
        assert running.signal == signal.SIGKILL, running
        for i, got in results.items():
            assert got == grpc.StatusCode.UNAVAILABLE or (
                isinstance(got, pb.Outcome) and got.stdout_bytes == len(f"{i}\n")), got
        assert len(results) == 3
        assert "launcher.unresponsive" in daemon.log()
        new = launcher_pid(daemon)
        assert new != old
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)  # SIGKILLed already: nothing is left to resume
        assert outcome(stub, exec_request(new_run(stub), "echo after")).exit_code == 0
        assert "InvalidStateError" not in daemon.log()
        assert "Traceback" not in daemon.log()
