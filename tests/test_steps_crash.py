"""kill -9 of the daemon at random moments of steps, then restart: nothing half-applied, nothing
left behind, and the runs go on.

One daemon directory for the whole suite. Each round launches one step on each of two runs,
in threads (2-4 tasks writing files and channels, some sleeping, one replacing a directory
of 300 files so that commits take a while; now and then a step that fails or conflicts),
kills the daemon with SIGKILL 0-300 ms later (or, in half the rounds, within 30 ms of one
step's tasks all ending, to hit the barrier and the commit), restarts it on the same directory
and checks:

- every run is at its last checkpoint, and that checkpoint is what the committed steps made:
  a model of each run (files and channel values) is advanced only by a reply that said
  COMMITTED; for a step whose reply was lost to the kill the run is either exactly before
  it or exactly after it (files compared by content, so a mix of the two is caught), and
  the model follows what the daemon says it committed;
- no step attempt is left running, no upper under `<state>/workspaces/uppers`, no `.tmp-*` or
  `.del-*` and no unreferenced layer under `layers/`, no task cgroup under this daemon's
  cgroup parent, no process of a task (each carries a marker in its argv), no mount of the
  directory in the host's mount namespace;
- the audit log verifies from its files (`agentd.audit.verify`);
- each run accepts a new step, whose tasks read exactly the model's channel values.

ROUNDS kills here; `tests/soak_steps.py --kills N` runs the same rounds for longer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tarfile
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
from agentd.audit.verify import verify
from tests.conftest import (
    DaemonHandle,
    daemon_base,
    marked_processes,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.privileged

ROUNDS = 50
KILL_WINDOW = 0.3  # seconds after the steps are sent
# The share of rounds whose kill is aimed at the barrier (the first 30 ms after one step's
# tasks have all ended: merging, building the layer, writing the checkpoint), a window that
# uniform kills rarely hit since tasks take most of a step's time.
BARRIER_AIMED = 0.5
BULK = 300  # files of the directory a task replaces: commits take a while
CHANNELS = [pb.ChannelDecl(name="lv", reducer="last_value"),
            pb.ChannelDecl(name="ap", reducer="append")]


# --- the model ------------------------------------------------------------------------------


@dataclass
class Model:
    """What a run must hold: its committed step, files (path -> content) and channels."""

    run_id: str
    step: int = 0
    files: dict[str, str] = field(default_factory=dict)
    channels: dict[str, Any] = field(default_factory=lambda: {"lv": None, "ap": []})

    def after(self, planned: Planned) -> Model:
        """The model once `planned` has committed (itself if it cannot commit)."""
        if not planned.commits:
            return self
        files = {p: c for p, c in self.files.items()
                 if not (planned.bulk and p.startswith("bulk/"))}
        files.update(planned.files)
        channels = {"lv": planned.round, "ap": [*self.channels["ap"], *planned.appended]}
        return Model(self.run_id, self.step + 1, files, channels)


@dataclass
class Planned:
    """One step of a round: its tasks and what it makes if it commits."""

    round: int
    kind: str  # ok | fail | conflict
    tasks: list[pb.TaskSpec]
    files: dict[str, str]
    appended: list[Any]
    bulk: bool

    @property
    def commits(self) -> bool:
        return self.kind == "ok"


def plan(rng: random.Random, number: int, marker: str) -> Planned:
    """A step of 2-4 tasks: task i writes t<i>.txt and appends [round, i]; task 0 sets lv;
    task 1 may replace bulk/ with BULK new files; some sleep. One in seven fails (the last
    task exits 1), one in seven conflicts (two tasks write clash.txt)."""
    kind = rng.choices(["ok", "fail", "conflict"], weights=[5, 1, 1])[0]
    count = rng.randint(2, 4)
    bulk = rng.random() < 0.7
    tasks, files, appended = [], {}, []
    for i in range(count):
        writes = [{"channel": "ap", "value": [number, i]}]
        if i == 0:
            writes.append({"channel": "lv", "value": number})
        script = [f"sleep {rng.choice([0, 0, 0.01, 0.03, 0.06])}",
                  f"echo {number} > t{i}.txt",
                  *(f"printf '%s\\n' {shlex.quote(json.dumps(w))} >&$AGENTD_WRITES_FD"
                    for w in writes)]
        files[f"t{i}.txt"] = f"{number}\n"
        appended.append([number, i])
        if i == 1 and bulk:
            script.append(f"rm -rf bulk && mkdir bulk && cd bulk && seq -f '{number}-%g' "
                          f"{BULK} | xargs touch")
            files.update({f"bulk/{number}-{k}": "" for k in range(1, BULK + 1)})
        if kind == "conflict" and i < 2:
            script.append(f"echo {i} > /workspace/clash.txt")
        if kind == "fail" and i == count - 1:
            script.append("exit 1")
        tasks.append(pb.TaskSpec(name=f"t{i}", argv=["/bin/sh", "-c", " && ".join(script),
                                                     marker]))
    return Planned(number, kind, tasks, files, appended, bulk)


# --- the host's view ------------------------------------------------------------------------


def instance_name(base: Path) -> str:
    """This daemon's cgroup parent (conftest.write_daemon_dir names it per directory)."""
    return "agentd-test-" + hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:8]


