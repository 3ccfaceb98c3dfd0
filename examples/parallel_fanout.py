"""A parallel fan-out graph on agentd: a planner splits the work into shards and calls one tool
per shard in a single turn; the shards run in parallel, each in its own confined worker, as ONE
agentd step (one snapshot, committed together or not at all); a reducer then joins their
outputs in a second step, and a last turn reports.

    plan ──(N parallel tool calls)──▶ work: one step, N workers ──▶ reduce ──▶ merge ──▶ report

    python examples/parallel_fanout.py --socket var/run/agentd.sock --agent integration

The model is scripted (no network); `build` takes any tool-calling chat model. The lines about
agentd are the marked block in `build`: at most 10 (docs/langgraph.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

from agentd_client import Client
from agentd_client.langgraph import AgentdCheckpointSaver, AgentdToolNode, agentd_tools
from agentd_client.langgraph.testing import ScriptedChatModel

SHARDS = 3


def build(model: BaseChatModel, socket: str | None, agent: str
          ) -> CompiledStateGraph[Any, Any, Any, Any]:
    graph = StateGraph(MessagesState)
    # --- agentd glue: begin ---
    agentd = Client(socket)
    tools = agentd_tools(agentd)
    graph.add_node("work", AgentdToolNode(tools, agentd, name="work"))
    graph.add_node("merge", AgentdToolNode(tools, agentd, name="merge"))
    saver = AgentdCheckpointSaver(InMemorySaver(), agentd, agent=agent)
    # --- agentd glue: end ---
    thinking = model.bind_tools(tools)

    def turn(state: MessagesState) -> dict[str, Any]:
        return {"messages": [thinking.invoke(state["messages"])]}

    for name in ("plan", "reduce", "report"):
        graph.add_node(name, turn)
    for edge in (("plan", "work"), ("work", "reduce"), ("reduce", "merge"),
                 ("merge", "report")):
        graph.add_edge(*edge)
    graph.add_edge(START, "plan")
    graph.add_edge("report", END)
    return graph.compile(checkpointer=saver)


def shard_call(index: int) -> dict[str, Any]:
    # Each makes shards/ itself: the calls of one step run on the same snapshot, so none
    # sees another's changes until the step has committed.
    code = ("import os; os.makedirs('shards', exist_ok=True)\n"
            f"total = sum(range({index} * 1000, {index + 1} * 1000))\n"
            f"open('shards/{index}.txt', 'w').write(f'{{total}}\\n')\n"
            f"print('shard {index}:', total)")
    return {"name": "run_python", "args": {"code": code}, "id": f"shard-{index}",
            "type": "tool_call"}


def scripted(shards: int = SHARDS) -> ScriptedChatModel:
    """Plans `shards` parallel calls (each writes its part), then sums them."""
    join = ("import glob; parts = [int(open(p).read()) for p in sorted(glob.glob('shards/*'))]; "
            "open('total.txt', 'w').write(f'{sum(parts)}\\n'); print(len(parts), sum(parts))")
    return ScriptedChatModel(script=[
        AIMessage("", tool_calls=[shard_call(i) for i in range(shards)]),
        AIMessage("", tool_calls=[{"name": "run_python", "args": {"code": join},
                                   "id": "join", "type": "tool_call"}]),
        AIMessage("The shards are summed in total.txt.")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="agentd's socket (default: $AGENTD_SOCKET, ...)")
    parser.add_argument("--agent", default="integration", help="an agent allowed python3")
    args = parser.parse_args(argv)
    app = build(scripted(), args.socket, args.agent)
    config: RunnableConfig = {"configurable": {"thread_id": "fanout-demo"}}
    final = app.invoke({"messages": [HumanMessage("Sum 0..2999 in three shards.")]}, config)
    for message in final["messages"]:
        print(f"{message.type}: {message.content}")
    position = app.get_state(config).metadata or {}
    print(f"agentd run {position.get('agentd_run_id')} at step {position.get('agentd_step')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
