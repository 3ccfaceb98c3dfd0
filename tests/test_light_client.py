"""The light client (agentd_client, distribution agentd-client): built as its own wheel with
grpcio and protobuf only, importable without the daemon, and the same calls from the sync and
the asyncio API against a real daemon: output, steps, parallel calls on one run, the
exception tree, approvals waited for, and retries only where nothing was done."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import agentd_client
from agentd_client import AsyncClient, Client, Task
from agentd_client import types as client_types
from tests.conftest import REPO, DaemonHandle
from tests.test_steps import RM_STEP, _approvals_run, _approve, approvals

pytestmark = pytest.mark.privileged
__all__ = ["approvals"]  # the fixture, imported to share the approvals daemon


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(out),
                           str(REPO / "clients" / "python")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    [built] = out.glob("agentd_client-*.whl")
    return built


@pytest.fixture
def client(daemon: DaemonHandle) -> Iterator[Client]:
    with Client(str(daemon.socket())) as agentd:
        yield agentd


class TestDistribution:
    def test_the_wheel_holds_the_client_and_needs_grpcio_and_protobuf_only(
            self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        assert {n.split("/")[0] for n in names} == {"agentd_client",
                                                     "agentd_client-0.1.0.dist-info"}
        requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith("Requires-Dist")]

        def names(found: list[str]) -> list[str]:
            return sorted(r.split(">")[0].split("<")[0].split(";")[0] for r in found)

        # Only the `langgraph` extra (agentd_client.langgraph) may need more.
        assert names([r for r in requires if "extra ==" not in r]) == ["grpcio", "protobuf"]
        assert names([r for r in requires if "extra ==" in r]) == ["langchain-core",
                                                                   "langgraph"]
        assert all(r.endswith('extra == "langgraph"') for r in requires if "extra ==" in r)

    def test_it_works_with_nothing_of_the_daemon_importable(
            self, wheel: Path, daemon: DaemonHandle, tmp_path: Path) -> None:
        """An isolated interpreter whose path holds the unpacked wheel, grpc and protobuf
        only: it cannot import agentd, and a call to the daemon works."""
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp_path / "wheel")
        deps = tmp_path / "deps"
        deps.mkdir()
        site = Path(grpc.__file__).parent.parent
        # grpc and protobuf, and what grpcio itself requires (typing_extensions).
        for name in ("grpc", "google", "typing_extensions.py"):
            (deps / name).symlink_to(site / name)
        program = textwrap.dedent(f"""
            import sys
            sys.path[:0] = [{str(tmp_path / "wheel")!r}, {str(deps)!r}]
            try:
                import agentd
            except ImportError:
                pass
            else:
                raise SystemExit("agentd is importable")
            from agentd_client import Client
            with Client({str(daemon.socket())!r}) as agentd:
                run = agentd.create_run("integration")
                result = agentd.run(run, ["/bin/sh", "-c", "echo light > f; cat f"])
                print(result.exit_code, result.stdout, result.step, result.committed)
                agentd.close_run(run)
            import json
            print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules if m.startswith((
                "agentd", "pydantic", "structlog", "cryptography", "ruamel", "seccomp"))}})))
            """)
        done = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True,
                              text=True, timeout=120, check=False, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        first, modules = done.stdout.splitlines()
        assert first == "0 b'light\\n' 1 True"
        assert json.loads(modules) == ["agentd_client"]


class TestSyncClient:
    def test_run_stream_and_step(self, client: Client) -> None:
        run = client.create_run("integration")
        try:
            result = client.run(run, ["/bin/sh", "-c", "echo out; echo err >&2; echo x > f"])
            assert (result.exit_code, result.stdout, result.stderr, result.ok) == (
                0, b"out\n", b"err\n", True)
            assert (result.step, result.base_step, result.read_only) == (1, 0, False)
            chunks = list(client.stream(run, ["/bin/sh", "-c", "echo a; sleep 0.2; echo b"]))
            assert [c.data for c in chunks if isinstance(c, agentd_client.Output)] == [
                b"a\n", b"b\n"]
            final = chunks[-1]
            assert isinstance(final, agentd_client.RunResult)
            assert (final.read_only, final.step) == (True, 1)  # it changed nothing
            step = client.step(run, [Task(["/bin/sh", "-c", "echo 1 > one"], name="one"),
                                     Task(["/bin/sh", "-c", "echo 2 > two"], name="two")])
            assert (step.state, step.step, step.base_step) == ("committed", 2, 1)
            assert [t.name for t in step.tasks] == ["one", "two"]
            failed = client.run(run, ["/bin/sh", "-c", "echo y > g; exit 3"])
            assert (failed.exit_code, failed.committed, failed.ok) == (3, False, False)
            assert client.head(run) == 2
            assert client.checkpoints(run) == [0, 1, 2]
            fork = client.fork(run, 1)
            client.rollback(run, 1)
            assert client.head(run) == 1
            client.close_run(fork)
        finally:
            client.close_run(run)

    def test_errors_are_a_tree(self, client: Client) -> None:
        run = client.create_run("shell-helper")
        try:
            with pytest.raises(agentd_client.PermissionDenied) as refused:
                client.run(run, ["/usr/bin/curl", "http://x"])
            assert "exec.allow" in refused.value.rule
            with pytest.raises(agentd_client.Aborted):
                client.run(run, ["/bin/true"], expect_step=5)
            with pytest.raises(agentd_client.NotFound):
                client.head("r-000000000000")
            with pytest.raises(agentd_client.InvalidArgument):
                client.run(run, [])
            with pytest.raises(agentd_client.AgentdError):
                client.create_run("no-such-agent")
        finally:
            client.close_run(run)
        unreachable = Client("/nonexistent/agentd.sock", retries=0)
        with pytest.raises(agentd_client.Unavailable) as down:
            unreachable.create_run("integration")
        assert "is it running?" in down.value.message

    def test_approval_is_waited_for(self, approvals: DaemonHandle) -> None:
        """A call that needs an approver raises ApprovalRequired with its step; wait_step
        returns it once decided and run. A step asked for gets pending_approval back."""
        run = _approvals_run(approvals)
        with Client(str(approvals.socket())) as agentd:
            agentd.run(run, ["/bin/sh", "-c", "echo v > victim"])
            with pytest.raises(agentd_client.ApprovalRequired) as pending:
                agentd.run(run, ["/usr/bin/rm", "-f", "victim"])
            assert pending.value.step == 2
            assert pending.value.attempt
            _approve(approvals, run, 2)
            decided = agentd.wait_step(run, 2, attempt=pending.value.attempt, deadline=30)
            assert (decided.state, decided.step, decided.attempt) == (
                "committed", 2, pending.value.attempt)
            step = agentd.step(run, [Task(list(RM_STEP[0].argv), name="rm")])
            assert (step.state, step.step) == ("pending_approval", 3)
            _approve(approvals, run, 3, approve=False)
            # Step 3 again, someone else's: the rejected attempt is still found by its id.
            other = agentd.run(run, ["/bin/sh", "-c", "echo other > other"])
            assert (other.committed, other.step) == (True, 3)
            assert agentd.wait_step(run, 3, attempt=step.attempt, deadline=30).state == \
                "discarded"
            assert agentd.wait_step(run, 3, deadline=30).state == "committed"


class TestAsyncClient:
    def test_the_same_calls_and_parallel_calls_on_one_run(self, daemon: DaemonHandle) -> None:
        """Parallel calls on one run do not fail: they queue, each on the state before it."""
        async def main() -> list[Any]:
            async with AsyncClient(str(daemon.socket())) as agentd:
                run = await agentd.create_run("integration")
                results = await asyncio.gather(*(
                    agentd.run(run, ["/bin/sh", "-c", f"echo {n} > f{n}; sleep 0.2"])
                    for n in range(3)))
                seen = [c async for c in agentd.stream(run, ["/bin/sh", "-c", "ls"])]
                with pytest.raises(agentd_client.Aborted):
                    await agentd.run(run, ["/bin/true"], expect_step=0)
                step = await agentd.step(run, [Task(["/bin/sh", "-c", "echo > z"])])
                await agentd.close_run(run)
                return [results, seen, step]

        results, seen, step = asyncio.run(main())
        assert sorted((r.step, r.base_step) for r in results) == [(1, 0), (2, 1), (3, 2)]
        assert all(r.ok for r in results)
        assert seen[0].data == b"f0\nf1\nf2\n"
        assert seen[-1].read_only
        assert (step.step, step.state) == (4, "committed")


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


class TestRetries:
    """A call is sent again only when the failure says nothing was done: a state-changing
    call after UNAVAILABLE only if it never reached the daemon (a broken connection may have
    lost the reply of a committed step), after RESOURCE_EXHAUSTED unless grpc refused a
    reply that was already made; a read after either."""

    @pytest.mark.parametrize(("code", "details", "idempotent", "calls"), [
        (UNAVAILABLE, "failed to connect to all addresses", False, 3),
        (UNAVAILABLE, "agentd is shutting down; retry against the restarted daemon", False, 3),
        (UNAVAILABLE, "the worker launcher died; the call was not run, retry it", False, 3),
        (UNAVAILABLE, "Socket closed", False, 1),
        (UNAVAILABLE, "Socket closed", True, 3),
        (EXHAUSTED, "16 steps already wait on run r-1", False, 3),
        (EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)", False, 1),
        (grpc.StatusCode.ABORTED, "the head moved", True, 1),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True, 1),
        (grpc.StatusCode.INTERNAL, "incident 1", True, 1)])
    def test_which_failures_are_retried(self, monkeypatch: pytest.MonkeyPatch,
                                        code: grpc.StatusCode, details: str, idempotent: bool,
                                        calls: int) -> None:
        monkeypatch.setattr(client_types, "BACKOFF_SECONDS", (0.0, 0.0, 0.0))
        made: list[object] = []

        def call(request: object, timeout: float | None) -> str:
            made.append(request)
            if len(made) < 3:
                raise _Refusal(code, details)
            return "done"

        agentd = Client(os.devnull, retries=3)
        try:
            if calls == 3:
                assert agentd._call(call, "req", 1.0, idempotent=idempotent) == "done"
            else:
                with pytest.raises(agentd_client.AgentdError) as failed:
                    agentd._call(call, "req", 1.0, idempotent=idempotent)
                assert failed.value.code == code.name
        finally:
            agentd.close()
        assert len(made) == calls


def test_the_readme_example_runs_as_shown(daemon: DaemonHandle) -> None:
    """README's client example, run as written against a real daemon."""
    text = (REPO / "README.md").read_text()
    section = text.split("## A client for agent frameworks", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO,
                          env={**os.environ, "AGENTD_SOCKET": str(daemon.socket())})
    assert done.returncode == 0, done.stderr
    assert "RunResult(exit_code=0" in done.stdout
    assert "is at step 2, not 1: the head moved" in done.stdout
