"""Races between calls on one run, against the real daemon (issue 9, item 5).

Every pair of mutating RPCs (Step, Exec, Approve yes, Approve no, Rollback, Fork, CloseRun,
ExportCheckpoint) is sent on one run from two threads at once, after random small delays,
while the background squash of the run's stack may still be running;
after each round the run's invariants are checked from what the daemon reports:

- every checkpoint's content is what its step made (the setup's are unchanged, a new one is
  its parent plus the racing step's file);
- no step is both applied and reported failed or discarded, and one approval decision wins;
- an acknowledged rollback holds (no checkpoint above it keeps the rolled-back files);
- the run accepts new steps, and ListRuns answers;
- at the end, the audit log verifies.

AGENTD_RACE_ROUNDS (default 1) repeats every pair that many times.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import shutil
import signal
import sqlite3
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit.verify import verify
from tests.conftest import DaemonHandle, daemon_base, execute, start_daemon, stop_daemon
from tests.test_steps import (
    APPROVALS_CONFIG,
    APPROVALS_POLICY,
    CHANNELS,
    COMMITTED,
    DISCARDED,
    PENDING,
    RM_STEP,
    audit_records,
    export_tree,
    files,
    step,
    task,
)

OPS = ["step", "exec", "approve", "reject", "rollback", "fork", "close", "export"]
PAIRS = [*itertools.combinations(OPS, 2), ("step", "step")]
ROUNDS = int(os.environ.get("AGENTD_RACE_ROUNDS", "1"))
# Codes a losing call may get: refused for the state it found, never INTERNAL or UNKNOWN.
REFUSALS = {grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND}
Files = dict[str, str | None]


# squash_depth 3: a run's second step starts a background squash (base + 2 layers), which
# then races whatever the round sends (export, fork, rollback, close).
RACER_CONFIG = APPROVALS_CONFIG.replace("[daemon]\n", "[daemon]\nsquash_depth = 3\n", 1)


@pytest.fixture(scope="module")
def racer() -> Iterator[DaemonHandle]:
    """A daemon of this module's own, with the approvals agent (rm waits for an approver)
    and shallow squashes."""
    base = daemon_base()
    (base / "policies").mkdir()
    shutil.copy(APPROVALS_POLICY, base / "policies")
    handle = start_daemon(base, RACER_CONFIG)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Outcome:
    """What one racing call was told: a reply, or the status code it failed with."""

    op: str
    file: str
    reply: Any = None
    code: grpc.StatusCode | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


@dataclass
class Round:
    handle: DaemonHandle
    run_id: str
    expected: dict[int, Files]           # content of checkpoints 0..2 after the setup
    pending: bool                        # step 3 waits for approval
    outcomes: list[Outcome] = field(default_factory=list)

    def call(self, op: str, index: int, go: threading.Barrier) -> Outcome:
        """Runs one racing call; `file` is the name only a step of this call writes."""
        go.wait()
        time.sleep(random.choice([0, 0, random.uniform(0, 0.01)]))
        out = Outcome(op, f"op{index}")
        client = self.handle.stub()
        try:
            out.reply = self._send(op, out.file, client)
        except grpc.RpcError as error:
            out.code, out.detail = error.code(), error.details() or ""
        return out

    def _send(self, op: str, name: str, client: Any) -> Any:
        run_id = self.run_id
        if op == "step":
            return step(client, run_id, task(name, f"echo {name} > {name}"))
        if op == "exec":
            return execute(client, run_id, ["/bin/sh", "-c", f"echo {name} > {name}"]).outcome
        if op in ("approve", "reject"):
            # Two identities, so that the audit and the attempt say who decided.
            role = "approver" if op == "approve" else "admin"
            return self.handle.stub(role).Approve(pb.ApproveRequest(
                run_id=run_id, step=3, approve=op == "approve", reason=op), timeout=60)
        if op == "rollback":
            return client.Rollback(pb.RollbackRequest(run_id=run_id, step=0), timeout=60)
        if op == "fork":
            return client.Fork(pb.ForkRequest(run_id=run_id, step=2), timeout=60)
        if op == "close":
            return client.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=60)
        if op == "export":
            return files(export_tree(client, run_id, 2))
        raise AssertionError(op)


def setup_round(handle: DaemonHandle, pending: bool) -> Round:
    """A run at step 2 (f1 and a victim at step 1, f2 at step 2), with step 3 (rm victim)
    pending approval if `pending`."""
    client = handle.stub()
    run_id = client.CreateRun(pb.CreateRunRequest(agent="approvals", channels=CHANNELS)).run_id
    assert step(client, run_id, task("a", "echo 1 > f1; echo v > victim")).state == COMMITTED
    assert step(client, run_id, task("b", "echo 2 > f2")).state == COMMITTED
    expected = {n: files(export_tree(client, run_id, n)) for n in range(3)}
    assert expected[2] == {"f1": "1\n", "victim": "v\n", "f2": "2\n"}
    if pending:
        assert step(client, run_id, *RM_STEP).state == PENDING
    return Round(handle, run_id, expected, pending)


def race(handle: DaemonHandle, pair: tuple[str, str]) -> Round:
    pending = "approve" in pair or "reject" in pair
    rnd = setup_round(handle, pending)
    results: list[Outcome | None] = [None, None]
    go = threading.Barrier(2)

    def run(i: int) -> None:
        results[i] = rnd.call(pair[i], i, go)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in results), f"{pair}: a call did not return"
    rnd.outcomes = [r for r in results if r is not None]
    return rnd


def check_round(rnd: Round, where: str) -> None:
    client = rnd.handle.stub()
    for out in rnd.outcomes:
        assert out.ok or out.code in REFUSALS, f"{where}: {out.op} failed: {out.code} {out.detail}"
    # ListRuns answers, whatever state this run (or its forks) are in.
    listed = client.ListRuns(pb.ListRunsRequest(include_closed=True), timeout=60).runs
    assert rnd.run_id in {r.run_id for r in listed}
    run = client.GetRun(pb.GetRunRequest(run_id=rnd.run_id))
    closed = run.state == pb.RUN_STATE_CLOSED
    by_op = {o.op: o for o in rnd.outcomes}
    assert closed == ("close" in by_op and by_op["close"].ok), f"{where}: closed={closed}"

    contents: dict[int, Files] = {}
    if not closed:
        numbers = [c.step for c in client.ListCheckpoints(
            pb.ListCheckpointsRequest(run_id=rnd.run_id)).checkpoints]
        assert numbers == list(range(run.step + 1)), f"{where}: checkpoints {numbers}"
        contents = {n: files(export_tree(client, rnd.run_id, n)) for n in numbers}
    # Every checkpoint's content: the setup's unchanged, a new one its parent plus one
    # racing step's file (or the approved rm step's effect).
    for n, content in contents.items():
        if n <= 2 and not _rebuilt(rnd, n):
            assert content == rnd.expected[n], f"{where}: checkpoint {n} changed: {content}"
        else:
            _check_new_checkpoint(rnd, contents, n, where)
    _check_steps(rnd, contents, closed, where)
    _check_approval(rnd, contents, where)
    _check_rollback(rnd, contents, where)
    _check_fork(rnd, where)
    if "export" in by_op and by_op["export"].ok:
        assert by_op["export"].reply == rnd.expected[2], f"{where}: export differs"
    if not closed:
        _check_accepts_steps(rnd, where)
        client.CloseRun(pb.CloseRunRequest(run_id=rnd.run_id), timeout=60)


def _rebuilt(rnd: Round, n: int) -> bool:
    """Whether checkpoint n was made again after an acknowledged rollback below it."""
    return any(o.op == "rollback" and o.ok for o in rnd.outcomes) and n > 0


def _changed_names(content_before: Files, content: Files) -> set[str]:
    return set(content.keys() ^ content_before.keys())


def _check_new_checkpoint(rnd: Round, contents: dict[int, Files], n: int, where: str) -> None:
    before, after = contents[n - 1], contents[n]
    diff = _changed_names(before, after)
    racing = {o.file for o in rnd.outcomes if o.op in ("step", "exec")}
    approved = {"victim", "sibling"}
    one_racing_step = len(diff) == 1 and diff <= racing
    assert one_racing_step or diff == approved, (
        f"{where}: checkpoint {n} differs from {n - 1} by {diff}")


def _check_steps(rnd: Round, contents: dict[int, Files], closed: bool, where: str) -> None:
    """A step reported failed or refused left no file; one reported committed is at the
    step it was told, unless an acknowledged rollback or close came after it."""
    present = {name for content in contents.values() for name in content}
    undone = closed or any(o.op == "rollback" and o.ok for o in rnd.outcomes)
    for out in rnd.outcomes:
        if out.op not in ("step", "exec"):
            continue
        if out.op == "step":
            committed = out.ok and out.reply.state == COMMITTED
            number = out.reply.step if out.ok else 0
        else:
            committed = out.ok and out.reply.committed
            number = out.reply.step if out.ok else 0
        if not committed:
            assert out.file not in present, f"{where}: {out.op} reported failed, yet applied"
        elif not undone:
            assert contents[number].get(out.file) == f"{out.file}\n", (
                f"{where}: {out.op} reported committed at {number} but is not there")


def _check_approval(rnd: Round, contents: dict[int, Files], where: str) -> None:
    """At most one decision wins; a rejecter told DISCARDED means nothing of the step ran."""
    if not rnd.pending:
        return
    client = rnd.handle.stub()
    yes = next((o for o in rnd.outcomes if o.op == "approve"), None)
    no = next((o for o in rnd.outcomes if o.op == "reject"), None)
    yes_won = yes is not None and yes.ok and yes.reply.state == COMMITTED
    no_won = no is not None and no.ok and no.reply.state == DISCARDED
    assert not (yes_won and no_won), f"{where}: both decisions were acknowledged"
    # The setup's pending attempt is the first at step 3 (a racing step may make another
    # at step 3 once the rejection won).
    third = next((s for s in client.ListSteps(pb.ListStepsRequest(run_id=rnd.run_id)).steps
                  if s.step == 3), None)
    if no_won:
        assert third is not None, where
        assert third.state == DISCARDED, f"{where}: {third}"
        assert third.decided_by.startswith("admin@"), f"{where}: decided by {third.decided_by}"
        assert all("sibling" not in c for c in contents.values()), f"{where}: rejected, ran"
    if yes_won:
        assert third is not None, where
        assert third.decided_by.startswith("approver@"), (
            f"{where}: approved, but the attempt says {third}")
        rolled = any(o.op == "rollback" and o.ok for o in rnd.outcomes)
        assert rolled or third.state == COMMITTED, f"{where}: {third}"


def _check_rollback(rnd: Round, contents: dict[int, Files], where: str) -> None:
    """An acknowledged rollback to 0 holds: nothing of steps 1 and 2 survives in any
    checkpoint."""
    if not any(o.op == "rollback" and o.ok for o in rnd.outcomes) or not contents:
        return
    for n, content in contents.items():
        assert not {"f1", "f2", "victim"} & content.keys(), (
            f"{where}: rolled back, yet checkpoint {n} holds {sorted(content)}")


def _check_fork(rnd: Round, where: str) -> None:
    """An acknowledged fork has the source's checkpoints 0..2, unchanged, and takes steps."""
    fork = next((o for o in rnd.outcomes if o.op == "fork" and o.ok), None)
    if fork is None:
        return
    client = rnd.handle.stub()
    new_id = fork.reply.run_id
    assert [c.step for c in client.ListCheckpoints(
        pb.ListCheckpointsRequest(run_id=new_id)).checkpoints] == [0, 1, 2], where
    for n in range(3):
        assert files(export_tree(client, new_id, n)) == rnd.expected[n], f"{where}: fork {n}"
    assert step(client, new_id, task("f", "echo f > forked")).state == COMMITTED
    client.CloseRun(pb.CloseRunRequest(run_id=new_id), timeout=60)


