"""Graph mode: a reviewed YAML file of tool-call templates that the daemon runs as a Pregel loop.

    load_graph(path, raw=None) -> Graph        validated, with file/line/field errors (model)
    render(node, snapshot)     -> argv, env    channel values substituted (template)
    plan(graph, before, after, available)      the nodes of the next superstep (pregel)
    lint(graph, decide=None)   -> [Finding]    double scheduling, dead channels and nodes,
                                               endless cycles, refused tools (lint)
    graph_mermaid(graph), timeline_mermaid(rows)  Mermaid text (mermaid)

Everything here is pure data and decisions, like `agentd/policy/`: no daemon, no clock, no
gRPC. The loop that runs supersteps as steps is `agentd/scheduler/graph.py`; agentctl uses this
package to lint and render a file locally (its one use of it).
"""

from __future__ import annotations

from agentd.graph.lint import Finding, lint
from agentd.graph.mermaid import TimelineRow, graph_mermaid, timeline_mermaid
from agentd.graph.model import Graph, Node, load_graph
from agentd.graph.pregel import plan
from agentd.graph.template import render

__all__ = ["Finding", "Graph", "Node", "TimelineRow", "graph_mermaid", "lint", "load_graph",
           "plan", "render", "timeline_mermaid"]
