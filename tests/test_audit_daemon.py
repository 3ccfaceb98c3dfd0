"""The audit log's promises, proven against the real daemon rather than the `AuditLog` class.

- kill -9 under load, repeated on one directory: every result a client received has its
  records in the log after the restart, which recovers by itself (cutting and recording a torn
  record) and verifies clean; no worker of the killed daemon survives the restart;
- a full disk (a small tmpfs of our own holding the log): the daemon fails closed with
  UNAVAILABLE saying why, runs no tool and keeps what it has until space is freed, then
  resumes within seconds and records that it did;
- group commit: concurrent tool calls share flushes.

How batches are seen in the files: a record's `time` is its batch's commit time
(`AuditLog._commit` takes one `record.now()` per batch and writes the batch with one write and
one fdatasync), so the number of distinct times is the number of flushed batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.audit import evidence, record, verify
from agentd.audit.segments import list_segments, segment_path
from agentd.audit.signing import HEADS_FILE
from tests.conftest import (
    DaemonHandle,
    daemon_base,
    execute,
    marked_processes,
    remove_cgroup_parents,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.privileged

# What a tool call is told when the audit log cannot be written: by the call whose record
# failed to be written, and by every call refused up front while the log is unhealthy.
# A call refused because the log cannot take its records; the reason follows in brackets.
REFUSED_PREFIX = "the audit log is not writable ("


# --- helpers ---------------------------------------------------------------------------------


def read_records(audit: Path) -> list[dict[str, Any]]:
    """Every complete record line of the segments, in file order."""
    return list(evidence.read_records(audit))


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def create_run(handle: DaemonHandle) -> str:
    with handle.channel() as channel:
        stub = agentd_pb2_grpc.AgentdStub(channel)
        return stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id


@dataclass
class Bed:
    """One test's daemon directory, its daemons and the marker its tools carry."""

    base: Path
    marker: str
    handles: list[DaemonHandle] = field(default_factory=list)

    @property
    def audit(self) -> Path:
        return self.base / "state" / "audit"

    def start(self) -> DaemonHandle:
        handle = start_daemon(self.base)
        self.handles.append(handle)
        return handle

    def kill_everything(self) -> None:
        """SIGKILLs this test's daemons still running and the tools carrying its marker."""
        for handle in self.handles:
            if handle.process.poll() is None:
                handle.process.kill()
                handle.process.wait()
        for pid in marked_processes(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not marked_processes(self.marker), 5)


@pytest.fixture
def bed() -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (namespaces, cgroups, mounts)")
    bed = Bed(daemon_base(), "agentd-audit-test-" + uuid.uuid4().hex)
    try:
        yield bed
    finally:
        bed.kill_everything()
        config = bed.base / "agentd.toml"
        if config.exists():
            # A killed task leaves its cgroup once reaped: retry a moment.
            for _ in range(3):
                remove_cgroup_parents(config)
                time.sleep(0.1)
        shutil.rmtree(bed.base, ignore_errors=True)


@pytest.fixture
def small_audit_fs(bed: Bed) -> Iterator[Bed]:
    """`bed` with a 2 MiB tmpfs of its own mounted at <base>/state/audit before any start."""
    bed.audit.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(bed.audit)],
                   check=True)
    try:
        yield bed
    finally:
        bed.kill_everything()  # no daemon may keep a file of the mount open
        if subprocess.run(["umount", str(bed.audit)], check=False).returncode:
            subprocess.run(["umount", "--lazy", str(bed.audit)], check=True)


# --- kill -9 under load ----------------------------------------------------------------------