def _check_accepts_steps(rnd: Round, where: str) -> None:
    client = rnd.handle.stub()
    pending = [s for s in client.ListSteps(pb.ListStepsRequest(run_id=rnd.run_id)).steps
               if s.state == PENDING]
    for attempt in pending:  # a pending step blocks new ones by design: decide it first
        rnd.handle.stub("admin").Approve(pb.ApproveRequest(
            run_id=rnd.run_id, step=attempt.step, approve=False, reason="cleanup"))
    head = client.GetRun(pb.GetRunRequest(run_id=rnd.run_id)).step
    before = files(export_tree(client, rnd.run_id, head))
    reply = step(client, rnd.run_id, task("fin", "echo fin > fin"))
    assert reply.state == COMMITTED, f"{where}: {reply}"
    assert reply.step == head + 1, f"{where}: {reply}"
    assert files(export_tree(client, rnd.run_id, head + 1)) == {**before, "fin": "fin\n"}


class TestRaces:
    def test_every_pair_of_mutating_calls_keeps_the_run_consistent(
            self, racer: DaemonHandle) -> None:
        """Each pair of mutating RPCs raced on one run leaves checkpoints, steps, approvals,
        rollbacks and listings consistent, and the run usable; the audit log verifies."""
        random.seed(int(os.environ.get("AGENTD_RACE_SEED", "9")))
        seen: dict[str, int] = {}
        for number in range(ROUNDS):
            for pair in PAIRS:
                where = f"round {number} {pair[0]} vs {pair[1]}"
                rnd = race(racer, pair)
                for out in rnd.outcomes:
                    key = f"{out.op}:{'ok' if out.ok else out.code.name if out.code else ''}"
                    seen[key] = seen.get(key, 0) + 1
                check_round(rnd, where)
        # Both sides of the races happened: some calls won, some were refused.
        assert any(k.endswith(":ok") for k in seen), seen
        assert any(not k.endswith(":ok") for k in seen), seen
        events = [r["event"] for r in audit_records(racer)]
        assert "workspace.squashed" in events, "no squash ran beside the races"
        assert racer.process.poll() is None
        assert verify(racer.base / "state" / "audit").ok


