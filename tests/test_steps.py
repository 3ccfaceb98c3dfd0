"""BSP steps against the real daemon: isolation, the barrier, checkpoints, approvals.

Every task runs in a real confined worker (the session's `daemon` fixture, or a daemon of the
test's own where the config must differ: the approvals policy, a small worker limit). Tasks
are tiny shell or python programs; they publish channel writes with `emit(...)` and read the
snapshot with `cat <&$AGENTD_CHANNELS_FD`.

How state is observed, never through the daemon's internals:
- the workspace at a checkpoint, twice: as ExportCheckpoint's tarball (the daemon's merge of
  the layers) and as the kernel's overlay shows it to a worker (`view`, run in an O(1) fork
  so that the run observed gains no step);
- channel values: the reply's `channels`/`versions`, and what the next step's tasks read;
- the host: the daemon's `<state>/workspaces/{layers,uppers}`, its audit segments, /proc.

"O(1) in workspace size" is proven structurally, not by a clock (timings are in
tests/bench/steps_bench.py): rollback and fork of a 100,000-file workspace create no entry
under the layers directory and change no inode's ctime there, and give the right contents.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc
from agentd.scheduler.gate import MAX_QUEUED_STEPS
from tests.conftest import (
    CONFIG,
    REPO,
    DaemonHandle,
    daemon_base,
    execute,
    marked_processes,
    start_daemon,
    stop_daemon,
)

pytestmark = pytest.mark.privileged

Stub = agentd_pb2_grpc.AgentdStub
Tree = dict[str, tuple[str, int | None, str | None]]  # path -> (kind, mode, content/target)

COMMITTED, FAILED = pb.STEP_STATE_COMMITTED, pb.STEP_STATE_FAILED
PENDING, DISCARDED = pb.STEP_STATE_PENDING_APPROVAL, pb.STEP_STATE_DISCARDED
# Channels most tests declare: one of each reducer; the barrier waits for tasks x and y.
CHANNELS = [pb.ChannelDecl(name="lv", reducer="last_value"),
            pb.ChannelDecl(name="ap", reducer="append"),
            pb.ChannelDecl(name="tp", reducer="topic"),
            pb.ChannelDecl(name="br", reducer="barrier", barrier_tasks=["x", "y"])]
APPROVALS_POLICY = REPO / "tests" / "policy_cases" / "approvals.yaml"
APPROVALS_CONFIG = CONFIG + '\n[agents.approvals]\npolicy = "approvals.yaml"\nstage = "prototype"\n'
# A worker listing the workspace as the kernel shows it: {path: [kind, mode, content]}.
LIST_TREE = r"""
import json, os, stat
out = {}
for root, dirs, files in os.walk('.'):
    for name in dirs + files:
        path = os.path.join(root, name)[2:]
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[path] = ['l', None, os.readlink(path)]
        elif stat.S_ISDIR(st.st_mode):
            out[path] = ['d', mode, None]
        elif stat.S_ISREG(st.st_mode):
            out[path] = ['f', mode, open(path, 'rb').read().decode('latin-1')]
        else:
            out[path] = ['o', mode, None]
print(json.dumps(out))
"""


# --- helpers ---------------------------------------------------------------------------------


def emit(channel: str, value: Any) -> str:
    """Shell: publish one channel write on $AGENTD_WRITES_FD."""
    line = json.dumps({"channel": channel, "value": value})
    return f"printf '%s\\n' {shlex.quote(line)} >&$AGENTD_WRITES_FD"


def task(name: str, script: str, **kwargs: Any) -> pb.TaskSpec:
    """A task running `/bin/sh -c script`."""
    return pb.TaskSpec(name=name, argv=["/bin/sh", "-c", script], **kwargs)


def step(stub: Stub, run_id: str, *tasks: pb.TaskSpec) -> pb.StepReply:
    return stub.Step(pb.StepRequest(run_id=run_id, tasks=list(tasks)), timeout=120)


@dataclass
class Streamed:
    """What one StreamStep sent: output per task, the order tasks ended in, the reply."""

    stdout: dict[str, bytes] = field(default_factory=dict)
    stderr: dict[str, bytes] = field(default_factory=dict)
    done_order: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    reply: pb.StepReply = field(default_factory=pb.StepReply)

    def json(self, name: str) -> Any:
        return json.loads(self.stdout[name])


def stream(stub: Stub, run_id: str, *tasks: pb.TaskSpec) -> Streamed:
    """Runs a step with StreamStep and gathers its events."""
    out = Streamed()
    for event in stub.StreamStep(pb.StepRequest(run_id=run_id, tasks=list(tasks)), timeout=120):
        kind = event.WhichOneof("event")
        out.kinds.append(kind)
        if kind == "output":
            chunk = event.output.chunk
            target = out.stdout if chunk.stream == pb.STREAM_KIND_STDOUT else out.stderr
            target[event.output.task] = target.get(event.output.task, b"") + chunk.data
        elif kind == "task_done":
            out.done_order.append(event.task_done.name)
        else:
            out.reply = event.done
    assert out.kinds[-1:] == ["done"], "the stream ended without a reply"
    return out


def channel_values(reply: pb.StepReply) -> dict[str, Any]:
    return {name: json.loads(text) for name, text in reply.channels.items()}


def export_tree(stub: Stub, run_id: str, step_number: int) -> Tree:
    """The workspace at a checkpoint, from ExportCheckpoint's tarball (root left out)."""
    data = b"".join(c.data for c in stub.ExportCheckpoint(
        pb.ExportCheckpointRequest(run_id=run_id, step=step_number), timeout=120))
    tree: Tree = {}
    contents: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in (".", ""):
                continue
            if member.isdir():
                tree[name] = ("d", member.mode, None)
            elif member.issym():
                tree[name] = ("l", None, member.linkname)
            elif member.islnk():
                tree[name] = ("f", member.mode, contents[member.linkname])
            elif member.isfile():
                body = tar.extractfile(member)
                assert body is not None
                contents[name] = body.read().decode("latin-1")
                tree[name] = ("f", member.mode, contents[name])
            else:
                tree[name] = ("o", member.mode, None)
    return tree


def worker_run(stub: Stub, run_id: str, step_number: int,
               body: Callable[[str], Any]) -> Any:
    """Calls body(fork_id) on a fork of the run at `step_number`, then closes the fork: a look
    at a checkpoint through a worker that leaves the run itself untouched."""
    fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=step_number, label="test view"))
    try:
        return body(fork.run_id)
    finally:
        stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))


def view(stub: Stub, run_id: str, step_number: int) -> Tree:
    """The workspace at a checkpoint as the kernel's overlay shows it to a worker."""
    def listing(fork_id: str) -> Tree:
        result = execute(stub, fork_id, ["/usr/bin/python3", "-c", LIST_TREE])
        assert result.outcome is not None
        assert result.outcome.exit_code == 0, result.stderr
        return {k: (v[0], v[1], v[2]) for k, v in json.loads(result.stdout).items()}
    return worker_run(stub, run_id, step_number, listing)


def snapshot_at(stub: Stub, run_id: str, step_number: int) -> dict[str, Any]:
    """The channel snapshot a step after checkpoint `step_number` would see (read in a fork)."""
    def read(fork_id: str) -> dict[str, Any]:
        result = execute(stub, fork_id, ["/bin/sh", "-c", "cat <&$AGENTD_CHANNELS_FD"])
        return json.loads(result.stdout)  # type: ignore[no-any-return]
    return worker_run(stub, run_id, step_number, read)  # type: ignore[no-any-return]


def files(tree: Tree) -> dict[str, str | None]:
    """path -> content of the regular files of a tree."""
    return {p: c for p, (kind, _, c) in tree.items() if kind == "f"}


def run_step(stub: Stub, run_id: str) -> int:
    return stub.GetRun(pb.GetRunRequest(run_id=run_id)).step


def checkpoints(stub: Stub, run_id: str) -> list[pb.Checkpoint]:
    return list(stub.ListCheckpoints(pb.ListCheckpointsRequest(run_id=run_id)).checkpoints)


