"""Channel state: stored linear in what changed, capped per run, and never too big to reply.

The store tests use StepStore on a fresh SQLite file (the unit is the store); the limit and
reply tests run real steps against a real daemon, in real workers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.api.limits import MAX_MESSAGE_BYTES
from agentd.cli.output import step_summary
from agentd.client import AgentdClient, StepState, TaskSpec
from agentd.store.runs import RunRecord, RunState, RunStore
from agentd.store.steps import CheckpointRecord, StepStore
from agentd.store.values import ChannelValue
from tests.conftest import CONFIG, DaemonHandle, daemon_base, start_daemon, stop_daemon

MiB = 1 << 20


def _store(path: Path) -> StepStore:
    db = sqlite3.connect(path, isolation_level=None)
    RunStore(path)  # creates the runs table
    return StepStore(db)


def _run(run_id: str) -> RunRecord:
    return RunRecord(run_id=run_id, agent="a", stage="prototype", state=RunState.OPEN,
                     created_at=0.0, closed_at=None, policy_hash="", policy_file="",
                     workspace="", created_by="test", label="", tasks_run=0)


def _state(big: str, step: int) -> dict[str, ChannelValue]:
    return {"big": ChannelValue(big, 1), "small": ChannelValue(f"step {step}", step)}


class TestStorage:
    def test_an_unchanged_value_is_stored_once_across_checkpoints(self, tmp_path: Path) -> None:
        """Twelve checkpoints holding the same 1 MB value store it once, not twelve times."""
        store = _store(tmp_path / "state.db")
        big = "x" * MiB
        store.create_run(_run("r-1"), CheckpointRecord("r-1", 0, ["base"], {}, 0.0))
        for step in range(1, 13):
            store.commit(store.begin("r-1", step, "running", {}, "t"),
                         CheckpointRecord("r-1", step, ["base"], _state(big, step), 0.0), {})
        assert store.stored_channel_bytes() < MiB + 4096
        assert store.checkpoint("r-1", 7).channels == _state(big, 7)

    def test_an_append_channel_stores_each_element_once(self, tmp_path: Path) -> None:
        """Twelve 100 kB appends store 1.2 MB of elements, not 1 + 2 + ... + 12 lists."""
        store = _store(tmp_path / "state.db")
        store.create_run(_run("r-1"), CheckpointRecord("r-1", 0, ["base"], {}, 0.0))
        items: list[str] = []
        for step in range(1, 13):
            items = [*items, f"{step:03d}" + "x" * 100_000]
            store.commit(store.begin("r-1", step, "running", {}, "t"),
                         CheckpointRecord("r-1", step, ["base"],
                                          {"notes": ChannelValue(items, step)}, 0.0), {})
        assert store.stored_channel_bytes() < 12 * 100_100 + 20_000
        assert store.checkpoint("r-1", 12).channels["notes"].value == items
        assert store.checkpoint("r-1", 5).channels["notes"].value == items[:5]
        store.rollback("r-1", 3)
        assert store.checkpoint("r-1", 3).channels["notes"].value == items[:3]
        assert store.stored_channel_bytes() < 3 * 100_100 + 5_000

    def test_a_value_shaped_like_a_list_node_stays_a_value(self, tmp_path: Path) -> None:
        """Whatever a task writes reads back as written (nodes cannot be forged)."""
        store = _store(tmp_path / "state.db")
        tricky = {"a": "L[]", "b": ["L", []], "c": [[1], [1]], "d": [], "e": "L"}
        store.create_run(_run("r-1"), CheckpointRecord(
            "r-1", 0, ["base"], {k: ChannelValue(v, 1) for k, v in tricky.items()}, 0.0))
        assert {k: v.value for k, v in store.checkpoint("r-1", 0).channels.items()} == tricky

    def test_rollback_and_close_free_values_no_checkpoint_holds(self, tmp_path: Path) -> None:
        """Values only later checkpoints held go at rollback; a fork keeps what it shares."""
        store = _store(tmp_path / "state.db")
        store.create_run(_run("r-1"), CheckpointRecord("r-1", 0, ["base"], {}, 0.0))
        for step in (1, 2):
            store.commit(store.begin("r-1", step, "running", {}, "t"),
                         CheckpointRecord("r-1", step, ["base"],
                                          _state(str(step) * 1000, step), 0.0), {})
        store.fork(store.checkpoint("r-1", 1), _run("r-2"))
        store.rollback("r-1", 0)
        assert store.checkpoint("r-2", 1).channels == _state("1" * 1000, 1)
        assert store.stored_channel_bytes() < 1100  # step 2's value is gone
        store.drop_run("r-2")
        assert store.stored_channel_bytes() == 0

    def test_inline_values_of_an_older_database_are_migrated(self, tmp_path: Path) -> None:
        """A state.db whose checkpoints hold their channels inline reads the same after."""
        path = tmp_path / "state.db"
        db = sqlite3.connect(path, isolation_level=None)
        db.executescript("""
            CREATE TABLE checkpoints (run_id TEXT NOT NULL, step INTEGER NOT NULL,
                layers TEXT NOT NULL, channels TEXT NOT NULL, committed_at REAL NOT NULL,
                PRIMARY KEY (run_id, step));""")
        old = {"notes": {"value": ["a", "b"], "version": 2, "seen": []},
               "gate": {"value": {"x": 1}, "version": 1, "seen": ["x"]}}
        db.execute("INSERT INTO checkpoints VALUES ('r-1', 0, '[\"base\"]', ?, 0.0)",
                   (json.dumps(old),))
        db.close()
        store = _store(path)
        assert store.checkpoint("r-1", 0).channels == {
            "notes": ChannelValue(["a", "b"], 2), "gate": ChannelValue({"x": 1}, 1, ("x",))}
        assert _store(path).checkpoint("r-1", 0).channels["notes"].version == 2  # idempotent

    def test_the_execs_column_of_an_older_database_is_renamed_tasks_run(
            self, tmp_path: Path) -> None:
        """`execs` counted tasks; a database made before the rename keeps its counts."""
        path = tmp_path / "state.db"
        db = sqlite3.connect(path, isolation_level=None)
        db.executescript("""
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, agent TEXT NOT NULL,
                stage TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
                closed_at REAL, policy_hash TEXT NOT NULL, policy_file TEXT NOT NULL,
                workspace TEXT NOT NULL, created_by TEXT NOT NULL, label TEXT NOT NULL,
                execs INTEGER NOT NULL DEFAULT 0);""")
        db.execute("INSERT INTO runs VALUES ('r-1', 'a', 'prototype', 'open', 0.0, NULL, 'h',"
                   " 'p', 'w', 'c', '', 7)")
        db.close()
        assert RunStore(path).get("r-1").tasks_run == 7
        assert RunStore(path).get("r-1").tasks_run == 7  # idempotent


# --- against a real daemon -------------------------------------------------------------------

BIG_POLICY = """\
apiVersion: agentd/v1
kind: Policy
name: big-state
stages:
  production:
    exec: {allow: [/usr/bin/, /bin/]}
    filesystem: {read_only: [/usr, /bin, /lib, /lib64], workspace: read_write}
    limits: {channel_state: 16MiB, writes: 1MiB}