class Load:
    """N client threads looping short Execs until the daemon dies, and one long task that is
    sure to be running at the kill; keeps every Outcome received, i.e. acknowledged, and the
    (run, step) each reported committed. Each thread works in a run of its own (a run takes
    one call at a time)."""

    LONG = "echo started; sleep 30"

    def __init__(self, handle: DaemonHandle, marker: str, clients: int) -> None:
        self.handle, self.marker = handle, marker
        self.long_run_id = ""
        self.acked: list[pb.Outcome] = []
        self.committed: list[tuple[str, int]] = []
        self.unexpected: list[str] = []
        self.codes_after_kill: list[grpc.StatusCode] = []
        self.killed = threading.Event()
        self.long_started = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._guard, args=(self._client, n))
                         for n in range(clients)]
        self._threads.append(threading.Thread(target=self._guard, args=(self._long, 0)))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client thread hangs after the daemon was killed"

    def _guard(self, body: Callable[[agentd_pb2_grpc.AgentdStub, int], None], n: int) -> None:
        try:
            with self.handle.channel() as channel:
                body(agentd_pb2_grpc.AgentdStub(channel), n)
        except grpc.RpcError as exc:
            with self._lock:
                if self.killed.is_set():
                    self.codes_after_kill.append(exc.code())
                else:
                    self.unexpected.append(f"before the kill: {exc.code()}: {exc.details()}")
        except BaseException as exc:  # a thread must not raise: report it to the test
            with self._lock:
                self.unexpected.append(repr(exc))

    def _client(self, stub: agentd_pb2_grpc.AgentdStub, n: int) -> None:
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        i = n
        while not self.killed.is_set():
            script = "sleep 0.05; echo x" if i % 3 == 0 else "echo x"
            result = execute(stub, run_id, ["/bin/sh", "-c", script, self.marker])
            assert result.outcome is not None
            with self._lock:
                self.acked.append(result.outcome)
                if result.outcome.committed:
                    self.committed.append((run_id, result.outcome.step))
            assert result.stdout == b"x\n", result.stdout
            assert result.outcome.committed, result.outcome.step_failure
            i += 1

    def _long(self, stub: agentd_pb2_grpc.AgentdStub, _: int) -> None:
        self.long_run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        call = stub.Exec(pb.ExecRequest(run_id=self.long_run_id,
                                        argv=["/bin/sh", "-c", self.LONG, self.marker],
                                        env={"FOO": self.marker}), timeout=60)
        for event in call:
            if self.long_started.is_set():
                raise AssertionError(f"the long task ended before the kill: {event}")
            assert event.output.data == b"started\n"
            self.long_started.set()
        raise AssertionError("the long task's call ended before the kill")


def check_cut(audit: Path, recovered: dict[str, Any]) -> None:
    """An audit.recovered record describes exactly what was cut, and the cut is kept."""
    details = recovered["details"]
    assert details
    assert set(details) <= {"segment", "tree_heads"}, details
    if "segment" in details:
        cut = details["segment"]
        assert cut["reason"] == "torn tail after a crash: bytes never acknowledged were cut"
        assert cut["first_index"] == recovered["index"]
        assert cut["saved_as"] == f"{cut['segment']}.torn-{cut['offset']}"
        torn = (audit / cut["saved_as"]).read_bytes()
        assert len(torn) == cut["bytes"] > 0
        assert hashlib.sha256(torn).hexdigest() == cut["sha256"]
        assert torn.count(b"\n") == cut["complete_lines"]
        # Nothing at or below the cut point was removed: whatever whole lines the cut held
        # carried indexes from the recovered record's on (the unflushed tail).
        for line in torn.split(b"\n")[:-1]:
            index = record.line_index(line)
            assert index is None or index >= cut["first_index"], line[:200]
        # The recovery record was written exactly where the cut was made.
        data = (audit / cut["segment"]).read_bytes()
        assert json.loads(data[cut["offset"]:].split(b"\n", 1)[0]) == recovered
    if "tree_heads" in details:
        cut = details["tree_heads"]
        assert cut["file"] == HEADS_FILE
        assert cut["saved_as"] == f"{HEADS_FILE}.torn-{cut['offset']}"
        torn = (audit / cut["saved_as"]).read_bytes()
        assert len(torn) == cut["bytes"] > 0
        assert b"\n" not in torn  # only a torn last head is ever cut
        assert hashlib.sha256(torn).hexdigest() == cut["sha256"]