def audit_records(handle: DaemonHandle) -> list[dict[str, Any]]:
    """Every record in the daemon's audit segments, in order."""
    records = []
    for segment in sorted((handle.base / "state" / "audit").glob("audit-*.jsonl")):
        records += [json.loads(line) for line in segment.read_text().splitlines() if line]
    return records


def wait_for(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def uppers(handle: DaemonHandle) -> list[str]:
    return sorted(os.listdir(handle.base / "state" / "workspaces" / "uppers"))


def layers_dir(handle: DaemonHandle) -> Path:
    return handle.base / "state" / "workspaces" / "layers"


def layer_inodes(handle: DaemonHandle) -> dict[str, tuple[int, int]]:
    """Every entry under the layers directory: relative path -> (inode, ctime in ns)."""
    root = layers_dir(handle)
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_ino, st.st_ctime_ns)
    return found


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture
def runs(stub: Stub) -> Iterator[Callable[..., str]]:
    """Creates runs of the integration agent (with CHANNELS unless told), closed after."""
    made: list[str] = []

    def create(channels: list[pb.ChannelDecl] | None = None) -> str:
        run = stub.CreateRun(pb.CreateRunRequest(
            agent="integration", channels=CHANNELS if channels is None else channels))
        made.append(run.run_id)
        return run.run_id

    yield create
    for run_id in made:
        with contextlib.suppress(grpc.RpcError):
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


@contextlib.contextmanager
def own_daemon(config: str) -> Iterator[DaemonHandle]:
    """A daemon of the test's own (the approvals policy in its policies/), stopped after."""
    base = daemon_base()
    (base / "policies").mkdir()
    shutil.copy(APPROVALS_POLICY, base / "policies")
    handle = start_daemon(base, config)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


# --- isolation -------------------------------------------------------------------------------


def _look() -> str:
    """Shell: after a pause, print the workspace's names, shared.txt and the snapshot."""
    return "sleep 0.5; ls -1 | tr '\\n' ' '; echo; cat shared.txt; cat <&$AGENTD_CHANNELS_FD"


class TestIsolation:
    def test_task_sees_neither_a_siblings_files_nor_its_writes(self, stub: Stub,
                                                               runs: Callable[..., str]) -> None:
        """Each task sees exactly step S-1's workspace and channels plus its own changes, never
        a sibling's file created, changed or deleted, or a sibling's channel write."""
        run_id = runs()
        step(stub, run_id, task("setup", "echo v1 > shared.txt; echo old > gone.txt; "
                                + emit("lv", "s1")))
        out = stream(stub, run_id,
                     task("writer", "echo new > a.txt; echo v2 > shared.txt; rm gone.txt; "
                                    + emit("lv", "w") + "; " + _look()),
                     task("reader", "echo b > b.txt; " + emit("ap", "r") + "; " + _look()))
        assert out.reply.state == COMMITTED, out.reply
        seen = {name: out.stdout[name].decode().split("\n") for name in ("writer", "reader")}
        assert seen["writer"][0].split() == ["a.txt", "shared.txt"]
        assert seen["writer"][1] == "v2"
        assert seen["reader"][0].split() == ["b.txt", "gone.txt", "shared.txt"]
        assert seen["reader"][1] == "v1"
        for name in ("writer", "reader"):
            snapshot = json.loads(seen[name][2])
            assert (snapshot["lv"], snapshot["ap"]) == ("s1", []), name
        assert files(view(stub, run_id, 2)) == {"a.txt": "new\n", "b.txt": "b\n",
                                                "shared.txt": "v2\n"}
        assert snapshot_at(stub, run_id, 2) == {"lv": "w", "ap": ["r"], "tp": []}

    def test_every_task_starts_from_the_same_checkpoint(self, stub: Stub,
                                                        runs: Callable[..., str]) -> None:
        """Six tasks started together, writing at staggered times, each read the committed
        state and none of the files the others wrote before it looked."""
        run_id = runs()
        step(stub, run_id, task("setup", "echo 1 > n; " + emit("lv", 1)))
        reader = ("sleep 0.$(($0 % 3)); echo $0 > out.$0; cat n; ls | grep -c '^out'; "
                  "cat <&$AGENTD_CHANNELS_FD")
        out = stream(stub, run_id, *(pb.TaskSpec(name=f"t{i}", argv=["/bin/sh", "-c", reader,
                                                                      str(i)])
                                     for i in range(6)))
        assert out.reply.state == COMMITTED, out.reply
        for i in range(6):
            n, outs, snapshot = out.stdout[f"t{i}"].decode().split("\n", 2)
            assert (n, outs) == ("1", "1"), f"t{i} saw {outs} out.* files"
            assert json.loads(snapshot)["lv"] == 1
        assert len(files(view(stub, run_id, 2))) == 7

    def test_snapshot_fd_cannot_be_written(self, stub: Stub, runs: Callable[..., str]) -> None:
        """The channel snapshot is read-only: a task writing to it fails to, and the next task
        still reads the committed values."""
        run_id = runs()
        step(stub, run_id, task("setup", emit("lv", "kept")))
        out = stream(stub, run_id,
                     task("vandal", "echo '{}' >&$AGENTD_CHANNELS_FD && echo wrote || echo "
                                    "refused", allow_failure=True))
        assert out.stdout["vandal"].strip() == b"refused"
        assert snapshot_at(stub, run_id, run_step(stub, run_id))["lv"] == "kept"


# --- determinism -----------------------------------------------------------------------------


class TestDeterminism:
    REPEATS = 8

    def test_result_does_not_depend_on_completion_order(self, stub: Stub,
                                                        runs: Callable[..., str]) -> None:
        """The same step run many times with random task delays commits the same channels,
        versions and workspace, in task order whatever order the tasks ended in."""
        rng = random.Random(0xA6E)
        names = ["x", "y", "p", "q"]
        results = set()
        orders = set()
        for _ in range(self.REPEATS):
            run_id = runs()
            delays = dict(zip(names, rng.sample([0.0, 0.05, 0.1, 0.15], 4), strict=True))
            out = stream(stub, run_id, *(task(name, "; ".join([
                f"sleep {delays[name]}", f"mkdir -p out; echo {name} > out/{name}",
                emit("ap", name), emit("ap", [name, 2]), emit("tp", name),
                *([emit("br", name)] if name in ("x", "y") else [])])) for name in names))
            assert out.reply.state == COMMITTED, out.reply
            assert [t.name for t in out.reply.tasks] == names
            orders.add(tuple(out.done_order))
            tree = export_tree(stub, run_id, 1)
            results.add(json.dumps([channel_values(out.reply), dict(out.reply.versions),
                                    sorted((p, k, c) for p, (k, _, c) in tree.items())],
                                   sort_keys=True))
        assert len(orders) > 1, "the delays did not change the completion order"
        assert len(results) == 1, results
        committed = json.loads(results.pop())[0]
        assert committed["ap"] == ["x", ["x", 2], "y", ["y", 2], "p", ["p", 2], "q", ["q", 2]]
        assert committed["tp"] == ["x", "y", "p", "q"]
        assert committed["br"] == {"x": "x", "y": "y"}


# --- reducers --------------------------------------------------------------------------------


