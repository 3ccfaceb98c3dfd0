"""Tests of the client library and agentctl against a fake agentd.

The fake is a real grpc.aio server on a unix socket in a temporary directory, served from a
background thread for the whole module (httpx's serve_in_thread), with canned in-memory
behaviour: this tests the client and the CLI only; the daemon has its own tests. agentctl is
run for real, as a subprocess.

The fake's Exec runs a tiny script given as argv, one step per argument:
`out:TEXT` / `err:TEXT` write a chunk, `exit:N` / `signal:N` end the tool, `stop:REASON`
sets the stop reason, `pids` sets pids_limit_hit, `wait` blocks until the test opens the
gate, `request` writes the request's env, cwd, timeout, stdin and argv as JSON to stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc as pb_grpc
from agentd.cli.main import Parser, _register_optional, main
from agentd.client import (
    SYSTEM_SOCKET,
    AgentdClient,
    ClientError,
    Outcome,
    Output,
    RunState,
    StopReason,
    Stream,
    resolve_socket,
)
from tests.fake_servers import ServeInThread, read_until

REPO = Path(__file__).resolve().parent.parent
CANNOT_REACH = "is it running? (start it with `make run` or `systemctl start agentd`)"
STOP_REASONS = {
    "timeout": pb.STOP_REASON_TIMEOUT,
    "memory": pb.STOP_REASON_MEMORY,
    "pids": pb.STOP_REASON_PIDS,
    "output": pb.STOP_REASON_OUTPUT,
}


# --- the fake daemon -------------------------------------------------------------------------


class FakeAgentd(pb_grpc.AgentdServicer):
    """Canned, in-memory Agentd: agents `cve-triage` and `web`; everything else is unknown."""

    AGENTS = ("cve-triage", "web")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.runs: dict[str, pb.Run] = {}
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()
        self.cancelled = threading.Event()
        self._next = 1

    async def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> pb.Run:
        self.calls.append(("CreateRun", request))
        if request.agent not in self.AGENTS:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"agent {request.agent} is not registered"
            )
        run_id = f"r-{self._next}"
        self._next += 1
        created = Timestamp()
        created.FromSeconds(1_700_000_000)
        run = pb.Run(
            run_id=run_id,
            agent=request.agent,
            stage="prototype",
            state=pb.RUN_STATE_OPEN,
            created_at=created,
            policy_hash="ab" * 32,
            policy_file=f"policies/{request.agent}.yaml",
            workspace=f"/var/lib/agentd/runs/{run_id}/workspace",
            created_by="uid:1000",
        )
        self.runs[run_id] = run
        return run

    async def GetRun(self, request: pb.GetRunRequest, context: Any) -> pb.Run:
        self.calls.append(("GetRun", request))
        return await self._run(request.run_id, context)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Any) -> pb.ListRunsResponse:
        self.calls.append(("ListRuns", request))
        runs = [
            r
            for r in self.runs.values()
            if (not request.agent or r.agent == request.agent)
            and (request.include_closed or r.state == pb.RUN_STATE_OPEN)
        ]
        return pb.ListRunsResponse(runs=runs)

    async def CloseRun(self, request: pb.CloseRunRequest, context: Any) -> pb.Run:
        self.calls.append(("CloseRun", request))
        run = await self._run(request.run_id, context)
        run.state = pb.RUN_STATE_CLOSED
        run.closed_at.FromSeconds(1_700_000_060)
        if not request.keep_workspace:
            run.workspace = ""
        return run

    async def Exec(self, request: pb.ExecRequest, context: Any) -> AsyncIterator[pb.ExecEvent]:
        self.calls.append(("Exec", request))
        await self._run(request.run_id, context)
        if request.cwd and not request.cwd.startswith("/"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cwd {request.cwd} must be absolute"
            )
        outcome = pb.Outcome(
            task_id="t-1",
            exited=True,
            wall_seconds=1.25,
            cpu_seconds=0.5,
            peak_memory_bytes=3 * 1024 * 1024,
            summary="",
        )
        try:
            for step in request.argv[1:]:
                kind, _, value = step.partition(":")
                if kind in ("out", "err"):
                    stream = pb.STREAM_KIND_STDOUT if kind == "out" else pb.STREAM_KIND_STDERR
                    yield pb.ExecEvent(
                        output=pb.OutputChunk(stream=stream, data=value.encode() + b"\n")
                    )
                elif kind == "exit":
                    outcome.exit_code = int(value)
                elif kind == "signal":
                    outcome.exited, outcome.signal = False, int(value)
                elif kind == "stop":
                    outcome.stop_reason = STOP_REASONS[value]
                elif kind == "pids":
                    outcome.pids_limit_hit = True
                elif kind == "wait":
                    await self._wait_for_gate()
                elif kind == "request":
                    seen = {
                        "argv": list(request.argv),
                        "env": dict(request.env),
                        "cwd": request.cwd,
                        "timeout": request.timeout_seconds,
                        "stdin": request.stdin.decode(),
                    }
                    data = json.dumps(seen).encode() + b"\n"
                    yield pb.ExecEvent(
                        output=pb.OutputChunk(stream=pb.STREAM_KIND_STDOUT, data=data)
                    )
            yield pb.ExecEvent(outcome=outcome)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def _wait_for_gate(self) -> None:
        deadline = time.monotonic() + 10
        while not self.gate.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            await asyncio.sleep(0.01)

    async def _run(self, run_id: str, context: Any) -> pb.Run:
        if run_id not in self.runs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run {run_id} not found")
        return self.runs[run_id]


@pytest.fixture(scope="module")
def server(short_tmp: Path) -> Iterator[FakeAgentd]:
    servicer = FakeAgentd()
    with ServeInThread({str(short_tmp / "agentd.sock"): servicer}):
        yield servicer


@pytest.fixture
def fake(server: FakeAgentd) -> FakeAgentd:
    server.reset()
    return server


@pytest.fixture
def sock(server: FakeAgentd, short_tmp: Path) -> str:
    return str(short_tmp / "agentd.sock")


@pytest.fixture
def client(sock: str) -> Iterator[AgentdClient]:
    with AgentdClient(sock) as c:
        yield c


# --- running agentctl ------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTD_SOCKET", "AGENTCTL_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def agentctl(
    *args: str,
    socket: str | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Runs agentctl as a subprocess and returns what it did."""
    argv = [sys.executable, "-m", "agentd.cli.main"]
    if socket is not None:
        argv += ["--socket", socket]
    return subprocess.run(
        [*argv, *args],
        input=stdin if stdin is not None else "",
        capture_output=not merge_stderr,
        stdout=subprocess.PIPE if merge_stderr else None,
        stderr=subprocess.STDOUT if merge_stderr else None,
        text=True,
        cwd=cwd,
        env=env or _env(),
        timeout=60,
        check=False,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], status: int, message: str) -> None:
    """agentctl failed with `status` and exactly one plain line on stderr."""
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines()[-1] == f"agentctl: {message}"
    assert "Traceback" not in result.stderr


