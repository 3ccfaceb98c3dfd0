"""Workspace files without a worker (ReadFile, WriteFile): a read at any checkpoint changes
nothing; a write is the next checkpoint, on record, held to the policy (workspace mode, quota),
undone by a rollback; and neither follows a link an agent made out of the workspace."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.audit.evidence import read_records
from agentd_client import AsyncClient, Client
from agentd_client import errors as client_errors
from tests.conftest import CONFIG, REPO, DaemonHandle, sh, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

INTEGRATION = (REPO / "tests" / "policy_cases" / "integration.yaml").read_text()
AGENTS = """
[agents.files-read-only]
policy = "files-read-only.yaml"
stage = "prototype"

[agents.files-small]
policy = "files-small.yaml"
stage = "prototype"
"""


@pytest.fixture(scope="module")
def files_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """A daemon with two more agents: one whose workspace is read-only, one with a 64 KiB
    workspace quota."""
    base = tmp_path_factory.mktemp("files")
    policies = base / "policies"
    policies.mkdir()
    read_only = INTEGRATION.replace("name: integration", "name: files-read-only").replace(
        "      workspace: read_write", "      workspace: read_only")
    small = INTEGRATION.replace("name: integration", "name: files-small").replace(
        "      workspace: 1GiB", "      workspace: 64KiB")
    assert read_only != INTEGRATION
    assert "64KiB" in small
    (policies / "files-read-only.yaml").write_text(read_only)
    (policies / "files-small.yaml").write_text(small)
    handle = start_daemon(base, CONFIG + AGENTS)
    yield handle
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client(files_daemon: DaemonHandle) -> Iterator[Client]:
    with Client(str(files_daemon.socket())) as agentd:
        yield agentd


@pytest.fixture
def run(client: Client) -> Iterator[str]:
    run_id = client.create_run("integration")
    yield run_id
    client.close_run(run_id)


def _records(handle: DaemonHandle, event: str) -> list[dict[str, object]]:
    return [r for r in read_records(handle.base / "state" / "audit",
                                    containing=event.encode()) if r["event"] == event]


class TestWrite:
    def test_a_write_is_the_next_checkpoint_seen_by_the_next_worker(
            self, client: Client, run: str, files_daemon: DaemonHandle) -> None:
        step = client.write_file(run, "src/tool.sh", b"#!/bin/sh\necho made by write\n",
                                 mode=0o755)
        assert step == client.head(run) == 1
        result = client.run(run, ["/bin/sh", "-c", "stat -c %a src/tool.sh; sh src/tool.sh"])
        assert result.stdout == b"755\nmade by write\n"
        # On record before it was in force: path, size and content hash.
        [written] = [r for r in _records(files_daemon, "workspace.written")
                     if r["run_id"] == run]
        assert written["details"]["path"] == "src/tool.sh"  # type: ignore[index]
        assert written["details"]["step"] == 1  # type: ignore[index]
        content = b"#!/bin/sh\necho made by write\n"
        assert written["details"]["bytes"] == len(content)  # type: ignore[index]
        assert written["details"]["sha256"] == hashlib.sha256(content).hexdigest()  # type: ignore[index]

    def test_a_rollback_undoes_a_write_and_an_old_checkpoint_still_reads(
            self, client: Client, run: str) -> None:
        client.write_file(run, "notes.txt", b"first\n")
        client.write_file(run, "/workspace/notes.txt", b"second\n")
        assert client.head(run) == 2
        assert client.read_file(run, "notes.txt") == b"second\n"
        assert client.read_file(run, "notes.txt", step=1) == b"first\n"
        with pytest.raises(client_errors.NotFound):
            client.read_file(run, "notes.txt", step=0)
        client.rollback(run, 1)
        assert client.read_file(run, "notes.txt") == b"first\n"
        assert client.run(run, ["/bin/cat", "notes.txt"]).stdout == b"first\n"

    def test_a_write_names_the_head_it_expects(self, client: Client, run: str) -> None:
        client.write_file(run, "a", b"1", expect_step=0)
        with pytest.raises(client_errors.Aborted):
            client.write_file(run, "a", b"2", expect_step=0)
        assert client.read_file(run, "a") == b"1"

    def test_nothing_on_the_way_is_followed(self, client: Client, run: str,
                                            tmp_path: Path) -> None:
        """Links an agent made to the host's root, to a host file and to a directory: a
        write through them and a read of them are refused, and the host is untouched."""
        target = tmp_path / "host-dir"
        target.mkdir()
        made = client.run(run, ["/bin/sh", "-c", f"ln -s / root; ln -s /etc/shadow shadow; "
                                                 f"ln -s {target} dir; echo ok"])
        assert made.committed
        for path in ("root/etc/agentd-escape", "dir/escape", "shadow/x"):
            with pytest.raises(client_errors.FailedPrecondition):
                client.write_file(run, path, b"escaped")
        assert not Path("/etc/agentd-escape").exists()
        assert list(target.iterdir()) == []
        with pytest.raises(client_errors.FailedPrecondition, match="symbolic link"):
            client.read_file(run, "shadow")
        with pytest.raises((client_errors.NotFound, client_errors.FailedPrecondition)):
            client.read_file(run, "root/etc/passwd")
        # Replacing the link itself is a plain write, as `rm shadow; echo > shadow` would be.
        client.write_file(run, "shadow", b"not a link any more\n")
        assert client.read_file(run, "shadow") == b"not a link any more\n"
        assert Path("/etc/shadow").read_bytes() != b"not a link any more\n"

    @pytest.mark.parametrize("path", ["", "../outside", "/etc/passwd", "a/../../b",
                                      "/workspace", "x\x00y", "a/" * 3000 + "b",
                                      ("n" * 200 + "/") * 17 + "f", "d/" * 100 + "f"])
    def test_paths_outside_the_workspace_are_invalid(self, client: Client, run: str,
                                                     path: str) -> None:
        with pytest.raises(client_errors.InvalidArgument):
            client.write_file(run, path, b"x")
        with pytest.raises(client_errors.InvalidArgument):
            client.read_file(run, path)
        assert client.head(run) == 0

    def test_a_directory_in_the_way_fails_with_nothing_changed(self, client: Client,
                                                               run: str) -> None:
        client.write_file(run, "d/inner", b"x")
        client.write_file(run, "plain", b"x")
        for path in ("d", "plain/below"):
            with pytest.raises(client_errors.FailedPrecondition):
                client.write_file(run, path, b"y")
        assert client.head(run) == 2
        with pytest.raises(client_errors.FailedPrecondition, match="not a regular file"):
            client.read_file(run, "d")

    def test_a_read_only_workspace_refuses_writes_on_record(
            self, client: Client, files_daemon: DaemonHandle) -> None:
        run = client.create_run("files-read-only")
        try:
            with pytest.raises(client_errors.PermissionDenied) as refused:
                client.write_file(run, "x", b"x")
            assert "filesystem.workspace" in refused.value.rule
            assert client.head(run) == 0
            assert any(r["run_id"] == run
                       for r in _records(files_daemon, "workspace.write_refused"))
        finally:
            client.close_run(run)

    def test_the_quota_holds_for_writes(self, client: Client) -> None:
        run = client.create_run("files-small")
        try:
            client.write_file(run, "small", b"x" * 1024)
            with pytest.raises(client_errors.FailedPrecondition, match=r"quota|limit|workspace"):
                client.write_file(run, "big", os.urandom(200 << 10))
            assert client.head(run) == 1
            with pytest.raises(client_errors.NotFound):
                client.read_file(run, "big")
        finally:
            client.close_run(run)

    def test_a_file_larger_than_a_message_is_refused_before_anything(
            self, client: Client, run: str) -> None:
        with pytest.raises(client_errors.AgentdError):
            client.write_file(run, "huge", b"x" * (5 << 20))
        assert client.head(run) == 0

    def test_the_client_role_may_read_and_write_and_the_approver_may_not(
            self, files_daemon: DaemonHandle, client: Client, run: str) -> None:
        """A run's files are its client's, as an export of them is."""
        client.write_file(run, "x", b"x")
        with pytest.raises(grpc.RpcError) as denied:
            files_daemon.stub("approver").WriteFile(pb.WriteFileRequest(
                run_id=run, path="y", data=b"y"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unread:
            files_daemon.stub("approver").ReadFile(pb.ReadFileRequest(run_id=run, path="x"))
        assert unread.value.code() == grpc.StatusCode.PERMISSION_DENIED


class TestRead:
    def test_a_read_changes_nothing_and_sees_what_a_step_made(
            self, client: Client, run: str, files_daemon: DaemonHandle) -> None:
        stub = files_daemon.stub()
        sh(stub, run, "printf 'from a worker' > out.txt; chmod 600 out.txt")
        before = client.head(run)
        reply = stub.ReadFile(pb.ReadFileRequest(run_id=run, path="out.txt"))
        assert (reply.data, reply.step, reply.mode) == (b"from a worker", before, 0o600)
        assert client.head(run) == before
        with pytest.raises(client_errors.NotFound):
            client.read_file(run, "missing")
        with pytest.raises(client_errors.NotFound):
            client.read_file(run, "out.txt", step=99)

    def test_a_deleted_file_is_gone_at_the_checkpoint_after(
            self, client: Client, run: str) -> None:
        client.write_file(run, "gone", b"here")
        client.run(run, ["/bin/rm", "gone"])
        with pytest.raises(client_errors.NotFound):
            client.read_file(run, "gone")
        assert client.read_file(run, "gone", step=1) == b"here"

    def test_the_async_client_reads_and_writes(self, files_daemon: DaemonHandle,
                                               run: str) -> None:
        async def both() -> bytes:
            async with AsyncClient(str(files_daemon.socket())) as agentd:
                await agentd.write_file(run, "async.txt", b"async")
                return await agentd.read_file(run, "async.txt")

        assert asyncio.run(both()) == b"async"