class TestReducers:
    def test_last_value(self, stub: Stub, runs: Callable[..., str]) -> None:
        """last_value keeps the last write of the one task that wrote it, across steps too,
        and its version moves only on a step that wrote it."""
        run_id = runs()
        first = step(stub, run_id, task("a", emit("lv", 1) + "; " + emit("lv", 2)))
        assert channel_values(first)["lv"] == 2
        assert first.versions["lv"] == 1
        second = step(stub, run_id, task("b", emit("lv", {"k": [1]})))
        assert channel_values(second)["lv"] == {"k": [1]}
        assert second.versions["lv"] == 2
        third = step(stub, run_id, task("c", "touch f"))  # a checkpoint that writes no value
        assert channel_values(third)["lv"] == {"k": [1]}
        assert third.versions["lv"] == 2
        assert snapshot_at(stub, run_id, 3)["lv"] == {"k": [1]}

    def test_append(self, stub: Stub, runs: Callable[..., str]) -> None:
        """append adds every write as one element (a list stays one element), in task order
        then write order, and accumulates across steps."""
        run_id = runs()
        first = step(stub, run_id,
                     task("a", "sleep 0.2; " + emit("ap", 1) + "; " + emit("ap", [2, 3])),
                     task("b", emit("ap", "x")))
        assert channel_values(first)["ap"] == [1, [2, 3], "x"]
        assert first.versions["ap"] == 1
        second = step(stub, run_id, task("a", emit("ap", 4)))
        assert channel_values(second)["ap"] == [1, [2, 3], "x", 4]
        assert second.versions["ap"] == 2
        assert snapshot_at(stub, run_id, 2)["ap"] == [1, [2, 3], "x", 4]

    def test_topic_is_visible_for_one_step(self, stub: Stub, runs: Callable[..., str]) -> None:
        """A topic holds the values written in one step, is what the next step sees, and is
        cleared (a new version) by a step that writes none."""
        run_id = runs()
        first = step(stub, run_id, task("a", emit("tp", "m1")), task("b", emit("tp", "m2")))
        assert channel_values(first)["tp"] == ["m1", "m2"]
        assert first.versions["tp"] == 1
        out = stream(stub, run_id, task("read", "cat <&$AGENTD_CHANNELS_FD"))
        assert out.json("read")["tp"] == ["m1", "m2"]
        assert channel_values(out.reply)["tp"] == []
        assert out.reply.versions["tp"] == 2
        assert snapshot_at(stub, run_id, 2)["tp"] == []
        quiet = step(stub, run_id, task("quiet", "true"))
        assert quiet.versions["tp"] == 2, "an empty topic that stays empty did not change"

    def test_barrier_is_available_once_every_named_task_wrote(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """A barrier stays hidden until every named task has written (across steps), is then
        seen by exactly one step as {task: value}, and is consumed when that step commits."""
        run_id = runs()
        first = step(stub, run_id, task("x", emit("br", 1)))
        assert "br" not in first.channels
        assert first.versions["br"] == 1
        out = stream(stub, run_id, task("y", "cat <&$AGENTD_CHANNELS_FD; " + emit("br", 2)))
        assert out.reply.state == COMMITTED
        assert "br" not in out.json("y")
        assert channel_values(out.reply)["br"] == {"x": 1, "y": 2}
        out = stream(stub, run_id, task("z", "cat <&$AGENTD_CHANNELS_FD"))
        assert out.reply.state == COMMITTED
        assert out.json("z")["br"] == {"x": 1, "y": 2}
        assert "br" not in out.reply.channels
        assert out.reply.versions["br"] == 3
        assert "br" not in snapshot_at(stub, run_id, 3)

    def test_versions_move_only_for_changed_channels(self, stub: Stub,
                                                     runs: Callable[..., str]) -> None:
        """Each commit bumps the version of exactly the channels it changed."""
        run_id = runs()
        first = step(stub, run_id, task("a", emit("lv", 1)))
        assert dict(first.versions) == {"lv": 1, "ap": 0, "tp": 0, "br": 0}
        second = step(stub, run_id, task("a", emit("ap", 1)))
        assert dict(second.versions) == {"lv": 1, "ap": 1, "tp": 0, "br": 0}
        assert [dict(c.versions) for c in checkpoints(stub, run_id)][1:] == [
            dict(first.versions), dict(second.versions)]


# --- conflicts -------------------------------------------------------------------------------


class TestConflicts:
    SETUP = ("mkdir -p d/sub && echo x > d/sub/x && echo f > f.txt && echo s > src && "
             "echo m > mode.txt && " + emit("lv", "before"))

    @pytest.mark.parametrize(("first", "second", "path"), [
        pytest.param("echo 1 > new.txt", "echo 1 > new.txt", "new.txt", id="same-new-file"),
        pytest.param("echo a >> f.txt", "echo b > f.txt", "f.txt", id="same-changed-file"),
        pytest.param("rm f.txt", "rm f.txt", "f.txt", id="both-delete"),
        pytest.param("mv src one", "mv src two", "src", id="both-rename-away"),
        pytest.param("rm -rf d", "echo y > d/sub/y", "d", id="write-under-deleted-dir"),
        pytest.param("rm -rf d; echo file > d", "mkdir -p d/sub/z", "d",
                     id="write-under-dir-made-file"),
        pytest.param("chmod 600 mode.txt", "chmod 640 mode.txt", "mode.txt", id="both-chmod"),
        pytest.param("ln -s f.txt ln", "mkdir ln", "ln", id="symlink-vs-dir"),
    ])
    def test_two_tasks_changing_one_path_fail_the_step(
            self, stub: Stub, runs: Callable[..., str], first: str, second: str,
            path: str) -> None:
        """Two tasks changing the same path (or one under what the other replaced) is a
        conflict naming both tasks; the step applies nothing, not even the other changes."""
        run_id = runs()
        step(stub, run_id, task("setup", self.SETUP))
        before = export_tree(stub, run_id, 1)
        reply = step(stub, run_id, task("one", first + "; echo 1 > only-one"),
                     task("two", second + "; " + emit("ap", "two")))
        assert reply.state == FAILED, reply
        assert reply.conflicts, reply
        assert any((c.startswith(f"{path}:") or f"written under {path}," in c)
                   and "tasks 'one' and 'two'" in c for c in reply.conflicts), reply
        assert "conflict" in reply.reason
        _assert_nothing_applied(stub, run_id, 1, before)

    def test_two_last_value_writes_fail_the_step(self, stub: Stub,
                                                 runs: Callable[..., str]) -> None:
        """Two tasks writing one last_value channel is a conflict naming the channel and both
        tasks; nothing of the step is applied."""
        run_id = runs()
        step(stub, run_id, task("setup", self.SETUP))
        before = export_tree(stub, run_id, 1)
        reply = step(stub, run_id, task("one", emit("lv", 1) + "; echo 1 > one"),
                     task("two", emit("lv", 1)))
        assert reply.state == FAILED
        assert reply.conflicts == ["tasks one and two both wrote channel 'lv' (last_value)"]
        _assert_nothing_applied(stub, run_id, 1, before)
        assert snapshot_at(stub, run_id, 1)["lv"] == "before"

    def test_files_side_by_side_in_one_new_directory_do_not_conflict(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """Two tasks creating different files in a directory both create is not a conflict."""
        run_id = runs()
        reply = step(stub, run_id, task("one", "mkdir -p out/deep && echo 1 > out/deep/one"),
                     task("two", "mkdir -p out/deep && echo 2 > out/deep/two"))
        assert reply.state == COMMITTED, reply
        assert files(view(stub, run_id, 1)) == {"out/deep/one": "1\n", "out/deep/two": "2\n"}


def _assert_nothing_applied(stub: Stub, run_id: str, at: int, before: Tree) -> None:
    """The run is still at step `at`, with no new checkpoint and the same workspace."""
    assert run_step(stub, run_id) == at
    assert [c.step for c in checkpoints(stub, run_id)] == list(range(at + 1))
    assert export_tree(stub, run_id, at) == before
    assert view(stub, run_id, at) == before


# --- failed steps ----------------------------------------------------------------------------


class TestFailedSteps:
    def test_a_failing_task_fails_the_step_and_nothing_applies(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """A task exiting non-zero fails the step, named with its exit; its siblings' files
        and channel writes are not applied either."""
        run_id = runs()
        step(stub, run_id, task("setup", "echo 1 > keep; " + emit("lv", "before")))
        before = export_tree(stub, run_id, 1)
        reply = step(stub, run_id, task("good", "echo 2 > keep; echo n > new; "
                                                + emit("lv", "after") + "; " + emit("ap", 1)),
                     task("bad", "echo b > bad; exit 3"))
        assert reply.state == FAILED
        assert reply.reason.startswith("task bad:"), reply.reason
        assert "3" in reply.reason, reply.reason
        reports = {t.name: t for t in reply.tasks}
        assert reports["bad"].failure
        assert not reports["good"].failure
        assert reports["bad"].outcome.exit_code == 3
        _assert_nothing_applied(stub, run_id, 1, before)
        assert snapshot_at(stub, run_id, 1) == {"lv": "before", "ap": [], "tp": []}
        attempts = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps
        assert [(a.step, a.state) for a in attempts] == [(1, COMMITTED), (2, FAILED)]

    def test_allow_failure_commits_the_tasks_changes(self, stub: Stub,
                                                     runs: Callable[..., str]) -> None:
        """With allow_failure a non-zero exit does not fail the step: every task's changes,
        the failing one's included, are committed."""
        run_id = runs()
        reply = step(stub, run_id, task("ok", "echo 1 > one"),
                     task("meh", "echo 2 > two; " + emit("ap", "meh") + "; exit 5",
                          allow_failure=True))
        assert reply.state == COMMITTED, reply
        assert {t.name: t.outcome.exit_code for t in reply.tasks} == {"ok": 0, "meh": 5}
        assert files(view(stub, run_id, 1)) == {"one": "1\n", "two": "2\n"}
        assert channel_values(reply)["ap"] == ["meh"]

    @pytest.mark.parametrize(("script", "timeout", "word"), [
        pytest.param("echo x > f; sleep 20", 0.5, "timeout", id="wall-time"),
        pytest.param("echo x > f; head -c 3000000 /dev/zero", 0.0, "output", id="output"),
    ])
    def test_a_task_killed_for_a_limit_fails_the_step_even_if_allowed_to_fail(
            self, stub: Stub, runs: Callable[..., str], script: str, timeout: float,
            word: str) -> None:
        """A task stopped for a limit fails the step whatever allow_failure says, naming the
        task and the limit; nothing is applied."""
        run_id = runs()
        reply = step(stub, run_id, task("ok", "echo 1 > one"),
                     task("hog", script, allow_failure=True, timeout_seconds=timeout))
        assert reply.state == FAILED, reply
        assert reply.reason.startswith("task hog:"), reply.reason
        assert word in reply.reason, reply.reason
        _assert_nothing_applied(stub, run_id, 0, {})

    @pytest.mark.parametrize(("writes", "words"), [
        pytest.param("echo 'not json' >&$AGENTD_WRITES_FD", ["line 1", "JSON"], id="not-json"),
        pytest.param(emit("nope", 1), ["nope"], id="undeclared"),
        pytest.param("echo '{\"channel\": \"lv\"}' >&$AGENTD_WRITES_FD", ["value"],
                     id="no-value"),
        pytest.param("head -c 1100000 /dev/zero | tr '\\0' x >&$AGENTD_WRITES_FD",
                     ["writes"], id="over-the-size-cap"),
    ])
    def test_bad_writes_fail_the_step(self, stub: Stub, runs: Callable[..., str], writes: str,
                                      words: list[str]) -> None:
        """Malformed, undeclared or oversized channel writes fail the step, saying why."""
        run_id = runs()
        reply = step(stub, run_id, task("ok", "echo 1 > one; " + emit("ap", 1)),
                     task("bad", writes))
        assert reply.state == FAILED, reply
        assert reply.reason.startswith("task bad:"), reply.reason
        for word in words:
            assert word in reply.reason, reply.reason
        _assert_nothing_applied(stub, run_id, 0, {})

    def test_barrier_write_by_an_unnamed_task_fails_the_step(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """Only the tasks a barrier names may write it; another task's write fails the step."""
        run_id = runs()
        reply = step(stub, run_id, task("x", emit("br", 1)), task("intruder", emit("br", 2)))
        assert reply.state == FAILED
        assert reply.reason.startswith("task intruder:"), reply.reason
        assert run_step(stub, run_id) == 0

    def test_a_failing_exec_commits_nothing(self, stub: Stub, runs: Callable[..., str]) -> None:
        """Exec is a step of one task: a failing tool's changes and writes are not committed
        and the outcome says why; a succeeding one commits as the next step."""
        run_id = runs()
        failed = execute(stub, run_id, ["/bin/sh", "-c", "echo x > f; " + emit("lv", 1)
                                        + "; exit 2"])
        assert failed.outcome is not None
        assert not failed.outcome.committed
        assert failed.outcome.step_failure
        assert run_step(stub, run_id) == 0
        done = execute(stub, run_id, ["/bin/sh", "-c", "echo y > g; " + emit("lv", 2)])
        assert done.outcome is not None
        assert done.outcome.committed
        assert done.outcome.step == 1
        assert run_step(stub, run_id) == 1
        assert files(export_tree(stub, run_id, 1)) == {"g": "y\n"}
        assert snapshot_at(stub, run_id, 1)["lv"] == 2

    def test_a_step_whose_caller_goes_away_applies_nothing_and_leaves_nothing(
            self, daemon: DaemonHandle, stub: Stub, runs: Callable[..., str]) -> None:
        """Cancelling a StreamStep kills its workers, applies nothing, removes the tasks'
        uppers, and the run accepts the next step."""
        run_id = runs()
        marker = "agentd-steps-" + uuid.uuid4().hex
        spare = uppers(daemon)  # left by earlier tests, if any
        events = stub.StreamStep(pb.StepRequest(run_id=run_id, tasks=[
            pb.TaskSpec(name="slow", argv=["/bin/sh", "-c", "echo x > f; echo go; sleep 30",
                                           marker]),
            pb.TaskSpec(name="other", argv=["/bin/sh", "-c", "echo y > g; sleep 30", marker])]))
        for event in events:
            if event.WhichOneof("event") == "output":
                break
        events.cancel()
        assert wait_for(lambda: not marked_processes(marker), 10), marked_processes(marker)
        assert wait_for(lambda: uppers(daemon) == spare, 5), (
            f"the cancelled step's uppers were left behind: {set(uppers(daemon)) - set(spare)}")
        assert run_step(stub, run_id) == 0
        assert step(stub, run_id, task("next", "echo z > h")).state == COMMITTED
        assert files(view(stub, run_id, 1)) == {"h": "z\n"}

    def test_a_step_over_the_worker_limit_leaves_nothing_running(self) -> None:
        """A step that cannot get a worker for every task ends with none of its tasks still
        running and no upper left, applies nothing, and the run accepts a smaller step."""
        config = CONFIG.replace("[daemon]\n", "[daemon]\nmax_concurrent_workers = 2\n", 1)
        marker = "agentd-steps-" + uuid.uuid4().hex
        with own_daemon(config) as handle:
            stub = handle.stub()
            run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
            tasks = [pb.TaskSpec(name=f"t{i}", argv=["/bin/sh", "-c", "echo > f$0; sleep 2",
                                                      f"{i}-{marker}"]) for i in range(4)]
            try:
                outcome = pb.StepState.Name(stub.Step(pb.StepRequest(run_id=run_id, tasks=tasks),
                                                      timeout=60).state)
            except grpc.RpcError as error:
                outcome = error.code().name
            assert outcome in ("STEP_STATE_FAILED", "RESOURCE_EXHAUSTED")
            assert not wait_for(lambda: marked_processes(marker), 1.0), (
                "tasks of the failed step run on after its reply")
            assert uppers(handle) == [], "the refused step's uppers were left behind"
            assert run_step(stub, run_id) == 0
            assert step(stub, run_id, task("a", "echo 1 > a"),
                        task("b", "echo 2 > b")).state == COMMITTED


# --- workspace semantics ---------------------------------------------------------------------


class TestWorkspaceChanges:
    SETUP = """
        echo keep > keep.txt; echo del > del.txt; echo ren > ren_src.txt
        mkdir -p dir_to_file/a && echo b > dir_to_file/a/b.txt
        echo f > file_to_dir
        mkdir -p replaced/old && echo old > replaced/old.txt && echo o > replaced/old/x
        echo '#!/bin/sh' > perm.sh && chmod 644 perm.sh
        mkdir permdir && echo i > permdir/inner.txt && chmod 755 permdir
        ln -s keep.txt link
        mkdir -p deepdel/x/y && echo z > deepdel/x/y/z.txt
        mkdir -p renamed_dir/sub && echo r > renamed_dir/sub/r.txt
    """
    CHANGES: ClassVar[list[pb.TaskSpec]] = [
        task("deleter", "rm del.txt && mv ren_src.txt ren_dst.txt && rm -rf deepdel"
                        " && mv renamed_dir moved_dir"),
        task("replacer", "rm -rf dir_to_file && echo now-a-file > dir_to_file"
                         " && rm file_to_dir && mkdir file_to_dir && echo in > file_to_dir/in"),
        task("modes", "rm -rf replaced && mkdir replaced && echo new > replaced/new.txt"
                      " && chmod 755 perm.sh && chmod 700 permdir && chmod 600 keep.txt"
                      " && ln -sf ren_dst.txt link"),
    ]
    AFTER: ClassVar[Tree] = {
        "keep.txt": ("f", 0o600, "keep\n"), "ren_dst.txt": ("f", 0o644, "ren\n"),
        "dir_to_file": ("f", 0o644, "now-a-file\n"), "file_to_dir": ("d", 0o755, None),
        "file_to_dir/in": ("f", 0o644, "in\n"), "replaced": ("d", 0o755, None),
        "replaced/new.txt": ("f", 0o644, "new\n"), "perm.sh": ("f", 0o755, "#!/bin/sh\n"),
        "permdir": ("d", 0o700, None), "permdir/inner.txt": ("f", 0o644, "i\n"),
        "link": ("l", None, "ren_dst.txt"), "moved_dir": ("d", 0o755, None),
        "moved_dir/sub": ("d", 0o755, None), "moved_dir/sub/r.txt": ("f", 0o644, "r\n"),
    }

    def test_deletes_renames_replacements_and_modes_survive_commit_and_rollback(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """Deleted, renamed and replaced entries (a directory made a file and back, a directory
        emptied and recreated) and changed modes and links commit exactly, are seen exactly so
        by the next step, and rolling back restores the earlier tree exactly."""
        run_id = runs([])
        assert step(stub, run_id, task("setup", "umask 022; " + self.SETUP)).state == COMMITTED
        before = export_tree(stub, run_id, 1)
        assert before["replaced/old/x"] == ("f", 0o644, "o\n")
        assert before["link"] == ("l", None, "keep.txt")
        assert view(stub, run_id, 1) == before
        reply = step(stub, run_id, *(pb.TaskSpec(name=t.name, argv=[
            "/bin/sh", "-c", "umask 022; " + t.argv[2]]) for t in self.CHANGES))
        assert reply.state == COMMITTED, reply
        after = export_tree(stub, run_id, 2)
        assert after == self.AFTER
        assert view(stub, run_id, 2) == self.AFTER
        # One step later, on top of the replacements: the old contents stay hidden.
        step(stub, run_id, task("more", "echo more > replaced/more.txt; rm keep.txt"))
        later = view(stub, run_id, 3)
        assert "replaced/old.txt" not in later
        assert "replaced/old" not in later
        assert later["replaced/more.txt"] == ("f", 0o644, "more\n")
        assert "keep.txt" not in later
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=2))
        assert export_tree(stub, run_id, 2) == self.AFTER == view(stub, run_id, 2)
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        assert export_tree(stub, run_id, 1) == before == view(stub, run_id, 1)
        assert files(before)["del.txt"] == "del\n"


# --- streaming, single writer ----------------------------------------------------------------


class TestStreaming:
    def test_stream_step_reports_output_then_each_task_then_the_reply(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """StreamStep sends each task's output tagged with its name, a task_done per task
        after its output, and the StepReply last."""
        run_id = runs()
        out = stream(stub, run_id, task("a", "echo out-a; echo err-a >&2; touch a"),
                     task("b", "sleep 0.2; echo out-b"))
        assert out.stdout == {"a": b"out-a\n", "b": b"out-b\n"}
        assert out.stderr == {"a": b"err-a\n"}
        assert out.kinds[-1] == "done"
        assert out.kinds.count("done") == 1
        assert sorted(out.done_order) == ["a", "b"]
        assert out.reply.state == COMMITTED
        assert out.reply.step == 1

    def test_step_reply_carries_each_tasks_output(self, stub: Stub,
                                                  runs: Callable[..., str]) -> None:
        """The unary Step reply carries each task's stdout and stderr in its TaskReport."""
        run_id = runs()
        reply = step(stub, run_id, task("a", "echo out-a; echo err-a >&2"))
        report = reply.tasks[0]
        assert (report.stdout, report.stderr) == (b"out-a\n", b"err-a\n"), report


class TestSingleWriter:
    def test_a_second_step_on_a_busy_run_waits_its_turn(self, stub: Stub,
                                                       runs: Callable[..., str]) -> None:
        """While a step runs, another Step and an Exec on the same run queue behind it and run
        in turn, each on the checkpoint before it (base_step); a Rollback is ABORTED at once,
        as is a step that expects a checkpoint the run is not at. One that expected the head
        as it was when it arrived is ABORTED when its turn comes, the head having moved."""
        run_id = runs()
        events = stub.StreamStep(pb.StepRequest(run_id=run_id, tasks=[
            task("long", "echo started; sleep 1; echo 1 > first")]), timeout=60)
        first = next(events)
        assert first.WhichOneof("event") == "output"
        second = stub.Step.future(pb.StepRequest(run_id=run_id, tasks=[
            task("second", "echo 2 > second")]), timeout=60)
        stale = stub.Step.future(pb.StepRequest(run_id=run_id, expect_step=0, tasks=[
            task("stale", "echo 3 > stale")]), timeout=60)
        time.sleep(0.2)  # both queued, in this order
        for call in (lambda: stub.Rollback(pb.RollbackRequest(run_id=run_id, step=0)),
                     lambda: stub.Step(pb.StepRequest(run_id=run_id, expect_step=7, tasks=[
                         task("wrong", "true")]), timeout=60)):
            assert rpc_error(call).code() == grpc.StatusCode.ABORTED
        third = execute(stub, run_id, ["/bin/sh", "-c", "echo 3 > third"])  # queues too
        assert list(events)[-1].done.state == COMMITTED
        assert (second.result().state, second.result().step,
                second.result().base_step) == (COMMITTED, 2, 1)
        with pytest.raises(grpc.RpcError) as moved:
            stale.result()
        assert moved.value.code() == grpc.StatusCode.ABORTED
        assert "is at step 2, not 0" in (moved.value.details() or "")
        assert third.outcome is not None
        assert (third.outcome.committed, third.outcome.step, third.outcome.base_step) == (
            True, 3, 2)
        assert files(view(stub, run_id, 3)) == {"first": "1\n", "second": "2\n",
                                                "third": "3\n"}

    def test_concurrent_steps_on_one_run_both_commit_one_after_the_other(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """Two Step calls sent at once on one run both commit, as steps 1 and 2, the second
        on the first's checkpoint; two that both expect step 0 are one commit and one
        ABORTED."""
        for _ in range(2):
            run_id = runs()
            go = threading.Barrier(2)

            def call(name: str, run_id: str = run_id, go: threading.Barrier = go,
                     expect: int | None = None) -> tuple[str, int, int]:
                go.wait()
                try:
                    reply = stub.Step(pb.StepRequest(run_id=run_id, expect_step=expect, tasks=[
                        task(name, f"echo {name} > {name}; sleep 0.5")]), timeout=60)
                    return pb.StepState.Name(reply.state), reply.step, reply.base_step
                except grpc.RpcError as error:
                    return error.code().name, -1, -1

            with ThreadPoolExecutor(2) as pool:
                outcomes = sorted(pool.map(call, ["a", "b"]))
            assert [(o[0], o[1], o[2]) for o in outcomes] == [
                ("STEP_STATE_COMMITTED", 1, 0), ("STEP_STATE_COMMITTED", 2, 1)]
            assert len(files(export_tree(stub, run_id, 2))) == 2

            run_id = runs()
            go = threading.Barrier(2)
            with ThreadPoolExecutor(2) as pool:
                expecting = sorted(pool.map(
                    lambda n: call(n, run_id, go, 0), ["a", "b"]))  # noqa: B023
            assert [o[0] for o in expecting] == ["ABORTED", "STEP_STATE_COMMITTED"]
            assert run_step(stub, run_id) == 1

    def test_the_queue_is_bounded(self, stub: Stub, runs: Callable[..., str]) -> None:
        """At most MAX_QUEUED_STEPS wait behind a running step; one more is
        RESOURCE_EXHAUSTED at once, and every queued one still runs."""
        run_id = runs()
        events = stub.StreamStep(pb.StepRequest(run_id=run_id, tasks=[
            task("long", "echo started; sleep 3; echo 1 > first")]), timeout=60)
        assert next(events).WhichOneof("event") == "output"
        queued = [stub.Step.future(pb.StepRequest(run_id=run_id, tasks=[
            task("q", f"echo {n} > q{n}")]), timeout=60) for n in range(MAX_QUEUED_STEPS)]
        time.sleep(0.5)
        assert rpc_error(lambda: step(stub, run_id, task("over", "true"))).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert list(events)[-1].done.state == COMMITTED
        assert sorted(f.result().step for f in queued) == list(
            range(2, MAX_QUEUED_STEPS + 2))

    def test_steps_on_different_runs_run_together(self, stub: Stub,
                                                  runs: Callable[..., str]) -> None:
        """The single-writer rule is per run: steps on two runs overlap and both commit."""
        first, second = runs(), runs()
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda r: step(stub, r, task("t", "sleep 1; echo > f")),
                                    [first, second]))
        assert [r.state for r in replies] == [COMMITTED, COMMITTED]
        spans = sorted((r.created_at.ToNanoseconds() / 1e9, r.created_at.ToNanoseconds() / 1e9
                        + r.wall_seconds) for r in replies)
        assert spans[1][0] < spans[0][1], f"the steps ran one after the other: {spans}"


# --- checkpoints: rollback, fork, export -----------------------------------------------------


def _three_steps(stub: Stub, run_id: str) -> list[str]:
    """Steps 1-3, each adding file sN and appending N; returns each checkpoint's top layer."""
    tops = []
    for n in (1, 2, 3):
        assert step(stub, run_id, task("t", f"echo {n} > s{n}; " + emit("ap", n))).state \
            == COMMITTED
        tops.append(stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace)
    return tops


class TestRollbackFork:
    def test_rollback_returns_to_a_checkpoint_and_drops_the_later_ones(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """ListCheckpoints lists every committed step; Rollback makes the run that checkpoint
        (files and channels), drops the later ones, and the next step takes the next number."""
        run_id = runs()
        _three_steps(stub, run_id)
        assert [(c.step, c.layers) for c in checkpoints(stub, run_id)] == [
            (0, 1), (1, 2), (2, 3), (3, 4)]
        run = stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        assert run.step == 1 == run_step(stub, run_id)
        assert [c.step for c in checkpoints(stub, run_id)] == [0, 1]
        assert files(view(stub, run_id, 1)) == {"s1": "1\n"}
        assert snapshot_at(stub, run_id, 1)["ap"] == [1]
        reply = step(stub, run_id, task("t", "echo again > s2; " + emit("ap", "again")))
        assert reply.step == 2
        assert channel_values(reply)["ap"] == [1, "again"]
        timeline = [(s.step, s.state) for s in
                    stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps]
        assert timeline == [(1, COMMITTED), (2, DISCARDED), (3, DISCARDED), (2, COMMITTED)]

    def test_rollback_and_fork_refuse_steps_that_do_not_exist(
            self, stub: Stub, runs: Callable[..., str]) -> None:
        """Rolling forward is FAILED_PRECONDITION; forking or exporting a checkpoint that does
        not exist is NOT_FOUND."""
        run_id = runs()
        step(stub, run_id, task("t", "true"))
        assert rpc_error(lambda: stub.Rollback(pb.RollbackRequest(run_id=run_id, step=5))
                         ).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error(lambda: stub.Fork(pb.ForkRequest(run_id=run_id, step=9))
                         ).code() == grpc.StatusCode.NOT_FOUND
        assert rpc_error(lambda: export_tree(stub, run_id, 9)).code() == \
            grpc.StatusCode.NOT_FOUND

    def test_fork_shares_the_checkpoint_then_diverges(self, stub: Stub,
                                                      runs: Callable[..., str]) -> None:
        """A fork starts at the checkpoint (same top layer directory, same channel values and
        declarations, checkpoints 0..step) and then neither run sees the other's steps."""
        run_id = runs()
        tops = _three_steps(stub, run_id)
        fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=2, label="alt"))
        try:
            assert (fork.step, fork.forked_from, fork.forked_at_step) == (2, run_id, 2)
            assert fork.workspace == tops[1], "the fork does not share the checkpoint's layer"
            assert [c.step for c in checkpoints(stub, fork.run_id)] == [0, 1, 2]
            assert list(fork.channels) == list(CHANNELS)
            assert snapshot_at(stub, fork.run_id, 2)["ap"] == [1, 2]
            assert step(stub, fork.run_id, task("t", "echo f > forked; rm s1")).step == 3
            assert step(stub, run_id, task("t", "echo o > original")).step == 4
            assert set(files(view(stub, fork.run_id, 3))) == {"s2", "forked"}
            assert set(files(view(stub, run_id, 4))) == {"s1", "s2", "s3", "original"}
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))

    def test_rollback_releases_layers_no_checkpoint_uses(
            self, daemon: DaemonHandle, stub: Stub, runs: Callable[..., str]) -> None:
        """Rolling back deletes the layers only the dropped checkpoints used, and keeps those a
        fork still uses until the fork is closed."""
        run_id = runs()
        tops = _three_steps(stub, run_id)
        fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=2))
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        assert Path(tops[0]).is_dir()
        assert Path(tops[1]).is_dir()
        assert not Path(tops[2]).exists(), "the dropped step 3's layer is still on disk"
        stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))
        assert not Path(tops[1]).exists(), "step 2's layer outlived the fork that used it"
        assert files(view(stub, run_id, 1)) == {"s1": "1\n"}

    def test_export_is_the_workspace_as_workers_see_it(self, stub: Stub,
                                                       runs: Callable[..., str]) -> None:
        """ExportCheckpoint streams a tarball of exactly the tree a worker sees, at any kept
        checkpoint."""
        run_id = runs()
        _three_steps(stub, run_id)
        step(stub, run_id, task("t", "rm s1; mkdir d; echo x > d/x; ln -s s2 l"))
        for number in (1, 4):
            assert export_tree(stub, run_id, number) == view(stub, run_id, number)
        assert export_tree(stub, run_id, 4) == {
            "s2": ("f", 0o644, "2\n"), "s3": ("f", 0o644, "3\n"), "d": ("d", 0o755, None),
            "d/x": ("f", 0o644, "x\n"), "l": ("l", None, "s2")}

    def test_rollback_fork_and_export_are_audited(self, daemon: DaemonHandle, stub: Stub,
                                                  runs: Callable[..., str]) -> None:
        """Rollback, fork and export each leave an audit record naming the caller, the run and
        the checkpoint."""
        run_id = runs()
        _three_steps(stub, run_id)
        export_tree(stub, run_id, 2)
        fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=2, label="audited"))
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))
        records = audit_records(daemon)
        ours = [r for r in records if r.get("run_id") in (run_id, fork.run_id)]
        by_event = {r["event"]: r for r in ours}
        assert by_event["checkpoint.exported"]["details"]["step"] == 2
        assert by_event["run.forked"]["run_id"] == fork.run_id
        assert by_event["run.forked"]["details"]["from_run"] == run_id
        assert by_event["run.forked"]["details"]["at_step"] == 2
        assert by_event["run.rolled_back"]["details"] == {"from_step": 3, "to_step": 1}
        for event in ("checkpoint.exported", "run.forked", "run.rolled_back"):
            assert by_event[event]["actor"]["role"] == "client"