# --- the client library ----------------------------------------------------------------------


class TestResolveSocket:
    def test_flag_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--socket is used even when $AGENTD_SOCKET is set."""
        monkeypatch.setenv("AGENTD_SOCKET", "/env.sock")
        assert resolve_socket("/flag.sock") == "/flag.sock"

    def test_env_beats_dev_socket(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """$AGENTD_SOCKET is preferred over ./var/run/agentd.sock."""
        (tmp_path / "var" / "run").mkdir(parents=True)
        (tmp_path / "var" / "run" / "agentd.sock").touch()
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("AGENTD_SOCKET", "/env.sock")
        assert resolve_socket(None) == "/env.sock"

    def test_dev_socket_when_present(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """./var/run/agentd.sock is used, as an absolute path, when it exists."""
        (tmp_path / "var" / "run").mkdir(parents=True)
        (tmp_path / "var" / "run" / "agentd.sock").touch()
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("AGENTD_SOCKET", raising=False)
        assert resolve_socket(None) == str(tmp_path / "var" / "run" / "agentd.sock")

    def test_system_socket_last(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Without flag, variable or development socket, the systemd path is used."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("AGENTD_SOCKET", raising=False)
        assert resolve_socket(None) == SYSTEM_SOCKET == "/run/agentd/agentd.sock"


class TestAgentdClient:
    def test_run_round_trip(self, fake: FakeAgentd, client: AgentdClient) -> None:
        """create_run, get_run, list_runs and close_run return frozen Run dataclasses."""
        run = client.create_run("cve-triage", label="me")
        assert run.run_id == "r-1"
        assert run.state is RunState.OPEN
        assert run.created_at is not None
        assert run.created_at.timestamp() == 1_700_000_000
        assert run.closed_at is None
        assert client.get_run("r-1") == run
        assert [r.run_id for r in client.list_runs(agent="cve-triage")] == ["r-1"]
        closed = client.close_run("r-1", keep_workspace=True)
        assert closed.state is RunState.CLOSED
        assert closed.workspace
        assert client.list_runs() == []
        assert [r.run_id for r in client.list_runs(include_closed=True)] == ["r-1"]
        assert fake.calls[0][1].label == "me"
        with pytest.raises(AttributeError):
            run.agent = "x"  # type: ignore[misc]

    def test_not_found_is_client_error(self, fake: FakeAgentd, client: AgentdClient) -> None:
        """A gRPC status becomes ClientError with the status name and the daemon's message."""
        with pytest.raises(ClientError) as info:
            client.get_run("r-404")
        assert info.value.code == "NOT_FOUND"
        assert str(info.value) == "run r-404 not found"

    def test_exec_events(self, fake: FakeAgentd, client: AgentdClient) -> None:
        """exec yields the output chunks in order, then one Outcome."""
        run = client.create_run("web")
        argv = ["script", "out:a", "err:b", "exit:3", "stop:memory"]
        events = list(client.exec(run.run_id, argv, env={"A": "1"}, stdin=b"x", timeout=2.5))
        assert events[:2] == [Output(Stream.STDOUT, b"a\n"), Output(Stream.STDERR, b"b\n")]
        outcome = events[2]
        assert isinstance(outcome, Outcome)
        assert (outcome.exited, outcome.exit_code) == (True, 3)
        assert outcome.stop_reason is StopReason.MEMORY
        request = fake.calls[-1][1]
        assert dict(request.env) == {"A": "1"}
        assert (request.stdin, request.timeout_seconds) == (b"x", 2.5)

    def test_exec_error_raised_while_iterating(
        self, fake: FakeAgentd, client: AgentdClient
    ) -> None:
        """An error status on the exec stream raises ClientError from the iterator."""
        with pytest.raises(ClientError) as info:
            list(client.exec("r-404", ["script"]))
        assert info.value.code == "NOT_FOUND"

    def test_closing_the_stream_cancels(self, fake: FakeAgentd, client: AgentdClient) -> None:
        """Abandoning an exec iterator cancels the call, so the daemon can kill the tool."""
        run = client.create_run("web")
        events = client.exec(run.run_id, ["script", "out:started", "wait"])
        assert next(events) == Output(Stream.STDOUT, b"started\n")
        events.close()  # type: ignore[attr-defined]
        assert fake.cancelled.wait(10)

    def test_missing_socket(self, short_tmp: Path) -> None:
        """No daemon at the socket gives UNAVAILABLE with a message that says what to do."""
        missing = str(short_tmp / "missing.sock")
        with AgentdClient(missing) as c, pytest.raises(ClientError) as info:
            c.list_runs()
        assert info.value.code == "UNAVAILABLE"
        assert str(info.value) == f"cannot reach agentd at {missing}: {CANNOT_REACH}"