class TestExportCancel:
    def test_abandoned_exports_release_everything(self) -> None:
        """Ten exports that the client closes after one chunk leave no thread behind, do
        not stall CreateRun or Exec, and SIGTERM still stops the daemon."""
        base = daemon_base()
        handle = start_daemon(base)
        try:
            client = handle.stub()
            run_id = client.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
            # Many chunks: the writer is still far from the end when the client leaves.
            reply = step(client, run_id, task(
                "big", "head -c 16777216 /dev/zero > big; head -c 4194304 /dev/urandom > r"))
            assert reply.state == COMMITTED
            request = pb.ExportCheckpointRequest(run_id=run_id, step=1)
            assert sum(len(c.data) for c in client.ExportCheckpoint(request, timeout=60)) > \
                20 * 1024 * 1024
            execute(client, run_id, ["/bin/true"])
            # The event loop's worker threads (agentd-io) start on demand up to a fixed bound
            # and live as long as the daemon; what must not stay is anything else.
            baseline = _threads(handle) - _threads(handle, "agentd-io")
            for number in range(10):
                stream = client.ExportCheckpoint(request, timeout=60)
                assert next(stream).data
                if number == 0:  # its writer waits for the client: the count below sees it
                    assert _threads(handle, "agentd-export") == 1
                stream.cancel()
            # Within a generous bound, not a timing threshold: before the fix they hung.
            run = client.CreateRun(pb.CreateRunRequest(agent="integration"), timeout=60)
            done = execute(client, run.run_id, ["/bin/sh", "-c", "echo ok"])
            assert done.text == "ok\n"
            assert _wait(lambda: _threads(handle, "agentd-export") == 0, 30), (
                "export threads are left")
            assert _wait(lambda: _threads(handle) - _threads(handle, "agentd-io") <= baseline,
                         30), f"{_threads(handle)} threads, {baseline} before the exports"
            assert _export_chunks(client, run_id) > 0
            handle.process.send_signal(signal.SIGTERM)
            assert handle.process.wait(timeout=60) == 0
        finally:
            stop_daemon(handle)
            shutil.rmtree(base, ignore_errors=True)