"""
BIG_CONFIG = CONFIG + '\n[agents.big-state]\npolicy = "big-state.yaml"\nstage = "production"\n'


def append_task(name: str, channel: str, size: int) -> pb.TaskSpec:
    """A task appending one string of `size` bytes to `channel`."""
    program = ("import json, os; os.write(int(os.environ['AGENTD_WRITES_FD']), (json.dumps("
               f"{{'channel': {channel!r}, 'value': 'v' * {size}}}) + '\\n').encode())")
    return pb.TaskSpec(name=name, argv=["/usr/bin/python3", "-c", program])


@pytest.fixture(scope="module")
def big_daemon() -> Iterator[DaemonHandle]:
    base = daemon_base()
    (base / "policies").mkdir()
    (base / "policies" / "big-state.yaml").write_text(BIG_POLICY)
    handle = start_daemon(base, BIG_CONFIG)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.privileged
class TestLimit:
    def test_a_step_past_limits_channel_state_fails_and_applies_nothing(
            self, stub: agentd_pb2_grpc.AgentdStub) -> None:
        """At 1 MiB (the integration agent), a second 600 kB append fails, naming the limit."""
        run = stub.CreateRun(pb.CreateRunRequest(
            agent="integration", channels=[pb.ChannelDecl(name="ap", reducer="append")]))
        try:
            first = stub.Step(pb.StepRequest(run_id=run.run_id,
                                             tasks=[append_task("a", "ap", 600_000)]), timeout=60)
            assert first.state == pb.STEP_STATE_COMMITTED, first.reason
            second = stub.Step(pb.StepRequest(run_id=run.run_id,
                                              tasks=[append_task("a", "ap", 600_000)]), timeout=60)
            assert second.state == pb.STEP_STATE_FAILED
            assert "limits.channel_state" in second.reason
            assert "integration.yaml" in second.reason or "stages.yaml" in second.reason
            assert stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).step == 1
            versions = stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run.run_id))
            assert [c.versions["ap"] for c in versions.checkpoints] == [0, 1]
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))


@pytest.mark.privileged
class TestReplySize:
    def test_state_larger_than_a_message_is_left_out_of_the_reply_with_its_size(
            self, big_daemon: DaemonHandle) -> None:
        """5 x 900 kB in one channel commits, and the client gets a reply naming what was
        left out instead of gRPC's 'message larger than max'."""
        with AgentdClient(str(big_daemon.socket())) as client:
            stub = big_daemon.stub()
            run = stub.CreateRun(pb.CreateRunRequest(
                agent="big-state", channels=[pb.ChannelDecl(name="ap", reducer="append"),
                                             pb.ChannelDecl(name="lv", reducer="last_value")]))
            try:
                tasks = [append_task(f"t{i}", "ap", 900_000) for i in range(5)]
                tasks.append(append_task("small", "lv", 10))
                reply = client.step(run.run_id, [_task(t) for t in tasks])
                assert reply.state == StepState.COMMITTED, reply.reason
                assert dict(reply.channels_omitted) == {"ap": len(json.dumps(["v" * 900_000] * 5))}
                assert reply.channels == {"lv": "v" * 10}
                assert reply.versions == {"ap": 1, "lv": 1}
                assert "channel ap: 4500020 bytes, left out of the reply" in step_summary(reply)
                raw = stub.Step(pb.StepRequest(run_id=run.run_id, tasks=[
                    append_task("small", "lv", 20)]), timeout=60)
                assert raw.ByteSize() < MAX_MESSAGE_BYTES
                assert raw.channels_omitted["ap"] == len(json.dumps(["v" * 900_000] * 5))
            finally:
                with contextlib.suppress(grpc.RpcError):
                    stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))


def _task(spec: pb.TaskSpec) -> TaskSpec:
    return TaskSpec(name=spec.name, argv=list(spec.argv))