# --- agentctl --------------------------------------------------------------------------------


class TestGlobalOptions:
    def test_missing_socket(self, short_tmp: Path) -> None:
        """A socket nobody listens on gives the 'cannot reach' line and exit 1."""
        missing = str(short_tmp / "missing.sock")
        result = agentctl("run", "list", socket=missing)
        assert_clean_error(result, 1, f"cannot reach agentd at {missing}: {CANNOT_REACH}")

    def test_socket_from_environment(self, fake: FakeAgentd, sock: str) -> None:
        """$AGENTD_SOCKET is used when --socket is not given."""
        result = agentctl("run", "create", "--agent", "web", env=_env(AGENTD_SOCKET=sock))
        assert (result.returncode, result.stdout) == (0, "r-1\n")

    def test_development_socket(self, fake: FakeAgentd, sock: str, tmp_path: Path) -> None:
        """./var/run/agentd.sock is used when it exists, as `make run` leaves it."""
        (tmp_path / "var" / "run").mkdir(parents=True)
        (tmp_path / "var" / "run" / "agentd.sock").symlink_to(sock)
        result = agentctl("run", "create", "--agent", "web", cwd=tmp_path)
        assert (result.returncode, result.stdout) == (0, "r-1\n")

    def test_version(self) -> None:
        """--version prints the package version."""
        result = agentctl("--version")
        assert result.returncode == 0
        assert result.stdout.startswith("agentctl ")

    def test_no_command_is_usage_error(self) -> None:
        """Without a subcommand agentctl shows its usage and exits 2."""
        result = agentctl()
        assert result.returncode == 2
        assert result.stderr.startswith("usage: agentctl")
        assert "agentctl: the following arguments are required: COMMAND" in result.stderr


