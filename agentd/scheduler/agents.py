"""The registered agents and their effective policies: computed at start-up, and again on a
reload (SIGHUP or the admin's ReloadPolicies).

A daemon whose config names a policy that does not load refuses to start: better no service
than a service running an agent under a policy nobody reviewed in that form. A reload is all or
nothing: every file is loaded and clamped first (`prepare_reload`), and only if all of them are
valid are the new policies swapped in, in one assignment on the event loop (`swap`), so a step
is planned either wholly under the old policies or wholly under the new ones.

A promoted agent's policy is *pinned*: it runs the version its promotion or a later acceptance
recorded (`pins`, agent -> source hash, kept in agentd/store/policies.py), and a file that says
something else is *unreviewed*: still validated on every load (a broken file fails a reload as
for anyone), shown, and in force only once an approver accepts it
(agentd/scheduler/stages.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentd.config import AgentSection, Config
from agentd.errors import AgentdError, NotFound
from agentd.policy import EffectivePolicy, effective_policy, load_policy, load_stage_ceilings
from agentd.policy.loader import read_source
from agentd.policy.model import STAGES, StageCeilings
from agentd.store.policies import PolicyCopies, source_hash


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
    source: str = ""
    """The source hash of the version in force (the pinned one for a promoted agent)."""
    source_text: bytes = field(default=b"", repr=False)
    file_source: str = ""
    """The source hash of what the file says now; differs from `source` while unreviewed."""
    file_text: bytes = field(default=b"", repr=False)
    file_policy: EffectivePolicy | None = None
    """The file's version at the agent's stage, while it is unreviewed (else None)."""
    file_problem: str = ""
    """Why the unreviewed file's version cannot run at the agent's stage ("" if it can): it
    is shown and recorded, and it never blocks the version in force (a demotion, a start)."""

    @property
    def unreviewed(self) -> bool:
        return self.file_source != self.source


@dataclass(frozen=True)
class Reloaded:
    """One agent's effective policy before and after a reload."""

    agent: str
    stage: str
    policy_file: str
    old_hash: str
    new_hash: str
    clamped: tuple[str, ...]
    unreviewed: str = ""
    """The file's source hash when it waits for review (the agent keeps `new_hash`)."""

    @property
    def changed(self) -> bool:
        return self.old_hash != self.new_hash


class AgentRegistry:
    """Agent name → effective policy at the agent's stage, and the stage ceilings in force.

    Only a start or a reload reads the policy files and stages.yaml. A stage change or an
    acceptance re-clamps that one agent from the bytes already in memory (`restage`), so
    another agent's broken file, or a stages.yaml edited but not yet reloaded, can neither
    stop a demotion nor come into force without its reload record. Callers serialise every
    change (reload, promotion, demotion, acceptance) on one lock (StageKeeper.lock), so a
    reload prepared from the registry cannot undo a stage change made meanwhile.
    """

    def __init__(self, agents: dict[str, Agent], config: Config | None = None,
                 copies: PolicyCopies | None = None,
                 ceilings: StageCeilings | None = None) -> None:
        self._agents = agents
        self._config = config
        self.copies = copies
        self.ceilings = ceilings
        self.pins: dict[str, str] = {}

    @classmethod
    def load(cls, config: Config, stages: Mapping[str, str] | None = None,
             pins: Mapping[str, str] | None = None) -> AgentRegistry:
        """Every agent at `stages` (default: the config's), a pinned one running its pinned
        version (`pins`, as the audit log says; see agentd/scheduler/stages.py)."""
        copies = PolicyCopies(config.daemon.state_dir / "policies")
        ceilings = load_stage_ceilings(config.daemon.policy_dir / config.daemon.stages_file)
        config = with_stages(config, dict(stages or {}))
        registry = cls(_build(config, pins or {}, copies, ceilings), config, copies, ceilings)
        registry.pins.update(pins or {})
        return registry

    def prepare_reload(self) -> tuple[Prepared, list[Reloaded]]:
        """Every agent's policy loaded and clamped again from the files; raises (PolicyError,
        OSError) on the first that does not load, and nothing changes. Blocking file reads:
        call it off the event loop, then `swap`."""
        if self._config is None:
            raise RuntimeError("a registry made without a config cannot reload")
        daemon = self._config.daemon
        ceilings = load_stage_ceilings(daemon.policy_dir / daemon.stages_file)
        agents = _build(self._config, self.pins, self.copies, ceilings)
        return Prepared(agents, ceilings), [
            Reloaded(name, agent.stage, agent.policy_file,
                     self._agents[name].policy.content_hash, agent.policy.content_hash,
                     agent.policy.notes, agent.file_source if agent.unreviewed else "")
            for name, agent in sorted(agents.items())]

    def swap(self, prepared: Prepared) -> None:
        """A reload's policies and ceilings, in force for every step planned from now on."""
        self._agents = prepared.agents
        self.ceilings = prepared.ceilings

    def restage(self, name: str, *, stage: str | None = None, pin: str | None = None) -> Agent:
        """`name` at `stage` (default: its own), running version `pin` (default: the one in
        force), clamped under the ceilings in force from bytes in memory (or, for an older
        pinned version, its verified copy): no policy file and no stages.yaml is read."""
        current = self.get(name)
        if self._config is None or self.ceilings is None:
            raise RuntimeError("a registry made without a config cannot change stages")
        section = self._config.agents[name].model_copy(
            update={"stage": stage or current.stage})
        if pin is None or pin == current.source:
            text, source = current.source_text, current.source
        elif pin == current.file_source:
            text, source = current.file_text, current.file_source
        elif self.copies is not None:
            text, source = self.copies.read(pin), pin
        else:
            raise RuntimeError("a registry without policy copies cannot pin a version")
        return _agent(name, section, Path(current.policy_file), text, source,
                      current.file_text, current.file_source, self.ceilings)

    def replace(self, agent: Agent, pin: str | None = None) -> None:
        """One agent, as `restage` made it, in force from now on (its stage and pin kept for
        later reloads)."""
        self._agents = {**self._agents, agent.name: agent}
        if pin is not None:
            self.pins[agent.name] = pin
        if self._config is not None:
            self._config = with_stages(self._config, {agent.name: agent.stage})

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise NotFound(f"agent {name!r} is not registered (registered: {known}); "
                           "add it under [agents] in the daemon config") from None

    def names(self) -> list[str]:
        return sorted(self._agents)