def _export_chunks(client: Any, run_id: str) -> int:
    """How many chunks a full export still yields (the layers were not released)."""
    return sum(1 for _ in client.ExportCheckpoint(
        pb.ExportCheckpointRequest(run_id=run_id, step=1), timeout=60))


def _threads(handle: DaemonHandle, name: str = "") -> int:
    """The daemon's threads (those with this name, if one is given)."""
    tasks = Path(f"/proc/{handle.process.pid}/task")
    count = 0
    for task_dir in tasks.iterdir():
        try:
            comm = (task_dir / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        count += not name or comm == name
    return count


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class TestLayerHolds:
    def test_export_keeps_its_layers_while_a_rollback_releases_them(
            self, racer: DaemonHandle) -> None:
        """An export still streaming when a rollback (or squash) releases its checkpoint's
        layers completes with the whole content; the layers go once it has ended."""
        client = racer.stub()
        run_id = client.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        # Many files: the tar writer opens each as it goes, long after the first chunk.
        reply = step(client, run_id, task(
            "many", "mkdir d; for i in $(seq 300); do head -c 65536 /dev/zero > d/$i; done"))
        assert reply.state == COMMITTED
        top = Path(client.GetRun(pb.GetRunRequest(run_id=run_id)).workspace)  # step 1's layer
        stream = client.ExportCheckpoint(pb.ExportCheckpointRequest(run_id=run_id, step=1),
                                         timeout=60)
        data = next(stream).data
        client.Rollback(pb.RollbackRequest(run_id=run_id, step=0), timeout=60)
        assert top.exists(), "the layer was deleted under a running export"
        data += b"".join(chunk.data for chunk in stream)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            sizes = [m.size for m in tar if m.isfile()]
        assert sizes == [65536] * 300
        assert _wait(lambda: not top.exists(), 30), "the released layer stayed after the export"
        client.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=60)