class TestRunCommands:
    def test_create_prints_the_id(self, fake: FakeAgentd, sock: str) -> None:
        """`run create` prints only the run id, and passes the label on."""
        result = agentctl("run", "create", "--agent", "cve-triage", "--label", "bot", socket=sock)
        assert (result.returncode, result.stdout, result.stderr) == (0, "r-1\n", "")
        assert fake.calls[0][1].label == "bot"

    def test_create_json(self, fake: FakeAgentd, sock: str) -> None:
        """`run create --json` prints the whole run as JSON."""
        result = agentctl("run", "create", "--agent", "web", "--json", socket=sock)
        run = json.loads(result.stdout)
        assert run["run_id"] == "r-1"
        assert run["state"] == "open"
        assert run["created_at"] == "2023-11-14T22:13:20Z"
        assert run["closed_at"] is None

    def test_create_unknown_agent(self, fake: FakeAgentd, sock: str) -> None:
        """NOT_FOUND from the daemon is one plain line, exit 1."""
        result = agentctl("run", "create", "--agent", "ghost", socket=sock)
        assert_clean_error(result, 1, "agent ghost is not registered")
        assert result.stdout == ""

    def test_list_table(self, fake: FakeAgentd, sock: str) -> None:
        """`run list` prints a header and one line per open run."""
        for agent in ("web", "cve-triage"):
            agentctl("run", "create", "--agent", agent, socket=sock)
        result = agentctl("run", "list", socket=sock)
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["RUN", "AGENT", "STAGE", "STATE", "CREATED", "TASKS"]
        assert [line.split()[:4] for line in lines[1:]] == [
            ["r-1", "web", "prototype", "open"],
            ["r-2", "cve-triage", "prototype", "open"],
        ]

    def test_list_filters(self, fake: FakeAgentd, sock: str) -> None:
        """--agent and --all reach the daemon as the request's filters."""
        result = agentctl("run", "list", "--agent", "web", "--all", socket=sock)
        assert result.returncode == 0
        request = fake.calls[-1][1]
        assert (request.agent, request.include_closed) == ("web", True)

    def test_list_empty(self, fake: FakeAgentd, sock: str) -> None:
        """With no runs stdout stays empty and a note goes to stderr."""
        result = agentctl("run", "list", socket=sock)
        assert (result.returncode, result.stdout) == (0, "")
        assert "no open runs" in result.stderr

    def test_list_json(self, fake: FakeAgentd, sock: str) -> None:
        """`run list --json` prints {"runs": [...]}, closed runs included with --all."""
        agentctl("run", "create", "--agent", "web", socket=sock)
        agentctl("run", "close", "r-1", socket=sock)
        assert json.loads(agentctl("run", "list", "--json", socket=sock).stdout) == {"runs": []}
        runs = json.loads(agentctl("run", "list", "--all", "--json", socket=sock).stdout)["runs"]
        assert [(r["run_id"], r["state"], r["workspace"]) for r in runs] == [("r-1", "closed", "")]

    def test_show(self, fake: FakeAgentd, sock: str) -> None:
        """`run show` prints the run's fields, one per line."""
        agentctl("run", "create", "--agent", "web", socket=sock)
        result = agentctl("run", "show", "r-1", socket=sock)
        assert result.returncode == 0
        fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
        assert fields["run"].strip() == "r-1"
        assert fields["agent"].strip() == "web"
        assert fields["workspace"].strip() == "/var/lib/agentd/runs/r-1/workspace"

    def test_show_json(self, fake: FakeAgentd, sock: str) -> None:
        """`run show --json` is valid JSON with the API's field names."""
        agentctl("run", "create", "--agent", "web", socket=sock)
        run = json.loads(agentctl("run", "show", "r-1", "--json", socket=sock).stdout)
        assert run["policy_file"] == "policies/web.yaml"
        assert run["created_by"] == "uid:1000"

    def test_show_not_found(self, fake: FakeAgentd, sock: str) -> None:
        """An unknown run is `agentctl: run r-123 not found`, exit 1, no traceback."""
        result = agentctl("run", "show", "r-123", socket=sock)
        assert result.stderr == "agentctl: run r-123 not found\n"
        assert (result.returncode, result.stdout) == (1, "")

    def test_close(self, fake: FakeAgentd, sock: str) -> None:
        """`run close` says the workspace was removed."""
        agentctl("run", "create", "--agent", "web", socket=sock)
        result = agentctl("run", "close", "r-1", socket=sock)
        assert (result.returncode, result.stdout) == (0, "closed r-1; workspace removed\n")
        assert fake.calls[-1][1].keep_workspace is False

    def test_close_keep_workspace(self, fake: FakeAgentd, sock: str) -> None:
        """`run close --keep-workspace` asks to keep it and says where it is."""
        agentctl("run", "create", "--agent", "web", socket=sock)
        result = agentctl("run", "close", "r-1", "--keep-workspace", socket=sock)
        assert result.stdout == "closed r-1; workspace kept at /var/lib/agentd/runs/r-1/workspace\n"
        assert fake.calls[-1][1].keep_workspace is True