@dataclass(frozen=True)
class Prepared:
    """A reload's outcome before it is in force: every agent, and the ceilings it used."""

    agents: dict[str, Agent]
    ceilings: StageCeilings


def with_stages(config: Config, stages: dict[str, str]) -> Config:
    """`config` with some agents at other stages (the stage log decides them, not the file)."""
    agents = {name: section.model_copy(update={"stage": stages[name]}) if name in stages
              else section for name, section in config.agents.items()}
    return config.model_copy(update={"agents": agents})


def _build(config: Config, pins: Mapping[str, str], copies: PolicyCopies | None,
           ceilings: StageCeilings) -> dict[str, Agent]:
    """Every agent's policy at its stage: the file's version, or for a pinned agent the
    accepted copy (the file still loaded and validated, and kept, for its review)."""
    agents = {}
    for name, section in config.agents.items():
        path = config.daemon.policy_dir / section.policy
        file_text = read_source(path)
        file_source = source_hash(file_text)
        text, source = file_text, file_source
        pin = pins.get(name)
        if pin is not None and pin != file_source and copies is not None:
            load_policy(path, file_text)  # a broken file fails a load, pinned agent or not
            text, source = copies.read(pin), pin
            copies.keep(file_text)  # the bytes an approver will accept, not the file's later
        agents[name] = _agent(name, section, path, text, source, file_text, file_source,
                              ceilings)
    return agents


def _agent(name: str, section: AgentSection, path: Path, text: bytes, source: str,
           file_text: bytes, file_source: str, ceilings: StageCeilings) -> Agent:
    """One agent from its version in force (`text`) and its file's (`file_text`)."""
    policy = load_policy(path, text)
    effective = effective_policy(policy, section.stage, ceilings)
    shadow = None
    if section.audit_next_stage and section.stage != STAGES[-1]:
        following = STAGES[STAGES.index(section.stage) + 1]
        if policy.resolve(following) is not None:
            shadow = effective_policy(policy, following, ceilings)
    file_policy, problem = None, ""
    if source != file_source:
        try:  # validated when loaded; only its clamp at this stage can fail
            file_policy = effective_policy(load_policy(path, file_text), section.stage, ceilings)
        except AgentdError as exc:
            problem = exc.message
    return Agent(name, section.stage, str(path), effective, shadow, source, text, file_source,
                 file_text, file_policy, problem)


def check_files(config: Config) -> None:
    """Every policy file and stages.yaml read and validated (PolicyError naming file, line
    and field): what a start checks before anything else, when the stages each agent runs at
    are not known yet (the audit log says them)."""
    load_stage_ceilings(config.daemon.policy_dir / config.daemon.stages_file)
    for section in config.agents.values():
        load_policy(config.daemon.policy_dir / section.policy)