def tear_tail(audit: Path, rng: random.Random) -> tuple[str, int, bytes]:
    """Leaves what a kill during a write leaves: the start of the next record, no newline.

    Returns (segment name, where the torn bytes start, the torn bytes)."""
    segment = segment_path(audit, list_segments(audit)[-1])
    data = segment.read_bytes()
    last = data[:-1].rsplit(b"\n", 1)[-1]
    following = json.loads(last)
    following.update(index=following["index"] + 1,
                     prev=hashlib.sha256(b"\x00" + last).hexdigest())
    line = record.canonical(following)
    torn = line[: rng.randint(1, len(line) - 1)]
    with open(segment, "ab") as f:
        f.write(torn)
    return segment.name, len(data), torn


class TestKillNineUnderLoad:
    ROUNDS = 6
    CLIENTS = 6

    def test_acknowledged_results_survive_repeated_kill_9(self, bed: Bed) -> None:
        """Six times on one directory: kill -9 the daemon at a random moment of concurrent
        Execs (every other time also leaving a torn record, as a kill mid-write would),
        restart it, and find the log recovered by itself, the cut recorded, the log clean and
        contiguous, every acknowledged result recorded, every step reported committed still
        committed (its record in the log, its run at that step or later), no worker of the
        killed daemon left."""
        seed = random.randrange(1 << 32)  # named in every failure, to replay a round
        rng = random.Random(seed)
        acked: list[pb.Outcome] = []
        committed: list[tuple[str, int]] = []
        handle = bed.start()
        for round_ in range(self.ROUNDS):
            where = f"round {round_} (seed {seed})"
            load = Load(handle, bed.marker, self.CLIENTS)
            began = time.monotonic()
            load.start()
            try:
                assert load.long_started.wait(10), f"{where}: the long task never started"
                time.sleep(max(0.0, began + rng.uniform(0.2, 1.5) - time.monotonic()))
            finally:
                load.killed.set()
                handle.process.kill()
                handle.process.wait(timeout=10)
                load.join()
            assert load.unexpected == [], f"{where}: {load.unexpected}"
            assert load.acked, f"{where}: no result was acknowledged before the kill"
            # Every call in flight, the long task's included, ends UNAVAILABLE for its client.
            assert set(load.codes_after_kill) == {grpc.StatusCode.UNAVAILABLE}
            acked += load.acked
            committed += load.committed
            torn = tear_tail(bed.audit, rng) if round_ % 2 else None

            handle = bed.start()  # recovers by itself, or this raises with the daemon's log
            self._check_log(bed, where, round_ + 2, load.long_run_id, acked, torn)
            self._check_steps(bed, handle, where, committed)
            assert wait_for(lambda: not marked_processes(bed.marker), 5), (
                f"{where}: processes of the killed daemon's tasks are left: "
                f"{marked_processes(bed.marker)}")

        assert stop_daemon(handle) == 0
        assert verify(bed.audit).ok
        assert marked_processes(bed.marker) == []
        assert len(acked) >= 5 * self.ROUNDS

    @staticmethod
    def _check_steps(bed: Bed, handle: DaemonHandle, where: str,
                     committed: list[tuple[str, int]]) -> None:
        """Every step a client was told was committed has its step.committing record (or
        step.unchanged, for one that changed nothing), and the
        restarted daemon has its run at that step or later (nothing rolls back)."""
        records = {(r["run_id"], r["details"]["step"]) for r in read_records(bed.audit)
                   if r["event"] in ("step.committing", "step.unchanged")}
        missing = sorted(set(committed) - records)
        assert missing == [], f"{where}: committed steps without a step.committing record"
        last: dict[str, int] = {}
        for run_id, step in committed:
            last[run_id] = max(step, last.get(run_id, 0))
        with handle.channel() as channel:
            stub = agentd_pb2_grpc.AgentdStub(channel)
            behind = {run_id: (step, stub.GetRun(pb.GetRunRequest(run_id=run_id)).step)
                      for run_id, step in last.items()}
        behind = {run_id: steps for run_id, steps in behind.items() if steps[1] < steps[0]}
        assert behind == {}, f"{where}: runs behind their acknowledged steps (acked, now)"

    @staticmethod
    def _check_log(bed: Bed, where: str, starts: int, long_run_id: str,
                   acked: list[pb.Outcome],
                   torn: tuple[str, int, bytes] | None) -> None:
        report = verify(bed.audit)
        assert report.ok, f"{where}: {[str(p) for p in report.problems[:3]]}"
        records = read_records(bed.audit)
        assert [r["index"] for r in records] == list(range(len(records))), (
            f"{where}: record indexes are not contiguous")
        by_task: dict[str, dict[str, dict[str, Any]]] = {}
        for rec in records:
            if rec["task_id"] is not None:
                by_task.setdefault(rec["task_id"], {})[rec["event"]] = rec
        for outcome in acked:
            events = by_task.get(outcome.task_id, {})
            assert "exec.exited" in events, (
                f"{where}: acknowledged task {outcome.task_id} has no exec.exited "
                f"record (it has {sorted(events)})")
            allowed, exited = events.get("exec.allowed"), events["exec.exited"]
            assert allowed is not None, f"{outcome.task_id}: exec.exited without exec.allowed"
            assert allowed["index"] < exited["index"]
            assert exited["details"]["exit_code"] == outcome.exit_code == 0
            assert exited["details"]["stdout_bytes"] == 2

        # The restart: its daemon.started comes last, after a recovery record if any; the long
        # task (allowed, never acknowledged) was found in its cgroup and removed.
        started = [r for r in records if r["event"] == "daemon.started"]
        assert len(started) == starts
        between = records[started[-2]["index"]:started[-1]["index"]]
        cuts = [r for r in between if r["event"] == record.RECOVERED]
        for rec in cuts:
            check_cut(bed.audit, rec)
        if torn is not None:
            name, offset, data = torn
            assert len(cuts) == 1, f"{where}: the torn record was not cut and recorded"
            cut = cuts[0]["details"]["segment"]
            assert (cut["segment"], cut["offset"], cut["bytes"], cut["complete_lines"]) == (
                name, offset, len(data), 0)
            assert (bed.audit / cut["saved_as"]).read_bytes() == data
        [long_task] = [r for r in records if r["event"] == "exec.allowed"
                       and r["run_id"] == long_run_id and r["details"]["argv"][2] == Load.LONG]
        assert "exec.exited" not in by_task[long_task["task_id"]]
        # Its cgroup (named by the task, or prebuilt-N for a warm-pool worker, as its
        # exec.allowed says) is among those the restart found and removed.
        cgroup = long_task["details"]["cgroup"]
        assert cgroup == long_task["task_id"] or cgroup.startswith("prebuilt-")
        assert cgroup in started[-1]["details"]["stale_cgroups_removed"]


