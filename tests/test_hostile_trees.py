"""Hostile workspace trees: deep, wide, long names, every file type; and leftovers that
cannot be removed.

The unit tests build the trees directly (fd-relative, since a 10,000-deep path cannot be
named); the daemon tests let a real agent build them inside a worker and then push them
through exec, commit, rollback, fork, export, squash, close and a restart.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.store.layers import LayerStore, walk_merged
from agentd.store.trees import MAX_PATH_BYTES, PathTooLong, remove_tree
from tests.conftest import (
    CONFIG,
    DaemonHandle,
    daemon_base,
    execute,
    start_daemon,
    stop_daemon,
)

DEEP = 10_000


def _deep(top: Path, depth: int, name: str = "d") -> None:
    """`top/name/name/...` `depth` levels deep, built with openat (no path can name it)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("bottom")
    finally:
        os.close(fd)


def _every_type(top: Path) -> None:
    """A regular file, a symlink, a fifo, a socket, a 255-byte name, a 0500 directory."""
    top.mkdir(parents=True, exist_ok=True)
    (top / "file").write_text("x")
    (top / "link").symlink_to("/etc/passwd")
    os.mkfifo(top / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(top / "sock"))
    (top / ("n" * 255)).write_text("long name")
    locked = top / "locked"
    locked.mkdir()
    (locked / "inside").write_text("y")
    locked.chmod(0o500)


class TestRemoveTree:
    def test_ten_thousand_levels(self, tmp_path: Path) -> None:
        """A tree 10,000 deep goes, with no RecursionError and no ENAMETOOLONG."""
        _deep(tmp_path, DEEP)
        remove_tree(tmp_path / "d")
        assert list(tmp_path.iterdir()) == []

    def test_wide_long_names_and_every_type(self, tmp_path: Path) -> None:
        """20,000 entries in one directory, 255-byte names, fifos, sockets and a directory
        its owner made unwritable: all removed."""
        wide = tmp_path / "t" / "wide"
        wide.mkdir(parents=True)
        for i in range(20_000):
            (wide / f"f{i}").touch()
        _every_type(tmp_path / "t" / "types")
        remove_tree(tmp_path / "t")
        assert not (tmp_path / "t").exists()

    def test_missing_is_fine_and_a_file_is_unlinked(self, tmp_path: Path) -> None:
        """Removing what is not there does nothing; a non-directory is unlinked."""
        remove_tree(tmp_path / "absent")
        (tmp_path / "f").write_text("x")
        remove_tree(tmp_path / "f")
        assert not (tmp_path / "f").exists()


class TestLayerWalks:
    def test_changes_refuse_a_path_too_long_instead_of_recursing(self, tmp_path: Path) -> None:
        """Diffing an upper 10,000 deep stops at the path limit with PathTooLong."""
        store = LayerStore(tmp_path / "ws")
        base = store.create_base(0, 0)
        upper = store.new_upper("r-1.t-1", 0, 0)
        _deep(upper.upper, DEEP)
        with pytest.raises(PathTooLong) as caught:
            store.changes(upper.upper, lowers=[base])
        assert str(MAX_PATH_BYTES) in caught.value.message
        store.remove_upper("r-1.t-1")
        assert not (store.uppers_dir / "r-1.t-1").exists()

    def test_deep_tree_under_the_limit_commits_squashes_and_exports(self, tmp_path: Path
                                                                    ) -> None:
        """1,200 levels (the issue's tree) commit, squash and export iteratively."""
        store = LayerStore(tmp_path / "ws")
        base = store.create_base(0, 0)
        upper = store.new_upper("r-1.t-1", 0, 0)
        _deep(upper.upper, 1200)
        _every_type(upper.upper / "types")
        (upper.upper / "types" / "locked").chmod(0o755)
        layer = store.commit([upper.upper], lowers=[base])
        assert layer is not None
        entries = list(walk_merged([store.path(base), store.path(layer)]))
        assert len([e for e in entries if e.rel.startswith("d")]) == 1201
        squashed = store.squash([base, layer])
        out = io.BytesIO()
        store.export_tar([squashed], out)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            names = tar.getnames()
        assert any(n.endswith("/leaf") and n.count("/") == 1200 for n in names)
        for layer_id in (layer, squashed):
            store.delete(layer_id)

    def test_gc_quarantines_what_it_cannot_remove(self, tmp_path: Path) -> None:
        """An upper holding an immutable file (chattr +i) cannot be removed: gc moves it to
        quarantine, reports it, and goes on."""
        store = LayerStore(tmp_path / "ws")
        upper = store.new_upper("r-abc.t-1", 0, 0)
        stuck = upper.upper / "stuck"
        stuck.write_text("x")
        subprocess.run(["chattr", "+i", str(stuck)], check=True)
        try:
            store.gc(referenced=[], keep_uppers=())
            assert store.take_quarantined() == [str(store.quarantine_dir / "r-abc.t-1")]
            assert store.quarantined_for("r-abc") == [str(store.quarantine_dir / "r-abc.t-1")]
            assert not (store.uppers_dir / "r-abc.t-1").exists()
        finally:
            for path in store.quarantine_dir.rglob("stuck"):
                subprocess.run(["chattr", "-i", str(path)], check=True)