@pytest.fixture
def run_id(fake: FakeAgentd, sock: str) -> str:
    with AgentdClient(sock) as c:
        return c.create_run("web").run_id


class TestExecCommand:
    def test_exit_zero(self, run_id: str, sock: str) -> None:
        """A tool that exits 0 gives exit 0 and its output, with no summary line."""
        result = agentctl("exec", run_id, "--", "script", "out:hello", socket=sock)
        assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", "")

    def test_exit_code_propagates(self, run_id: str, sock: str) -> None:
        """agentctl exits with the tool's exit code."""
        result = agentctl("exec", run_id, "--", "script", "err:failed", "exit:3", socket=sock)
        assert (result.returncode, result.stderr) == (3, "failed\n")

    def test_signal_is_128_plus(self, run_id: str, sock: str) -> None:
        """A tool killed by signal 9 makes agentctl exit 137, as a shell would report it."""
        result = agentctl("exec", run_id, "--", "script", "signal:9", socket=sock)
        assert result.returncode == 128 + 9

    def test_output_order(self, run_id: str, sock: str) -> None:
        """stdout and stderr chunks come out in the order the tool produced them."""
        result = agentctl(
            "exec",
            run_id,
            "--",
            "script",
            "out:1",
            "err:2",
            "out:3",
            "err:4",
            socket=sock,
            merge_stderr=True,
        )
        assert result.stdout == "1\n2\n3\n4\n"

    def test_streams_live(self, fake: FakeAgentd, run_id: str, sock: str) -> None:
        """Each chunk is written and flushed as it arrives, before the tool has finished."""
        argv = [
            sys.executable,
            "-m",
            "agentd.cli.main",
            "--socket",
            sock,
            "exec",
            run_id,
            "--",
            "script",
            "out:ready",
            "wait",
            "out:done",
        ]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env()) as proc:
            assert proc.stdout is not None
            seen = read_until(proc.stdout, b"ready\n")
            assert seen == b"ready\n", "the first chunk did not arrive while the tool ran"
            fake.gate.set()
            rest, _ = proc.communicate(timeout=20)
        assert (proc.returncode, rest) == (0, b"done\n")

    def test_request_fields(self, fake: FakeAgentd, run_id: str, sock: str) -> None:
        """--env, --cwd, --timeout and the command (with its own `--`) reach the daemon intact."""
        result = agentctl(
            "exec",
            run_id,
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--env",
            "EMPTY=",
            "--cwd",
            "/workspace/src",
            "--timeout",
            "2.5",
            "--",
            "script",
            "request",
            "--",
            "-x",
            socket=sock,
        )
        seen = json.loads(result.stdout)
        assert seen == {
            "argv": ["script", "request", "--", "-x"],
            "env": {"A": "1", "B": "x=y", "EMPTY": ""},
            "cwd": "/workspace/src",
            "timeout": 2.5,
            "stdin": "",
        }

    def test_stdin_from_pipe(self, run_id: str, sock: str) -> None:
        """--stdin - sends agentctl's own stdin to the tool."""
        result = agentctl(
            "exec", run_id, "--stdin", "-", "--", "script", "request", socket=sock, stdin="data"
        )
        assert json.loads(result.stdout)["stdin"] == "data"

    def test_stdin_from_file(self, run_id: str, sock: str, tmp_path: Path) -> None:
        """--stdin FILE sends the file's bytes to the tool."""
        (tmp_path / "in.txt").write_text("from file")
        result = agentctl(
            "exec",
            run_id,
            "--stdin",
            str(tmp_path / "in.txt"),
            "--",
            "script",
            "request",
            socket=sock,
        )
        assert json.loads(result.stdout)["stdin"] == "from file"

    def test_stdin_file_missing(self, fake: FakeAgentd, run_id: str, sock: str) -> None:
        """An unreadable --stdin file is a usage error and no exec is sent."""
        result = agentctl("exec", run_id, "--stdin", "/nonexistent/in", "--", "x", socket=sock)
        assert_clean_error(result, 2, "--stdin /nonexistent/in: No such file or directory")
        assert [name for name, _ in fake.calls] == ["CreateRun"]

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            (["FOO"], "--env expects NAME=VALUE, got 'FOO'"),
            (["=x"], "--env '=x': '' is not a valid variable name"),
            (["1A=x"], "--env '1A=x': '1A' is not a valid variable name"),
            (["A=1", "A=2"], "--env A is given more than once"),
        ],
    )
    def test_bad_env(
        self, fake: FakeAgentd, run_id: str, sock: str, env: list[str], message: str
    ) -> None:
        """A malformed --env is refused with exit 2 before any call to the daemon."""
        flags = [arg for item in env for arg in ("--env", item)]
        result = agentctl("exec", run_id, *flags, "--", "script", socket=sock)
        assert result.returncode == 2
        assert result.stderr.startswith(f"agentctl: {message}")
        assert "Traceback" not in result.stderr
        assert [name for name, _ in fake.calls] == ["CreateRun"]

    def test_bad_timeout(self, fake: FakeAgentd, run_id: str, sock: str) -> None:
        """A negative --timeout is a usage error, exit 2."""
        result = agentctl("exec", run_id, "--timeout", "-1", "--", "script", socket=sock)
        assert result.returncode == 2
        assert "expected a number of seconds >= 0" in result.stderr

    def test_no_command(self, run_id: str, sock: str) -> None:
        """exec without a command is a usage error that shows how to give one."""
        result = agentctl("exec", run_id, socket=sock)
        assert result.returncode == 2
        assert "put it after `--`" in result.stderr

    def test_invalid_argument_from_daemon(self, run_id: str, sock: str) -> None:
        """INVALID_ARGUMENT from the daemon is bad input: exit 2, plain message."""
        result = agentctl("exec", run_id, "--cwd", "rel", "--", "script", socket=sock)
        assert_clean_error(result, 2, "cwd rel must be absolute")

    def test_unknown_run(self, fake: FakeAgentd, sock: str) -> None:
        """exec in an unknown run is a plain NOT_FOUND message, exit 1."""
        result = agentctl("exec", "r-9", "--", "script", socket=sock)
        assert_clean_error(result, 1, "run r-9 not found")

    def test_summary_when_stopped(self, run_id: str, sock: str) -> None:
        """When the daemon stopped the tool, a summary line follows on stderr."""
        result = agentctl(
            "exec",
            run_id,
            "--",
            "script",
            "err:working",
            "signal:9",
            "stop:timeout",
            socket=sock,
        )
        assert result.returncode == 137
        lines = result.stderr.splitlines()
        assert lines[0] == "working"
        assert lines[1].startswith("agentctl: killed by signal 9 (stopped by agentd: wall time")
        assert "peak memory 3.0 MiB" in lines[1]

    def test_summary_with_verbose(self, run_id: str, sock: str) -> None:
        """--verbose prints the summary line even when the tool exited on its own."""
        result = agentctl("exec", run_id, "--verbose", "--", "script", "exit:0", socket=sock)
        assert result.stderr == (
            "agentctl: exited 0 (wall 1.25s, cpu 0.50s, peak memory 3.0 MiB)\n"
        )

    def test_pids_limit_noted(self, run_id: str, sock: str) -> None:
        """Reaching the pids limit is reported even when the tool went on and exited."""
        result = agentctl("exec", run_id, "--", "script", "pids", "exit:1", socket=sock)
        assert result.returncode == 1
        assert "the pids limit was reached" in result.stderr

    def test_ctrl_c_cancels(self, fake: FakeAgentd, run_id: str, sock: str) -> None:
        """Ctrl-C cancels the call (the daemon kills the tool) and exits 130 without a trace."""
        argv = [
            sys.executable,
            "-m",
            "agentd.cli.main",
            "--socket",
            sock,
            "exec",
            run_id,
            "--",
            "script",
            "out:ready",
            "wait",
            "out:never",
        ]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        assert proc.returncode == 130
        assert (out, err) == (b"", b"agentctl: interrupted\n")
        assert fake.cancelled.wait(10)