# --- disk full -------------------------------------------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def fill(path: Path) -> None:
    """Writes to `path` until its filesystem has no free block left."""
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * PAGE)
    assert os.statvfs(path.parent).f_bfree == 0


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) of the error `call` ends with, None if it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return None


@dataclass
class Attempt:
    """What one Exec got: the output streamed to it, its outcome, the error it ended with."""

    stdout: bytes = b""
    outcome: pb.Outcome | None = None
    error: tuple[grpc.StatusCode, str] | None = None


def attempt(stub: agentd_pb2_grpc.AgentdStub, run_id: str, argv: list[str]) -> Attempt:
    """Runs one Exec and keeps whatever it got, an error included."""
    got = Attempt()
    try:
        for event in stub.Exec(pb.ExecRequest(run_id=run_id, argv=argv), timeout=60):
            if event.HasField("output"):
                got.stdout += event.output.data
            else:
                got.outcome = event.outcome
    except grpc.RpcError as exc:
        got.error = (exc.code(), exc.details() or "")
    return got


def state_files(bed: Bed) -> set[Path]:
    """Everything under <base>/state but the audit log and the database's own files: what
    runs and tool calls leave on disk."""
    state = bed.base / "state"
    return {p.relative_to(state) for p in state.rglob("*")
            if not p.is_relative_to(bed.audit) and not p.name.startswith("state.db")}