# --- through the daemon ----------------------------------------------------------------------

ISSUE_TREE = "p=d;i=0;while [ $i -lt 1200 ];do p=$p/d;i=$((i+1));done;mkdir -p $p"
# Python's chdir is relative (dash's cd builds an absolute path and stops near PATH_MAX).
TEN_THOUSAND = ("import os\n"
                "for _ in range(10000):\n"
                "    os.mkdir('d'); os.chdir('d')\n"
                "open('leaf', 'w').write('bottom')\n")
SQUASH_CONFIG = CONFIG.replace("[daemon]\n", "[daemon]\nsquash_depth = 3\n", 1)


@pytest.fixture(scope="module")
def hostile() -> Iterator[DaemonHandle]:
    base = daemon_base()
    handle = start_daemon(base, SQUASH_CONFIG)
    try:
        yield handle
    finally:
        stop_daemon(handle)
        remove_tree(base)


def _audit(handle: DaemonHandle) -> list[dict[str, object]]:
    records = []
    for path in sorted((handle.base / "state" / "audit").glob("audit-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def _export(stub: object, run_id: str, step: int) -> list[str]:
    data = b"".join(c.data for c in stub.ExportCheckpoint(  # type: ignore[attr-defined]
        pb.ExportCheckpointRequest(run_id=run_id, step=step), timeout=120))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


@pytest.mark.privileged
class TestHostileTreesThroughTheDaemon:
    def test_the_issues_tree_commits_and_goes_everywhere(self, hostile: DaemonHandle) -> None:
        """The issue's 1,200-deep mkdir commits; export, fork, rollback, squash (depth 3) and
        close all work on it; the run is never wedged."""
        stub = hostile.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        made = execute(stub, run_id, ["/bin/sh", "-c", ISSUE_TREE])
        assert made.outcome is not None
        assert made.outcome.committed, made.outcome
        assert made.outcome.step == 1
        assert any(n.count("/") == 1200 for n in _export(stub, run_id, 1))
        fork = stub.Fork(pb.ForkRequest(run_id=run_id, step=1)).run_id
        for i in range(3):  # past squash_depth: a background squash walks the deep tree
            assert execute(stub, run_id, ["/bin/sh", "-c", f"echo {i} > f{i}"]).outcome
        assert any(n.count("/") == 1200 for n in _export(stub, run_id, 4))
        stub.Rollback(pb.RollbackRequest(run_id=run_id, step=1))
        found = execute(stub, run_id, ["/bin/sh", "-c", "find . | wc -l"])
        assert found.text.strip() == "1202"  # "." and d, d/d, ... 1,201 levels
        for rid in (run_id, fork):
            stub.CloseRun(pb.CloseRunRequest(run_id=rid), timeout=60)

    def test_ten_thousand_levels_fail_the_step_and_release_the_run(
            self, hostile: DaemonHandle) -> None:
        """A tree 10,000 deep cannot commit: the step fails with the path limit named,
        nothing is applied, the upper is removed, and the run takes the next step."""
        stub = hostile.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="cve-triage")).run_id
        deep = execute(stub, run_id, ["/usr/bin/python3", "-c", TEN_THOUSAND], timeout=50)
        assert deep.outcome is not None
        assert not deep.outcome.committed
        assert "bytes long" in deep.outcome.step_failure, deep.outcome.step_failure
        after = execute(stub, run_id, ["/bin/sh", "-c", "ls | wc -l"])
        assert after.text.strip() == "0"
        assert after.outcome is not None
        assert after.outcome.committed
        assert not any((hostile.base / "state" / "workspaces" / "uppers").iterdir())
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=60)

    def test_wide_directory_and_every_file_type_commit_and_export(
            self, hostile: DaemonHandle) -> None:
        """200,000 entries in one directory, 255-byte names, fifos and sockets commit and
        export (sockets are skipped: tar cannot hold them)."""
        stub = hostile.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="cve-triage")).run_id
        program = ("import os, socket\n"
                   "os.mkdir('wide')\n"
                   "for i in range(200000):\n"
                   "    os.close(os.open(f'wide/{i}', os.O_CREAT | os.O_WRONLY, 0o644))\n"
                   "open('n' * 255, 'w').write('long')\n"
                   "os.mkfifo('fifo')\n"
                   "socket.socket(socket.AF_UNIX).bind('sock')\n"
                   "os.symlink('/etc/passwd', 'link')\n")
        made = execute(stub, run_id, ["/usr/bin/python3", "-c", program], timeout=30)
        assert made.outcome is not None
        assert made.outcome.committed, (made.outcome, made.stderr)
        names = set(_export(stub, run_id, 1))
        assert {"fifo", "link", "n" * 255} <= names
        assert len([n for n in names if n.startswith("wide/")]) == 200_000
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id), timeout=120)