class TestOptionalSubcommands:
    def _subcommands(self, module: str) -> dict[str, Any]:
        parser = Parser(prog="agentctl")
        subparsers = parser.add_subparsers(dest="command_name")
        _register_optional(subparsers, module, "audit", "the audit log")
        return dict(subparsers.choices)

    def test_absent_module(self) -> None:
        """A subcommand module that is not installed adds no subcommand."""
        assert self._subcommands("agentd_no_such_module_for_test") == {}

    def test_broken_module(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A module that fails to import still gets a subcommand that says why."""
        (tmp_path / "agentd_broken_cmd_for_test.py").write_text("import agentd_missing_dep\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        choices = self._subcommands("agentd_broken_cmd_for_test")
        args = choices["audit"].parse_args(["verify"])
        assert args.func(args) == 1
        assert "audit: not available in this installation" in capsys.readouterr().err

    def test_handlers_get_a_channel(
        self,
        fake: FakeAgentd,
        sock: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A subcommand module's handler reaches the daemon through args.client(), and a grpc
        error it lets escape (a stream's) is shown as one plain line."""

        def handler(args: Any) -> int:
            stub = pb_grpc.AgentdStub(args.client().channel)
            stub.GetRun(pb.GetRunRequest(run_id="r-404"), timeout=10)
            return 0

        def register(subparsers: Any) -> None:
            subparsers.add_parser("audit").set_defaults(func=handler)

        module = types.ModuleType("agentd.cli.audit_cmd")
        module.register = register  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "agentd.cli.audit_cmd", module)
        assert main(["--socket", sock, "audit"]) == 1
        assert capsys.readouterr().err == "agentctl: run r-404 not found\n"