def refused_for_the_log(got: Attempt) -> bool:
    """The call was refused with UNAVAILABLE naming the audit log and why, and ran nothing."""
    return (got.stdout == b"" and got.error is not None
            and got.error[0] == grpc.StatusCode.UNAVAILABLE
            and got.error[1].startswith(REFUSED_PREFIX) and "free" in got.error[1])


class TestDiskFull:
    def test_fails_closed_and_resumes(self, small_audit_fs: Bed) -> None:
        """With the log's filesystem full, every call is refused with UNAVAILABLE saying why,
        no tool runs, nothing is written, the daemon stays up; freeing space resumes work
        within seconds, recorded as audit.resumed."""
        bed = small_audit_fs
        audit = bed.audit
        handle = bed.start()
        assert os.path.ismount(audit)
        run_id = create_run(handle)

        def say(word: str) -> list[str]:
            return ["/bin/sh", "-c", f"echo {word}", bed.marker]

        with handle.channel() as channel:
            stub = agentd_pb2_grpc.AgentdStub(channel)
            assert attempt(stub, run_id, say("before")).stdout == b"before\n"
            fill(audit / "filler")
            segments = {p.name: p.read_bytes() for p in audit.glob("audit-*.jsonl")}
            on_disk = state_files(bed)
            for i in range(3):
                got = attempt(stub, run_id, say(f"refused{i}"))
                assert refused_for_the_log(got), got
                time.sleep(0.5)  # the daemon's probe (every second) runs meanwhile
            created = status(lambda: stub.CreateRun(pb.CreateRunRequest(agent="integration")))
            assert created is not None
            assert created[0] == grpc.StatusCode.UNAVAILABLE, created
            assert created[1].startswith(REFUSED_PREFIX), created
            assert handle.process.poll() is None, "the daemon died on a full disk"
            assert {p.name: p.read_bytes() for p in audit.glob("audit-*.jsonl")} == segments
            assert state_files(bed) == on_disk
            assert marked_processes(bed.marker) == []

            (audit / "filler").unlink()
            freed = time.monotonic()
            while (got := attempt(stub, run_id, say("after"))).error is not None:
                assert refused_for_the_log(got), got
                assert time.monotonic() - freed < 5, "no resumption 5 s after space was freed"
                time.sleep(0.1)
            assert got.stdout == b"after\n"
            stub.CreateRun(pb.CreateRunRequest(agent="integration"))
        assert stop_daemon(handle) == 0

        report = verify(audit)
        assert report.ok, [str(p) for p in report.problems[:3]]
        for name, data in segments.items():
            assert (audit / name).read_bytes().startswith(data), f"{name} lost records"
        records = read_records(audit)
        [resumed] = [r for r in records if r["event"] == record.RESUMED]
        assert "free" in resumed["details"]["error"]
        assert resumed["details"]["failed_since"] <= resumed["time"]
        scripts = [r["details"]["argv"][2] for r in records if r["event"].startswith("exec.")
                   and len(r["details"].get("argv", ())) > 2]
        assert not [script for script in scripts if "refused" in script]
        ended = {r["task_id"] for r in records if r["event"] in ("exec.exited", "exec.cancelled")}
        assert [r for r in records if r["event"] == "exec.allowed"
                and r["task_id"] not in ended] == [], "a tool ran without its outcome on record"

    def test_create_run_refused_on_full_disk_leaves_nothing(self, small_audit_fs: Bed) -> None:
        """A CreateRun on a full log filesystem is refused with UNAVAILABLE saying why and
        leaves no run behind: nothing on disk, nothing listed."""
        bed = small_audit_fs
        handle = bed.start()
        run_id = create_run(handle)
        with handle.channel() as channel:
            stub = agentd_pb2_grpc.AgentdStub(channel)
            on_disk = state_files(bed)
            fill(bed.audit / "filler")
            created = status(lambda: stub.CreateRun(pb.CreateRunRequest(agent="integration")))
            assert created is not None
            assert created[0] == grpc.StatusCode.UNAVAILABLE, created
            (bed.audit / "filler").unlink()
            listed = [r.run_id for r in stub.ListRuns(pb.ListRunsRequest()).runs]
            left = sorted(map(str, state_files(bed) - on_disk))
        assert stop_daemon(handle) == 0
        assert verify(bed.audit).ok
        assert listed == [run_id]
        assert left == [], "a refused CreateRun left files behind"