def task_cgroups(base: Path) -> list[str]:
    found = subprocess.run(["find", "/sys/fs/cgroup", "-path", f"*{instance_name(base)}/*",
                            "-name", "t-*"], capture_output=True, text=True, check=False)
    return found.stdout.split()


def mounts_under(base: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if str(base) in line]


def referenced_layers(base: Path) -> set[str]:
    """Every layer some checkpoint refers to, from the state database (read-only)."""
    db = sqlite3.connect(f"file:{base / 'state' / 'state.db'}?mode=ro", uri=True)
    try:
        return {layer for (text,) in db.execute("SELECT layers FROM checkpoints")
                for layer in json.loads(text)}
    finally:
        db.close()


def wait_for(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def workspace_files(stub: agentd_pb2_grpc.AgentdStub, run_id: str, step: int) -> dict[str, str]:
    """path -> content of every regular file of the checkpoint, from its export."""
    data = b"".join(c.data for c in stub.ExportCheckpoint(
        pb.ExportCheckpointRequest(run_id=run_id, step=step), timeout=60))
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                body = tar.extractfile(member)
                assert body is not None
                out[member.name] = body.read().decode()
    return out


# --- the rounds -----------------------------------------------------------------------------


@dataclass
class Flight:
    """A step sent in a thread: its reply, or the error the kill caused."""

    planned: Planned
    model: Model
    reply: pb.StepReply | None = None
    error: grpc.RpcError | None = None
    thread: threading.Thread | None = None
    phase: str = ""
    tasks_done: threading.Event = field(default_factory=threading.Event)


def _phase(killed: list[dict[str, Any]], flight: Flight) -> str:
    """Where in its step the kill found a flight, from what the killed daemon recorded."""
    events = [r["event"] for r in killed if r.get("run_id") == flight.model.run_id]
    if not events:
        return "before the step started"
    last = events[-1]
    if last == "step.committing":
        return "while the checkpoint was written"
    if last in ("step.failed", "step.refused"):
        return "after the step failed"
    if events.count("exec.exited") == len(flight.planned.tasks):
        return "at the barrier (merging, building the layer)"
    return "while tasks ran"


class CrashSuite:
    """One daemon directory, two runs and their models; `round()` does one kill and checks."""

    def __init__(self, seed: int, log: Callable[[str], None] = lambda _: None) -> None:
        self.rng = random.Random(seed)
        self.log = log
        self.base = daemon_base()
        self.marker = "agentd-crash-" + uuid.uuid4().hex
        self.handle: DaemonHandle = start_daemon(self.base)
        self.models = [self._create_run(), self._create_run()]
        self.rounds = 0
        self.outcomes: dict[str, int] = {}

    def _create_run(self) -> Model:
        run = self.handle.stub().CreateRun(pb.CreateRunRequest(agent="integration",
                                                               channels=CHANNELS))
        return Model(run.run_id)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            stop_daemon(self.handle)
        for pid in marked_processes(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    def round(self) -> None:
        """Steps on both runs, kill -9 at a random moment, restart, check everything."""
        self.rounds += 1
        number = self.rounds
        flights = [Flight(plan(self.rng, number, self.marker), model) for model in self.models]
        mark = len(self._records())  # the daemon is idle: everything before is durable
        for flight in flights:
            flight.thread = threading.Thread(target=self._send, args=(flight,), daemon=True)
            flight.thread.start()
        if self.rng.random() < BARRIER_AIMED:
            # Aimed at the barrier: once one step's tasks have all ended, within 30 ms.
            wait_for(lambda: any(f.tasks_done.is_set() for f in flights), 5)
            time.sleep(self.rng.uniform(0, 0.03))
        else:
            time.sleep(self.rng.uniform(0, KILL_WINDOW))
        stop_daemon(self.handle, signal.SIGKILL)
        for flight in flights:
            assert flight.thread is not None
            flight.thread.join(30)
            assert not flight.thread.is_alive(), "a Step call outlived the daemon by 30 s"
        self.handle = start_daemon(self.base)
        killed = self._records()[mark:]
        for flight in flights:
            flight.phase = _phase(killed, flight)
        self.models = [self._settle(flight) for flight in flights]
        self.check_host()
        for model in self.models:
            self.check_run(model)

    def _send(self, flight: Flight) -> None:
        with grpc.insecure_channel(f"unix:{self.handle.socket()}") as channel:
            stub = agentd_pb2_grpc.AgentdStub(channel)
            done = 0
            try:
                for event in stub.StreamStep(pb.StepRequest(
                        run_id=flight.model.run_id, tasks=flight.planned.tasks), timeout=30):
                    if event.WhichOneof("event") == "task_done":
                        done += 1
                        if done == len(flight.planned.tasks):
                            flight.tasks_done.set()
                    elif event.WhichOneof("event") == "done":
                        flight.reply = event.done
            except grpc.RpcError as error:
                flight.error = error

    def _settle(self, flight: Flight) -> Model:
        """The run's model after the round: by the reply if one came, else by what the daemon
        holds, which must be exactly the state before the step or exactly after it."""
        before, planned = flight.model, flight.planned
        after = before.after(planned)
        stub = self.handle.stub()
        step = stub.GetRun(pb.GetRunRequest(run_id=before.run_id)).step
        held = workspace_files(stub, before.run_id, step)
        where = f"round {planned.round}, run {before.run_id} ({planned.kind} step)"
        if flight.reply is not None:
            state = pb.StepState.Name(flight.reply.state)
            self._count(f"replied {state}")
            expected = after if flight.reply.state == pb.STEP_STATE_COMMITTED else before
            assert (flight.reply.state == pb.STEP_STATE_COMMITTED) == planned.commits, (
                where, flight.reply)
        else:
            assert flight.error is not None
            assert flight.error.code() == grpc.StatusCode.UNAVAILABLE, (where, flight.error)
            expected = after if step == after.step and held == after.files else before
            applied = expected is after and after is not before
            self._count("killed, " + ("applied" if applied else "not applied"))
            self._count(f"killed {flight.phase}")
        assert step == expected.step, (where, step, expected.step)
        assert held == expected.files, (
            f"{where}: the workspace is neither the state before the step nor after it:"
            f" {_diff(held, before.files)} / vs after: {_diff(held, after.files)}")
        return expected

    def _records(self) -> list[dict[str, Any]]:
        audit = self.base / "state" / "audit"
        return [json.loads(line) for segment in sorted(audit.glob("audit-*.jsonl"))
                for line in segment.read_bytes().split(b"\n") if line]

    def _count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def check_host(self) -> None:
        """Nothing of the killed daemon's steps is left on the host, and the log verifies."""
        state = self.base / "state"
        uppers = sorted(os.listdir(state / "workspaces" / "uppers"))
        assert uppers == [], f"round {self.rounds}: uppers left: {uppers}"
        layers = sorted(os.listdir(state / "workspaces" / "layers"))
        assert [n for n in layers if not n.startswith("l-")] == [], layers
        orphans = set(layers) - referenced_layers(self.base)
        assert orphans == set(), f"round {self.rounds}: layers no checkpoint uses: {orphans}"
        assert task_cgroups(self.base) == [], f"round {self.rounds}: task cgroups left"
        assert wait_for(lambda: not marked_processes(self.marker), 5), (
            f"round {self.rounds}: processes of tasks survived: "
            f"{marked_processes(self.marker)}")
        assert mounts_under(self.base) == []
        report = verify(state / "audit")
        assert report.ok, f"round {self.rounds}: audit log: {report.first}"

    def check_run(self, model: Model) -> None:
        """The run is at its last checkpoint, nothing runs, and a new step commits on the
        model's channel values (the model moves by that step)."""
        stub = self.handle.stub()
        run = stub.GetRun(pb.GetRunRequest(run_id=model.run_id))
        points = [c.step for c in stub.ListCheckpoints(pb.ListCheckpointsRequest(
            run_id=model.run_id)).checkpoints]
        assert run.step == points[-1] == model.step, (run.step, points, model.step)
        attempts = stub.ListSteps(pb.ListStepsRequest(run_id=model.run_id)).steps
        assert pb.STEP_STATE_RUNNING not in [a.state for a in attempts]
        reply = None
        for event in stub.StreamStep(pb.StepRequest(run_id=model.run_id, tasks=[pb.TaskSpec(
                name="check", argv=["/bin/sh", "-c", "cat <&$AGENTD_CHANNELS_FD",
                                    self.marker])]), timeout=60):
            if event.WhichOneof("event") == "output":
                snapshot = json.loads(event.output.chunk.data)
                assert snapshot == model.channels, (model.run_id, snapshot, model.channels)
            elif event.WhichOneof("event") == "done":
                reply = event.done
        assert reply is not None
        assert reply.state == pb.STEP_STATE_COMMITTED, reply
        # It only read: committed on the head, which it leaves where it was.
        assert (reply.read_only, reply.step, reply.base_step) == (True, model.step, model.step)


def _diff(held: dict[str, str], expected: dict[str, str]) -> str:
    extra = sorted(set(held) - set(expected))[:4]
    missing = sorted(set(expected) - set(held))[:4]
    changed = sorted(p for p in set(held) & set(expected) if held[p] != expected[p])[:4]
    return f"extra {extra}, missing {missing}, changed {changed}"


@pytest.fixture
def suite() -> Iterator[CrashSuite]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (namespaces, cgroups, mounts)")
    suite = CrashSuite(seed=int(os.environ.get("AGENTD_CRASH_SEED", "20240901")))
    try:
        yield suite
    finally:
        suite.close()


class TestKillDuringSteps:
    def test_kill_9_at_random_moments_of_steps(self, suite: CrashSuite) -> None:
        """After each of ROUNDS kill -9s during steps and a restart, every run is exactly at
        its last committed step, nothing is half-applied or left behind, the audit log
        verifies and the runs accept new steps."""
        for _ in range(ROUNDS):
            suite.round()
        outcomes = suite.outcomes
        # The kills must have landed in tasks and at the barrier, or the test proved little.
        assert outcomes.get("killed while tasks ran", 0) > 0, outcomes
        assert outcomes.get("killed at the barrier (merging, building the layer)", 0) \
            + outcomes.get("killed while the checkpoint was written", 0) > 0, outcomes
        assert outcomes.get("replied STEP_STATE_COMMITTED", 0) > 0, outcomes
