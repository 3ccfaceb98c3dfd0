"""The registered agents and their effective policies, computed once at start-up.

A daemon whose config names a policy that does not load refuses to start: better no service
than a service running an agent under a policy nobody reviewed in that form.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.config import Config
from agentd.errors import NotFound
from agentd.policy import EffectivePolicy, effective_policy, load_policy, load_stage_ceilings


@dataclass(frozen=True)
class Agent:
    name: str
    stage: str
    policy_file: str
    policy: EffectivePolicy


class AgentRegistry:
    """Agent name → effective policy at the agent's stage."""

    def __init__(self, agents: dict[str, Agent]) -> None:
        self._agents = agents

    @classmethod
    def load(cls, config: Config) -> AgentRegistry:
        policy_dir = config.daemon.policy_dir
        ceilings = load_stage_ceilings(policy_dir / config.daemon.stages_file)
        agents = {}
        for name, section in config.agents.items():
            path = policy_dir / section.policy
            effective = effective_policy(load_policy(path), section.stage, ceilings)
            agents[name] = Agent(name, section.stage, str(path), effective)
        return cls(agents)

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise NotFound(f"agent {name!r} is not registered (registered: {known}); "
                           "add it under [agents] in the daemon config") from None

    def names(self) -> list[str]:
        return sorted(self._agents)