# --- O(1) rollback and fork ------------------------------------------------------------------


@dataclass
class BigRun:
    run_id: str
    size: int


# Creates argv[2] empty files in directory argv[1] (mknod: one syscall a file).
MAKE_FILES = ("import os, stat, sys\nos.makedirs(sys.argv[1])\n"
              "for i in range(int(sys.argv[2])):\n"
              "    os.mknod(f'{sys.argv[1]}/{i}', 0o644 | stat.S_IFREG)\n")
CHANGE_TEN = "for i in 0 1 2 3 4 5 6 7 8 9; do echo $0 > big/p0/$i; done"
COUNT_AND_READ = "find big -type f | wc -l; cat big/p0/0 big/p0/9"


@pytest.fixture(scope="module", params=[10, 100_000], ids=["10-files", "100000-files"])
def big_run(request: pytest.FixtureRequest, stub: Stub) -> Iterator[BigRun]:
    """A run whose step 1 made a workspace of `size` files (4 tasks in parallel for the big
    one) and whose step 2 changed 10 of them to 'v2'."""
    size: int = request.param
    parts = 4 if size >= 1000 else 1
    run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
    reply = stub.Step(pb.StepRequest(run_id=run_id, tasks=[
        pb.TaskSpec(name=f"p{j}", argv=["/usr/bin/python3", "-c", MAKE_FILES, f"big/p{j}",
                                        str(size // parts)]) for j in range(parts)]),
        timeout=300)
    assert reply.state == COMMITTED, reply
    assert step(stub, run_id, pb.TaskSpec(name="ten", argv=["/bin/sh", "-c", CHANGE_TEN,
                                                             "v2"])).state == COMMITTED
    yield BigRun(run_id, size)
    stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


def _count_and_read(stub: Stub, run_id: str) -> list[str]:
    return execute(stub, run_id, ["/bin/sh", "-c", COUNT_AND_READ]).text.split()


class TestConstantTime:
    def test_fork_creates_and_copies_nothing(self, daemon: DaemonHandle, stub: Stub,
                                             big_run: BigRun) -> None:
        """Forking at 10 or 100,000 files creates no layer entry, changes no inode's ctime,
        shares the source's layer directories, and the fork sees the whole workspace."""
        source = stub.GetRun(pb.GetRunRequest(run_id=big_run.run_id))
        before, spare = layer_inodes(daemon), uppers(daemon)
        at_two = stub.Fork(pb.ForkRequest(run_id=big_run.run_id, step=2))
        at_one = stub.Fork(pb.ForkRequest(run_id=big_run.run_id, step=1))
        after = layer_inodes(daemon)
        assert after == before, _difference(before, after)
        assert uppers(daemon) == spare
        try:
            assert at_two.workspace == source.workspace
            assert [c.layers for c in checkpoints(stub, at_two.run_id)] == \
                [c.layers for c in checkpoints(stub, big_run.run_id)]
            assert _count_and_read(stub, at_two.run_id) == [str(big_run.size), "v2", "v2"]
            assert _count_and_read(stub, at_one.run_id) == [str(big_run.size)]
        finally:
            for fork in (at_two, at_one):
                stub.CloseRun(pb.CloseRunRequest(run_id=fork.run_id))

    def test_rollback_creates_and_copies_nothing(self, daemon: DaemonHandle, stub: Stub,
                                                 big_run: BigRun) -> None:
        """Rolling back at 10 or 100,000 files creates no layer entry and changes no inode
        (it may only delete the dropped step's own layer), and the workspace is then exactly
        the checkpoint's."""
        run_id = big_run.run_id
        assert step(stub, run_id, pb.TaskSpec(name="ten", argv=["/bin/sh", "-c", CHANGE_TEN,
                                                                 "v3"])).state == COMMITTED
        for target, expected in ((2, ["v2", "v2"]), (1, [])):
            dropped = Path(stub.GetRun(pb.GetRunRequest(run_id=run_id)).workspace).name
            before, spare = layer_inodes(daemon), uppers(daemon)
            stub.Rollback(pb.RollbackRequest(run_id=run_id, step=target))
            after = layer_inodes(daemon)
            assert set(after) <= set(before), _difference(before, after)
            assert {p for p in after if after[p] != before[p]} == set()
            assert {p.split("/")[0] for p in set(before) - set(after)} <= {dropped}
            assert uppers(daemon) == spare
            counted = worker_run(stub, run_id, target,
                                 lambda fork_id: _count_and_read(stub, fork_id))
            assert counted == [str(big_run.size), *expected]


def _difference(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    created = sorted(set(after) - set(before))[:5]
    removed = sorted(set(before) - set(after))[:5]
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])[:5]
    return f"created {created}, removed {removed}, changed {changed}"


# --- approvals -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def approvals() -> Iterator[DaemonHandle]:
    """A daemon with the `approvals` agent: steps running /usr/bin/rm wait for an approver."""
    with own_daemon(APPROVALS_CONFIG) as handle:
        yield handle


def _approvals_run(handle: DaemonHandle, role: str = "client") -> str:
    return handle.stub(role).CreateRun(pb.CreateRunRequest(agent="approvals",
                                                           channels=CHANNELS)).run_id


def _approve(handle: DaemonHandle, run_id: str, number: int, approve: bool = True,
             role: str = "approver", reason: str = "looked at it") -> pb.StepReply:
    return handle.stub(role).Approve(pb.ApproveRequest(run_id=run_id, step=number,
                                                       approve=approve, reason=reason),
                                     timeout=60)


RM_STEP = (pb.TaskSpec(name="rm", argv=["/usr/bin/rm", "-f", "victim"]),
           task("sibling", "echo ran > sibling; " + emit("ap", "sibling")))


class TestApprovals:
    def test_a_client_waits_for_the_decision_and_the_run(self, approvals: DaemonHandle
                                                         ) -> None:
        """WaitStep on a step pending approval returns once an approver has decided and the
        step has run (committed, or discarded when rejected); a deadline ends the wait; a
        close ends it with FAILED_PRECONDITION."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        assert step(stub, run_id, task("setup", "echo v > victim")).state == COMMITTED
        assert step(stub, run_id, *RM_STEP).state == PENDING
        with pytest.raises(grpc.RpcError) as late:
            stub.WaitStep(pb.WaitStepRequest(run_id=run_id, step=2), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        waiting = stub.WaitStep.future(pb.WaitStepRequest(run_id=run_id, step=2), timeout=60)
        time.sleep(0.3)
        assert not waiting.done()
        _approve(approvals, run_id, 2)
        decided = waiting.result()
        assert (decided.step, decided.state, decided.decided_by != "") == (2, COMMITTED, True)
        assert files(view(stub, run_id, 2)) == {"sibling": "ran\n"}
        # An ended step is answered at once; a rejected one is discarded.
        assert stub.WaitStep(pb.WaitStepRequest(run_id=run_id, step=1), timeout=5).state \
            == COMMITTED
        assert step(stub, run_id, *RM_STEP).state == PENDING
        waiting = stub.WaitStep.future(pb.WaitStepRequest(run_id=run_id, step=3), timeout=60)
        time.sleep(0.3)
        _approve(approvals, run_id, 3, approve=False)
        assert waiting.result().state == DISCARDED
        # Pending when the run closes: the waiter hears it will not run.
        assert step(stub, run_id, *RM_STEP).state == PENDING
        waiting = stub.WaitStep.future(pb.WaitStepRequest(run_id=run_id, step=3), timeout=60)
        time.sleep(0.3)
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        with pytest.raises(grpc.RpcError) as closed:
            waiting.result()
        assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error(lambda: stub.WaitStep(pb.WaitStepRequest(run_id=run_id, step=9),
                                               timeout=5)).code() == grpc.StatusCode.NOT_FOUND

    def test_an_approved_step_that_changes_nothing_is_found_by_its_number(
            self, approvals: DaemonHandle) -> None:
        """The caller was told "step 2 waits"; once approved it changed nothing, so the run
        stays at 1, yet WaitStep(2) finds it (committed, read-only, on head 1), and a rollback
        to the head it ran on keeps it, one below that discards it."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        assert step(stub, run_id, task("setup", "echo v > victim")).state == COMMITTED
        no_op = pb.TaskSpec(name="rm", argv=["/usr/bin/rm", "-f", "absent"])
        assert step(stub, run_id, no_op, task("say", "echo hello; echo oops >&2")).state \
            == PENDING
        waiting = stub.WaitStep.future(pb.WaitStepRequest(run_id=run_id, step=2), timeout=60)
        _approve(approvals, run_id, 2)
        ended = waiting.result()
        assert (ended.state, ended.read_only, ended.step, ended.base_step) == (
            COMMITTED, True, 1, 1)
        # The requester hears how each task ended, and the start of what it printed.
        assert [(t.name, t.outcome.exited, t.outcome.exit_code, t.stdout, t.stderr)
                for t in ended.tasks] == [("rm", True, 0, b"", b""),
                                          ("say", True, 0, b"hello\n", b"oops\n")]
        # The timeline carries no output: a run's attempts are unbounded, a reply is not.
        listed = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps[-1]
        assert [(t.outcome.exit_code, t.stdout) for t in listed.tasks] == [(0, b""), (0, b"")]
        assert stub.GetRun(pb.GetRunRequest(run_id=run_id)).step == 1
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        assert stub.WaitStep(pb.WaitStepRequest(run_id=run_id, step=2), timeout=5).state \
            == COMMITTED
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=0))
        assert stub.WaitStep(pb.WaitStepRequest(run_id=run_id, step=2), timeout=5).state \
            == DISCARDED
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))

    def test_matching_step_waits_persisted_before_anything_runs(
            self, approvals: DaemonHandle) -> None:
        """A step matching an approval trigger is stored PENDING_APPROVAL with nothing run
        (no task of it, not even a sibling), blocks further steps, and runs once approved."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        assert step(stub, run_id, task("setup", "echo v > victim")).state == COMMITTED
        reply = step(stub, run_id, *RM_STEP)
        assert reply.state == PENDING
        assert reply.step == 2
        assert reply.reason.startswith("needs approval (exec:/usr/bin/rm"), reply.reason
        assert reply.requested_by.startswith("client@")
        assert [(s.step, s.state) for s in stub.ListSteps(pb.ListStepsRequest(
            run_id=run_id)).steps] == [(1, COMMITTED), (2, PENDING)]
        assert run_step(stub, run_id) == 1
        events = [r["event"] for r in audit_records(approvals) if r.get("run_id") == run_id]
        assert events[-1] == "step.pending_approval"
        assert events.count("exec.allowed") == 1, "a task of the pending step ran"
        for call in (lambda: step(stub, run_id, task("other", "true")),
                     lambda: execute(stub, run_id, ["/bin/true"])):
            assert rpc_error(call).code() == grpc.StatusCode.FAILED_PRECONDITION
        approved = _approve(approvals, run_id, 2)
        assert approved.state == COMMITTED, approved
        assert approved.decided_by.startswith("approver@")
        assert approved.requested_by == reply.requested_by
        assert files(export_tree(stub, run_id, 2)) == {"sibling": "ran\n"}
        decision = [r for r in audit_records(approvals)
                    if r.get("run_id") == run_id and r["event"] == "step.approval"]
        assert decision[0]["actor"]["role"] == "approver"
        assert decision[0]["details"]["approved"] is True

    def test_rejected_step_is_discarded_unrun(self, approvals: DaemonHandle) -> None:
        """Rejecting discards the step with the approver's reason; nothing of it runs and the
        run accepts the next step at the same number."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        assert step(stub, run_id, *RM_STEP).state == PENDING
        rejected = _approve(approvals, run_id, 1, approve=False, reason="not today")
        assert rejected.state == DISCARDED
        assert rejected.reason == "not today"
        attempts = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps
        assert [(s.step, s.state) for s in attempts] == [(1, DISCARDED)]
        assert attempts[0].decided_by.startswith("approver@")
        assert "exec.allowed" not in [r["event"] for r in audit_records(approvals)
                                      if r.get("run_id") == run_id]
        assert step(stub, run_id, task("next", "echo n > n")).step == 1

    def test_requester_cannot_approve_its_own_step(self, approvals: DaemonHandle) -> None:
        """The client role cannot call Approve, and an admin cannot approve a step it
        requested itself (same identity); an approver then can."""
        admin = approvals.stub("admin")
        run_id = _approvals_run(approvals, "admin")
        assert step(admin, run_id, *RM_STEP).state == PENDING
        for role in ("client", "admin"):
            error = rpc_error(lambda role=role: _approve(approvals, run_id, 1, role=role))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (role, error)
        assert run_step(admin, run_id) == 0
        approved = _approve(approvals, run_id, 1)
        assert approved.state == COMMITTED
        assert approved.requested_by.startswith("admin@")

    @pytest.mark.parametrize("argv0", ["rm", "/bin/rm", "/usr/bin/../bin/rm"])
    def test_every_spelling_of_the_executable_needs_approval(
            self, approvals: DaemonHandle, argv0: str) -> None:
        """A trigger on /usr/bin/rm also holds a step naming it as a bare name, through the
        /bin symlink or with dot-dot: the same executable runs."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        reply = step(stub, run_id, pb.TaskSpec(name="rm", argv=[argv0, "-f", "nothing"]))
        assert reply.state == PENDING, f"{argv0} ran without approval: {reply}"

    def test_non_matching_steps_and_unknown_approvals(self, approvals: DaemonHandle) -> None:
        """A step not matching any trigger runs at once; approving a step that is not waiting
        is NOT_FOUND."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        assert step(stub, run_id, task("t", "echo x > x")).state == COMMITTED
        error = rpc_error(lambda: _approve(approvals, run_id, 1))
        assert error.code() == grpc.StatusCode.NOT_FOUND

    def test_rollback_discards_a_pending_step(self, approvals: DaemonHandle) -> None:
        """Rolling back under a pending step discards it: it can no longer be approved and the
        run accepts new steps."""
        stub = approvals.stub()
        run_id = _approvals_run(approvals)
        step(stub, run_id, task("t", "echo x > x"))
        assert step(stub, run_id, *RM_STEP).state == PENDING
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=0))
        assert rpc_error(lambda: _approve(approvals, run_id, 2)).code() == \
            grpc.StatusCode.NOT_FOUND
        assert step(stub, run_id, task("t", "touch y")).step == 1

    def test_pending_approval_survives_a_daemon_kill(self) -> None:
        """A pending step outlives kill -9 of the daemon and is approved and run after the
        restart."""
        with own_daemon(APPROVALS_CONFIG) as handle:
            run_id = _approvals_run(handle)
            assert step(handle.stub(), run_id, *RM_STEP).state == PENDING
            stop_daemon(handle, signal.SIGKILL)
            restarted = start_daemon(handle.base, APPROVALS_CONFIG)
            try:
                attempts = restarted.stub().ListSteps(pb.ListStepsRequest(run_id=run_id)).steps
                assert [(s.step, s.state) for s in attempts] == [(1, PENDING)]
                approved = _approve(restarted, run_id, 1)
                assert approved.state == COMMITTED, approved
                assert files(export_tree(restarted.stub(), run_id, 1)) == {"sibling": "ran\n"}
            finally:
                stop_daemon(restarted)
