"""LangGraph on agentd: tools, a tool node that makes one agentd step of each model turn,
approvals as interrupts, and a checkpoint saver that keeps the workspace with the state.

    from agentd_client import Client
    from agentd_client.langgraph import AgentdCheckpointSaver, AgentdToolNode, agentd_tools

    agentd = Client()
    tools = agentd_tools(agentd)
    graph.add_node("tools", AgentdToolNode(tools, agentd))   # instead of ToolNode(tools)
    app = graph.compile(checkpointer=AgentdCheckpointSaver(InMemorySaver(), agentd,
                                                           agent="shell-helper"))

Installed with the light client's `langgraph` extra (`pip install 'agentd-client[langgraph]'`);
`import agentd_client` alone never imports LangGraph. The semantics (one step per turn,
approvals, why time travel forks) are in docs/langgraph.md.
"""

from agentd_client.langgraph.node import AgentdToolNode
from agentd_client.langgraph.saver import RUN_KEY, STEP_KEY, AgentdCheckpointSaver, Position
from agentd_client.langgraph.tools import MAX_OUTPUT, AgentdTool, agentd_tools

__all__ = ["MAX_OUTPUT", "RUN_KEY", "STEP_KEY", "AgentdCheckpointSaver", "AgentdTool",
           "AgentdToolNode", "Position", "agentd_tools"]