GOOD_POLICY = """\
apiVersion: agentd/v1
kind: Policy
name: cve-triage
stages:
  prototype:
    exec: {allow: [/usr/bin/python3]}
"""


class TestPolicyCommands:
    def test_schema_is_json(self) -> None:
        """`policy schema` prints the JSON Schema of policy files."""
        result = agentctl("policy", "schema")
        assert result.returncode == 0
        assert "$schema" in json.loads(result.stdout)

    def test_check_good_file(self, tmp_path: Path) -> None:
        """A valid policy file is reported as `FILE: ok`, exit 0, without any daemon."""
        good = tmp_path / "good.yaml"
        good.write_text(GOOD_POLICY)
        result = agentctl("policy", "check", str(good), socket="/nonexistent.sock")
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{good}: ok\n", "")

    def test_check_reports_each_file(self, tmp_path: Path) -> None:
        """Each file gets `FILE: ok` or its errors by line; one bad file fails the check."""
        good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
        good.write_text(GOOD_POLICY)
        bad.write_text(GOOD_POLICY + "no_such_field: 1\n")
        result = agentctl("policy", "check", str(bad), str(good))
        assert result.returncode == 1
        assert result.stdout == f"{good}: ok\n"
        assert result.stderr.startswith(f"{bad}:7: no_such_field: ")
        assert "no_such_field" in result.stderr
        assert "Traceback" not in result.stderr

    def test_check_reach_lists_programs_beyond_the_grants(self) -> None:
        """`policy check --reach` lists, per stage, the ELF programs in the executable library
        directories (read from the files), never a granted one."""
        policy = str(REPO / "policies" / "shell-helper.yaml")
        result = agentctl("policy", "check", "--reach", policy, socket="/nonexistent.sock")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"{policy}: ok"
        assert any(line.startswith("  prototype: /usr/lib/") for line in lines), lines
        listed = [line.strip() for line in lines if line.startswith("    ")]
        assert listed
        assert "/usr/bin/dash" not in listed

    def test_check_missing_file(self) -> None:
        """A missing file is reported by name and makes the check fail."""
        result = agentctl("policy", "check", "/nonexistent/p.yaml")
        assert result.returncode == 1
        assert result.stderr.startswith("/nonexistent/p.yaml: ")
        assert "Traceback" not in result.stderr
