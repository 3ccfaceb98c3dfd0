"""A ReAct agent whose tools run on agentd: the model reasons, calls tools (several at once),
sees their results, and answers. Each model turn's tool calls are ONE agentd step, a step that
needs an approver interrupts the graph, and the checkpointer keeps the workspace with the
state (docs/langgraph.md).

    python examples/react_agent.py --socket var/run/agentd.sock --agent shell-helper

The model here is scripted (no network, no key): `build` takes any tool-calling chat model,
e.g. `langchain.chat_models.init_chat_model("anthropic:claude-sonnet-4-5")`.
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import tools_condition

from agentd_client import Client
from agentd_client.langgraph import AgentdCheckpointSaver, AgentdToolNode, agentd_tools
from agentd_client.langgraph.testing import ScriptedChatModel


def build(model: BaseChatModel, agentd: Client, *, agent: str,
          checkpointer: BaseCheckpointSaver[Any] | None = None,
          approval_timeout: float = 600.0) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The classic ReAct loop: agent -> tools -> agent until the model stops calling tools."""
    tools = agentd_tools(agentd)
    thinking = model.bind_tools(tools)

    def think(state: MessagesState) -> dict[str, Any]:
        return {"messages": [thinking.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", think)
    graph.add_node("tools", AgentdToolNode(tools, agentd, approval_timeout=approval_timeout))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    saver = AgentdCheckpointSaver(checkpointer or InMemorySaver(), agentd, agent=agent)
    return graph.compile(checkpointer=saver)


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def scripted() -> ScriptedChatModel:
    """A model that writes two files in one turn (parallel calls), then checks them."""
    return ScriptedChatModel(script=[
        AIMessage("", tool_calls=[
            call("write_file", "w1", path="notes/todo.txt", content="ship it\n"),
            call("run_python", "p1", code="open('answer.txt', 'w').write(str(6 * 7))")]),
        AIMessage("", tool_calls=[call("run_command", "c1",
                                       command="cat notes/todo.txt answer.txt")]),
        AIMessage("notes/todo.txt says to ship it, and the answer is 42.")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="agentd's socket (default: $AGENTD_SOCKET, ...)")
    parser.add_argument("--agent", default="shell-helper", help="the agent to run as")
    args = parser.parse_args(argv)
    with Client(args.socket) as agentd:
        app = build(scripted(), agentd, agent=args.agent)
        config: RunnableConfig = {"configurable": {"thread_id": "react-demo"}}
        final = app.invoke({"messages": [HumanMessage("What does the todo say?")]}, config)
        for message in final["messages"]:
            print(f"{message.type}: {message.content}")
        position = app.get_state(config).metadata or {}
        print(f"agentd run {position.get('agentd_run_id')} at step {position.get('agentd_step')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
