"""The LangGraph integration (agentd_client.langgraph) against a real daemon, driven by a
scripted chat model that makes parallel tool calls: tools sync and async, one agentd step per
model turn (applied whole or not at all), approvals as interrupts resumed after another uid
decides, time travel that restores the workspace, and the two examples."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentd_client import AsyncClient, Client, NotFound
from agentd_client.langgraph import AgentdCheckpointSaver, agentd_tools
from agentd_client.langgraph.testing import ScriptedChatModel
from agentd_client.langgraph.tools import clip
from tests.conftest import CONFIG, REPO, DaemonHandle, daemon_base, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

STRICT = CONFIG.replace("allow_self_approval = true\n", "") + \
    '\n[agents.approvals]\npolicy = "approvals.yaml"\nstage = "prototype"\n'
OTHER_UID = 1234


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


react = _example("react_agent")
fanout = _example("parallel_fanout")


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def turns(*calls: list[dict[str, Any]]) -> ScriptedChatModel:
    return ScriptedChatModel(script=[AIMessage("", tool_calls=c) for c in calls])


def tool_messages(state: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage)]


@pytest.fixture
def client(daemon: DaemonHandle) -> Iterator[Client]:
    with Client(str(daemon.socket())) as agentd:
        yield agentd


@pytest.fixture
def run(client: Client) -> Iterator[str]:
    run_id = client.create_run("integration")
    yield run_id
    client.close_run(run_id)


@pytest.fixture(scope="module")
def strict() -> Iterator[DaemonHandle]:
    """A daemon where a step running /usr/bin/rm waits for an approver of another uid."""
    base = daemon_base()
    (base / "policies").mkdir()
    shutil.copy(REPO / "tests" / "policy_cases" / "approvals.yaml", base / "policies")
    handle = start_daemon(base, STRICT)
    os.chmod(handle.socket("approver"), 0o666)  # what approver_group grants uid 1234
    yield handle
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


def decide_as(uid: int, handle: DaemonHandle, run_id: str, step: int, approve: bool) -> str:
    """An approver's decision from a process that dropped to `uid` before it connected."""
    program = textwrap.dedent(f"""
        import grpc, os
        from agentd.api.gen.v1 import agentd_pb2 as pb, agentd_pb2_grpc
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
        stub = agentd_pb2_grpc.AgentdStub(grpc.insecure_channel(
            "unix:{handle.socket('approver')}"))
        reply = stub.Approve(pb.ApproveRequest(run_id="{run_id}", step={step},
                                               approve={approve}, reason="second person"),
                             timeout=60)
        print(pb.StepState.Name(reply.state))
        """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=90, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class TestPackaging:
    def test_the_light_client_does_not_import_langgraph(self) -> None:
        """`import agentd_client` loads neither LangGraph nor LangChain."""
        done = subprocess.run([sys.executable, "-c", "import sys, agentd_client; print(sorted("
                               "m for m in sys.modules if m.startswith('lang')))"],
                              capture_output=True, text=True, timeout=60, check=True)
        assert done.stdout.strip() == "[]"

    def test_the_glue_of_the_fanout_example_is_at_most_ten_lines(self) -> None:
        """The marked agentd block of examples/parallel_fanout.py: code lines only."""
        text = (REPO / "examples" / "parallel_fanout.py").read_text()
        block = text.split("# --- agentd glue: begin ---", 1)[1].split(
            "# --- agentd glue: end ---", 1)[0]
        lines = [ln for ln in block.splitlines() if ln.strip() and
                 not ln.strip().startswith("#")]
        assert 0 < len(lines) <= 10, lines


class TestClip:
    def test_long_output_keeps_its_head_and_tail(self) -> None:
        """A model sees the start and the end of a long output, and how much was cut."""
        text = "".join(f"line {n}\n" for n in range(5000))
        clipped = clip(text, 1000)
        assert clipped.startswith("line 0\n")
        assert clipped.endswith("line 4999\n")
        assert f"[... {len(text) - 1000} characters cut ...]" in clipped
        assert clip("short", 1000) == "short"


class TestTools:
    def test_each_tool_alone_on_the_run_of_the_config(self, client: Client, run: str) -> None:
        """Write and read without a worker; a command (shell or argv) and Python as a step;
        the outcome is exit code, stdout and stderr."""
        tools = {t.name: t for t in agentd_tools(client)}
        config: Any = {"configurable": {"agentd_run_id": run}}
        assert tools["write_file"].invoke({"path": "d/a.txt", "content": "hello\n"},
                                          config) == "wrote 6 bytes to d/a.txt"
        assert client.head(run) == 1
        assert tools["read_file"].invoke({"path": "d/a.txt"}, config) == "hello\n"
        failed = tools["run_command"].invoke(
            {"command": "cat d/a.txt; echo oops >&2; exit 3"}, config)
        assert failed.startswith("agentd step 2 failed as a whole")
        assert all(part in failed for part in ("exit code 3", "hello", "oops"))
        assert tools["run_command"].invoke({"command": ["/bin/echo", "a  b"]},
                                           config) == "exit code 0\nstdout:\na  b\n"
        assert tools["run_python"].invoke({"code": "print(6 * 7)"}, config) == \
            "exit code 0\nstdout:\n42\n"
        assert client.head(run) == 1  # the failure left nothing; the reads made no step

    def test_the_async_tools(self, daemon: DaemonHandle, client: Client, run: str) -> None:
        """The same tools awaited, on an AsyncClient."""
        async def main() -> list[str]:
            async with AsyncClient(str(daemon.socket())) as aclient:
                tools = {t.name: t for t in agentd_tools(client, aclient=aclient)}
                config: Any = {"configurable": {"agentd_run_id": run}}
                return [await tools["write_file"].ainvoke({"path": "b", "content": "x"}, config),
                        await tools["run_python"].ainvoke(
                            {"code": "print(open('b').read())"}, config),
                        await tools["read_file"].ainvoke({"path": "b"}, config)]

        assert asyncio.run(main()) == ["wrote 1 bytes to b", "exit code 0\nstdout:\nx\n", "x"]
        assert client.head(run) == 1


class TestOneStepPerTurn:
    def test_parallel_calls_commit_as_one_step(self, daemon: DaemonHandle,
                                               client: Client) -> None:
        """Three calls of one turn: one agentd step (the head moves by one), every file is
        there after it, one ToolMessage per call in order, and the checkpoint records it."""
        model = turns([call("write_file", "w1", path="a.txt", content="A"),
                       call("run_command", "c1", command="echo B > b.txt"),
                       call("run_python", "p1", code="open('c.txt', 'w').write('C')")])
        app = react.build(model, client, agent="integration")
        config: Any = {"configurable": {"thread_id": "parallel"}}
        final = app.invoke({"messages": [HumanMessage("go")]}, config)
        replies = tool_messages(final)
        assert [m.tool_call_id for m in replies] == ["w1", "c1", "p1"]
        assert all(m.status == "success" for m in replies)
        metadata = app.get_state(config).metadata or {}
        run_id = metadata["agentd_run_id"]
        assert (metadata["agentd_step"], client.head(run_id)) == (1, 1)
        assert {m.artifact["step"] for m in replies} == {1}
        assert [client.read_file(run_id, p) for p in ("a.txt", "b.txt", "c.txt")] == [
            b"A", b"B\n", b"C"]
        client.close_run(run_id)

    def test_a_failing_call_fails_the_whole_turn(self, client: Client) -> None:
        """One call of three exits 1: the step fails, every ToolMessage of the turn says
        so, and nothing of the turn is in the workspace."""
        model = turns([call("write_file", "w1", path="a.txt", content="A"),
                       call("run_command", "bad", command="echo partial > p.txt; exit 1"),
                       call("run_command", "c1", command="echo B > b.txt")])
        app = react.build(model, client, agent="integration")
        config: Any = {"configurable": {"thread_id": "failing"}}
        replies = tool_messages(app.invoke({"messages": [HumanMessage("go")]}, config))
        assert len(replies) == 3
        assert all(m.status == "error" and "failed as a whole" in str(m.content)
                   and "nothing of this turn's 3 tool call(s) was applied" in str(m.content)
                   for m in replies)
        assert "task bad: exited 1" in str(replies[0].content)
        run_id = (app.get_state(config).metadata or {})["agentd_run_id"]
        assert client.head(run_id) == 0
        for path in ("a.txt", "p.txt", "b.txt"):
            with pytest.raises(NotFound):
                client.read_file(run_id, path)
        client.close_run(run_id)

    def test_an_async_graph_makes_one_step_too(self, daemon: DaemonHandle,
                                                client: Client) -> None:
        """ainvoke with an AsyncClient: the turn's two calls are one step."""
        async def main() -> tuple[list[ToolMessage], dict[str, Any]]:
            async with AsyncClient(str(daemon.socket())) as aclient:
                tools = agentd_tools(client, aclient=aclient)
                model = turns([call("write_file", "w1", path="x", content="1"),
                               call("write_file", "w2", path="y", content="2")])
                from agentd_client.langgraph import AgentdToolNode
                app = _react_with(model, AgentdToolNode(tools, client, aclient=aclient), tools,
                                  client)
                config: Any = {"configurable": {"thread_id": "async"}}
                final = await app.ainvoke({"messages": [HumanMessage("go")]}, config)
                return tool_messages(final), dict((await app.aget_state(config)).metadata or {})

        replies, metadata = asyncio.run(main())
        assert [m.content for m in replies] == ["wrote 1 bytes to x", "wrote 1 bytes to y"]
        run_id = metadata["agentd_run_id"]
        assert (metadata["agentd_step"], client.head(run_id)) == (1, 1)
        assert client.read_file(run_id, "y") == b"2"
        client.close_run(run_id)


def test_a_local_tool_does_not_run_when_the_turns_step_failed(client: Client) -> None:
    """A turn mixing an agentd call with a tool of this process: the step fails, so the
    local tool is not run either (a turn is applied whole or not at all)."""
    from langchain_core.tools import tool

    from agentd_client.langgraph import AgentdToolNode

    notified: list[str] = []

    @tool
    def notify(text: str) -> str:
        """Tells someone."""
        notified.append(text)
        return "sent"

    tools = [*agentd_tools(client), notify]
    model = turns([call("run_command", "bad", command="exit 1"),
                   call("notify", "n1", text="done")])
    app = _react_with(model, AgentdToolNode(tools, client), tools, client)
    config: Any = {"configurable": {"thread_id": "mixed"}}
    replies = tool_messages(asyncio.run(app.ainvoke({"messages": [HumanMessage("go")]},
                                                    config)))
    assert notified == []
    assert [(m.tool_call_id, m.status) for m in replies] == [("bad", "error"), ("n1", "error")]
    assert "the turn's agentd step did not commit" in str(replies[1].content)
    client.close_run((app.get_state(config).metadata or {})["agentd_run_id"])


def _react_with(model: ScriptedChatModel, node: Any, tools: list[Any], client: Client) -> Any:
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import tools_condition

    async def think(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.bind_tools(tools).ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", think)
    graph.add_node("tools", node)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=AgentdCheckpointSaver(InMemorySaver(), client,
                                                            agent="integration"))


class TestApprovals:
    def _pending(self, strict: DaemonHandle, agentd: Client, thread: str,
                 approval_timeout: float = 600.0) -> tuple[Any, Any, str, dict[str, Any]]:
        run_id = agentd.create_run("approvals")
        agentd.write_file(run_id, "victim", b"v")
        model = turns([call("run_command", "rm", command=["/usr/bin/rm", "-f", "victim"]),
                       call("write_file", "w1", path="note.txt", content="removed"),
                       call("read_file", "r1", path="victim")])
        app = react.build(model, agentd, agent="approvals", approval_timeout=approval_timeout)
        config: Any = {"configurable": {"thread_id": thread, "agentd_run_id": run_id}}
        paused = app.invoke({"messages": [HumanMessage("clean up")]}, config)
        [interrupted] = paused["__interrupt__"]
        return app, config, run_id, interrupted.value

    def test_approved_by_another_uid_then_resumed(self, strict: DaemonHandle) -> None:
        """The turn's step waits for approval: the graph interrupts naming run, step and
        reason; a resume before the decision waits (bounded) and interrupts again; after uid
        1234 approves, the resume finishes the step, which was submitted exactly once."""
        with Client(str(strict.socket())) as agentd:
            app, config, run_id, payload = self._pending(strict, agentd, "approve", 0.5)
            assert (payload["kind"], payload["run_id"], payload["step"]) == (
                "agentd_approval", run_id, 2)
            assert payload["reason"].startswith("needs approval (exec:/usr/bin/rm")
            assert payload["calls"] == ["/usr/bin/rm -f victim", "write_file note.txt",
                                        "read_file victim"]
            again = app.invoke(Command(resume="decided?"), config)
            assert again["__interrupt__"][0].value["step"] == 2
            assert decide_as(OTHER_UID, strict, run_id, 2, approve=True) == \
                "STEP_STATE_COMMITTED"
            final = app.invoke(Command(resume="decided"), config)
            replies = tool_messages(final)
            assert [(m.tool_call_id, m.status) for m in replies] == [
                ("rm", "success"), ("w1", "success"), ("r1", "success")]
            assert replies[0].content == "exit code 0"  # WaitStep carries the outcome
            assert [m.content for m in replies[1:]] == ["wrote 7 bytes to note.txt", "v"]
            assert agentd.checkpoints(run_id) == [0, 1, 2]  # one step, never re-submitted
            assert agentd.read_file(run_id, "note.txt") == b"removed"
            with pytest.raises(NotFound):
                agentd.read_file(run_id, "victim")
            assert (app.get_state(config).metadata or {})["agentd_step"] == 2
            agentd.close_run(run_id)

    def test_rejected_turn_says_so(self, strict: DaemonHandle) -> None:
        """Rejected by the approver: every ToolMessage says nothing ran; nothing changed."""
        with Client(str(strict.socket())) as agentd:
            app, config, run_id, payload = self._pending(strict, agentd, "reject")
            assert decide_as(OTHER_UID, strict, run_id, payload["step"], approve=False) == \
                "STEP_STATE_DISCARDED"
            replies = tool_messages(app.invoke(Command(resume=True), config))
            assert all(m.status == "error" and "an approver rejected agentd step 2"
                       in str(m.content) for m in replies)
            assert agentd.head(run_id) == 1
            assert agentd.read_file(run_id, "victim") == b"v"
            agentd.close_run(run_id)


class TestTimeTravel:
    def test_resuming_an_old_checkpoint_restores_its_files(self, client: Client) -> None:
        """Replaying the checkpoint before a turn that read and changed a file runs that
        turn on the file as it was then, on a fork (the later branch is kept); forking the
        state there with update_state does too."""
        model = turns([call("write_file", "w1", path="a.txt", content="v1\n")],
                      [call("run_command", "c1", command="cat a.txt; echo v2 > a.txt")],
                      [call("read_file", "r1", path="a.txt")])
        app = react.build(model, client, agent="integration")
        config: Any = {"configurable": {"thread_id": "travel"}}
        final = app.invoke({"messages": [HumanMessage("go")]}, config)
        assert [str(m.content) for m in tool_messages(final)] == [
            "wrote 3 bytes to a.txt", "exit code 0\nstdout:\nv1\n", "v2\n"]
        latest = app.get_state(config).metadata or {}
        first_run = latest["agentd_run_id"]
        assert (latest["agentd_step"], client.head(first_run)) == (2, 2)
        # The checkpoint where the second turn's call waits for the tool node.
        before = next(s for s in app.get_state_history(config)
                      if s.next == ("tools",) and s.values["messages"][-1].tool_calls[0][
                          "id"] == "c1")
        assert (before.metadata or {})["agentd_step"] == 1

        replayed = app.invoke(None, before.config)
        assert str(tool_messages(replayed)[-1].content) == "exit code 0\nstdout:\nv1\n"
        branch = app.get_state(config).metadata or {}
        assert branch["agentd_run_id"] != first_run
        assert client.read_file(branch["agentd_run_id"], "a.txt") == b"v2\n"
        assert client.read_file(first_run, "a.txt", step=2) == b"v2\n"
        assert client.head(first_run) == 2  # the old branch is still there

        forked = app.update_state(before.config, {"messages": [AIMessage(
            "", id=before.values["messages"][-1].id,
            tool_calls=[call("read_file", "r2", path="a.txt")])]})
        again = app.invoke(None, forked)
        assert str(tool_messages(again)[-1].content) == "v1\n"
        for run_id in {first_run, branch["agentd_run_id"],
                       (app.get_state(config).metadata or {})["agentd_run_id"]}:
            client.close_run(run_id)


class TestExamples:
    @pytest.mark.parametrize(("name", "agent", "expected"), [
        ("react_agent", "integration", ["tool: wrote 8 bytes to notes/todo.txt",
                                        "ship it", "42", "at step 1"]),
        ("parallel_fanout", "integration", ["shard 0: 499500", "shard 2: 2499500",
                                            "3 4498500", "at step 2"])])
    def test_the_example_runs_against_a_daemon(self, daemon: DaemonHandle, name: str,
                                               agent: str, expected: list[str]) -> None:
        """Run as a user would, on the daemon's socket."""
        done = subprocess.run([sys.executable, str(REPO / "examples" / f"{name}.py"),
                               "--socket", str(daemon.socket()), "--agent", agent],
                              capture_output=True, text=True, timeout=300, check=False,
                              cwd=REPO)
        assert done.returncode == 0, done.stderr
        for text in expected:
            assert text in done.stdout, done.stdout

    def test_fanout_shards_are_one_step_and_the_join_another(self, client: Client,
                                                            daemon: DaemonHandle) -> None:
        """The three shard calls of the plan turn commit as step 1, the join as step 2."""
        app = fanout.build(fanout.scripted(), str(daemon.socket()), "integration")
        config: Any = {"configurable": {"thread_id": "fanout"}}
        final = app.invoke({"messages": [HumanMessage("sum")]}, config)
        shards = [m for m in tool_messages(final) if m.tool_call_id.startswith("shard-")]
        assert [m.artifact["step"] for m in shards] == [1, 1, 1]
        run_id = (app.get_state(config).metadata or {})["agentd_run_id"]
        assert client.checkpoints(run_id) == [0, 1, 2]
        assert client.read_file(run_id, "shards/1.txt", step=1) == b"1499500\n"
        assert client.read_file(run_id, "total.txt") == b"4498500\n"
        client.close_run(run_id)


def test_building_a_graph_needs_no_daemon() -> None:
    """Compiling the fan-out graph connects to nothing: a step is the first call."""
    app = fanout.build(fanout.scripted(), "/nonexistent/agentd.sock", "integration")
    assert set(app.get_graph().nodes) >= {"plan", "work", "reduce", "merge", "report"}