@pytest.mark.privileged
class TestRecovery:
    def test_a_restart_quarantines_what_it_cannot_remove_and_serves(self) -> None:
        """After kill -9, an upper 10,000 deep is removed and an unremovable one (an
        immutable file) is quarantined, recorded, and shown by `run show`; the daemon
        serves."""
        base = daemon_base()
        handle = start_daemon(base)
        stuck: Path | None = None
        try:
            stub = handle.stub()
            run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
            uppers = base / "state" / "workspaces" / "uppers"
            deep = uppers / f"{run_id}.t-deep" / "upper"
            deep.mkdir(parents=True)
            _deep(deep, DEEP)
            stuck = uppers / f"{run_id}.t-stuck" / "upper" / "stuck"
            stuck.parent.mkdir(parents=True)
            stuck.write_text("x")
            subprocess.run(["chattr", "+i", str(stuck)], check=True)
            handle.process.send_signal(signal.SIGKILL)
            handle.process.wait()
            handle = start_daemon(base)
            stub = handle.stub()
            assert not (uppers / f"{run_id}.t-deep").exists()
            started = [r for r in _audit(handle) if r["event"] == "daemon.started"][-1]
            quarantined = started["details"]["recovered"]["quarantined"]  # type: ignore[index]
            assert len(quarantined) == 1
            assert f"{run_id}.t-stuck" in quarantined[0]
            shown = stub.GetRun(pb.GetRunRequest(run_id=run_id))
            assert "quarantined" in shown.problem
            assert execute(stub, run_id, ["/bin/sh", "-c", "echo ok"]).text == "ok\n"
            listed = [r.run_id for r in stub.ListRuns(pb.ListRunsRequest()).runs]
            assert run_id in listed
        except grpc.RpcError as exc:
            pytest.fail(f"the daemon did not serve after recovery: {exc}")
        finally:
            for path in (base / "state").rglob("stuck"):
                subprocess.run(["chattr", "-i", str(path)], check=False)
            stop_daemon(handle)
            with contextlib.suppress(OSError):
                remove_tree(base)
