"""The registered agents and their effective policies: computed at start-up, and again on a
reload (SIGHUP or the admin's ReloadPolicies).

A daemon whose config names a policy that does not load refuses to start: better no service
than a service running an agent under a policy nobody reviewed in that form. A reload is all or
nothing: every file is loaded and clamped first (`prepare_reload`), and only if all of them are
valid are the new policies swapped in, in one assignment on the event loop (`swap`), so a step
is planned either wholly under the old policies or wholly under the new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.config import Config
from agentd.errors import NotFound
from agentd.policy import EffectivePolicy, effective_policy, load_policy, load_stage_ceilings
from agentd.policy.model import STAGES


@dataclass(frozen=True)
class Agent:
    name: str
    stage: str
    policy_file: str
    policy: EffectivePolicy
    shadow: EffectivePolicy | None = None
    """Audit mode: the next stage's effective policy, evaluated beside `policy`, never
    enforced (None: audit mode is off, the agent is at production, or the policy declares
    nothing at the next stage)."""


@dataclass(frozen=True)
class Reloaded:
    """One agent's effective policy before and after a reload."""

    agent: str
    stage: str
    policy_file: str
    old_hash: str
    new_hash: str
    clamped: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.old_hash != self.new_hash


class AgentRegistry:
    """Agent name → effective policy at the agent's stage."""

    def __init__(self, agents: dict[str, Agent], config: Config | None = None) -> None:
        self._agents = agents
        self._config = config

    @classmethod
    def load(cls, config: Config) -> AgentRegistry:
        return cls(_build(config), config)

    def prepare_reload(self) -> tuple[dict[str, Agent], list[Reloaded]]:
        """Every agent's policy loaded and clamped again from the files; raises (PolicyError,
        OSError) on the first that does not load, and nothing changes. Blocking file reads:
        call it off the event loop, then `swap`."""
        if self._config is None:
            raise RuntimeError("a registry made without a config cannot reload")
        agents = _build(self._config)
        return agents, [Reloaded(name, agent.stage, agent.policy_file,
                                 self._agents[name].policy.content_hash,
                                 agent.policy.content_hash, agent.policy.notes)
                        for name, agent in sorted(agents.items())]

    def prepare_stage(self, agent: str, stage: str) -> dict[str, Agent]:
        """Every agent as now, `agent` at `stage` (its policy clamped there); `swap` it in."""
        return self.prepare_stages({agent: stage})

    def prepare_stages(self, stages: dict[str, str]) -> dict[str, Agent]:
        if self._config is None:
            raise RuntimeError("a registry made without a config cannot change stages")
        return _build(with_stages(self._config, stages))

    def swap(self, agents: dict[str, Agent]) -> None:
        """The prepared policies, in force for every step planned from now on; the stages
        they are at stay for later reloads."""
        self._agents = agents
        if self._config is not None:
            self._config = with_stages(self._config, {n: a.stage for n, a in agents.items()})

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise NotFound(f"agent {name!r} is not registered (registered: {known}); "
                           "add it under [agents] in the daemon config") from None

    def names(self) -> list[str]:
        return sorted(self._agents)


def with_stages(config: Config, stages: dict[str, str]) -> Config:
    """`config` with some agents at other stages (the stage log decides them, not the file)."""
    agents = {name: section.model_copy(update={"stage": stages[name]}) if name in stages
              else section for name, section in config.agents.items()}
    return config.model_copy(update={"agents": agents})


def _build(config: Config) -> dict[str, Agent]:
    policy_dir = config.daemon.policy_dir
    ceilings = load_stage_ceilings(policy_dir / config.daemon.stages_file)
    agents = {}
    for name, section in config.agents.items():
        path = policy_dir / section.policy
        policy = load_policy(path)
        effective = effective_policy(policy, section.stage, ceilings)
        shadow = None
        if section.audit_next_stage and section.stage != STAGES[-1]:
            following = STAGES[STAGES.index(section.stage) + 1]
            if policy.resolve(following) is not None:
                shadow = effective_policy(policy, following, ceilings)
        agents[name] = Agent(name, section.stage, str(path), effective, shadow)
    return agents