class TestListing:
    def test_one_inconsistent_run_does_not_break_listing(self, racer: DaemonHandle) -> None:
        """A run whose current checkpoint is missing (made so behind the daemon's back) is
        still listed, and GetRun and ListRuns answer for every caller."""
        client = racer.stub()
        good = client.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        bad = client.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        with sqlite3.connect(racer.base / "state" / "state.db", timeout=30) as db:
            db.execute("DELETE FROM checkpoints WHERE run_id = ?", (bad,))
        listed = {r.run_id: r for r in client.ListRuns(pb.ListRunsRequest()).runs}
        assert {good, bad} <= listed.keys()
        assert listed[bad].workspace == ""
        assert listed[good].workspace
        assert client.GetRun(pb.GetRunRequest(run_id=bad)).run_id == bad
        for run_id in (good, bad):
            client.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=60)


class TestDecisions:
    def test_a_second_decision_is_told_who_decided(self, racer: DaemonHandle) -> None:
        """Once a pending step is rejected, an approval of it gets FAILED_PRECONDITION naming
        the rejecter, and nothing of the step runs."""
        client = racer.stub()
        run_id = client.CreateRun(pb.CreateRunRequest(agent="approvals",
                                                      channels=CHANNELS)).run_id
        assert step(client, run_id, *RM_STEP).state == PENDING
        rejected = racer.stub("admin").Approve(pb.ApproveRequest(
            run_id=run_id, step=1, approve=False, reason="no"), timeout=60)
        assert rejected.state == DISCARDED
        with pytest.raises(grpc.RpcError) as late:
            racer.stub("approver").Approve(pb.ApproveRequest(
                run_id=run_id, step=1, approve=True, reason="yes"), timeout=60)
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"already decided by {rejected.decided_by}" in (late.value.details() or "")
        assert client.GetRun(pb.GetRunRequest(run_id=run_id)).step == 0
        client.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=60)