# --- group commit ----------------------------------------------------------------------------


class TestGroupCommit:
    CALLS = 16
    # The daemon is stopped (SIGSTOP) while the sixteen calls are sent, and again while the
    # tasks end, then continued: the calls, then the exits, reach it at once, as under heavy
    # load. Left to themselves, calls a few milliseconds apart sometimes never meet a flush in
    # progress on an idle machine; every record is then rightly flushed alone, and the test
    # would flake.
    SCRIPT = "echo started; sleep 1; echo x"

    def test_concurrent_execs_share_flushes(self, bed: Bed) -> None:
        """Sixteen concurrent Execs write their records in fewer flushed batches than records
        (a batch is seen as the commit time its records share)."""
        handle = bed.start()
        runs = [create_run(handle) for _ in range(self.CALLS)]  # a run takes one call at a time
        started = threading.Semaphore(0)
        outcomes: list[pb.Outcome] = []
        failures: list[str] = []
        lock = threading.Lock()

        def call(run_id: str) -> None:
            events: list[pb.ExecEvent] = []
            try:
                with handle.channel() as channel:
                    stub = agentd_pb2_grpc.AgentdStub(channel)
                    for event in stub.Exec(pb.ExecRequest(
                            run_id=run_id, argv=["/bin/sh", "-c", self.SCRIPT, bed.marker]),
                            timeout=60):
                        events.append(event)
                        if len(events) == 1:
                            assert event.output.data == b"started\n"
                            started.release()
                assert events[-1].WhichOneof("event") == "outcome"
                assert events[-1].outcome.exit_code == 0
                with lock:
                    outcomes.append(events[-1].outcome)
            except BaseException as exc:  # a thread must not raise: report it to the test
                with lock:
                    failures.append(repr(exc))
                if not events:
                    started.release()  # the test must not wait for it

        threads = [threading.Thread(target=call, args=(run_id,)) for run_id in runs]
        handle.process.send_signal(signal.SIGSTOP)
        try:
            for thread in threads:
                thread.start()
            time.sleep(0.5)  # every call is sent, waiting for the stopped daemon
        finally:
            handle.process.send_signal(signal.SIGCONT)
        for _ in threads:
            assert started.acquire(timeout=30)
        handle.process.send_signal(signal.SIGSTOP)
        try:
            ended = wait_for(lambda: not marked_processes(bed.marker), 10)
        finally:
            handle.process.send_signal(signal.SIGCONT)
        assert ended, "the tasks did not end when told to"
        for thread in threads:
            thread.join(timeout=60)
        assert failures == []
        assert stop_daemon(handle) == 0
        assert verify(bed.audit).ok

        records = read_records(bed.audit)
        # A commit time names one batch: records sharing one are consecutive in the log.
        spans: dict[str, list[int]] = {}
        for rec in records:
            spans.setdefault(rec["time"], []).append(rec["index"])
        for indexes in spans.values():
            assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))
        tasks = {o.task_id for o in outcomes}
        ours = [r for r in records if r["task_id"] in tasks
                and r["event"] in ("exec.allowed", "exec.exited")]
        assert len(tasks) == self.CALLS
        assert sorted(r["event"] for r in ours) == sorted(
            ["exec.allowed", "exec.exited"] * self.CALLS)
        batches = {r["time"] for r in ours}
        assert len(batches) < len(ours), "every record was flushed in a batch of its own"
