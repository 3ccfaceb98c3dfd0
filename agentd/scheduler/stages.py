"""Stages as state: each agent's stage and its history live in the audit log, and change only
through a gate (promotion) or a demotion.

The config names an agent's policy and, for an agent with no history yet, its starting stage
(recorded as `stage.set`). After that the log decides: a different stage written in the config
has no effect; it is logged at start and shown by `agentctl stage status` as a mismatch.

A promotion is a request (`stage.promotion_requested`), refused with every unmet criterion
unless all of the gate's are met on the evidence of the stage below (agentd/audit/evidence.py,
counted since the agent entered that stage), then approved on the approver socket by the gate's
number of distinct uids, none of them the requester's and none the named owner's. The last
approval appends `stage.promoted` with the evidence summary, the tree size it was computed at,
the policy's content hash and the semantic diff of what becomes allowed; the new stage's policy
is in force for steps planned from then on (a running step keeps the policy it was planned
with). A pending request and its approvals are rebuilt from their records at start, so a
restart loses none of them.

From its first promotion on, an agent's policy is pinned to a reviewed version: the one its
promotion recorded (`policy_source`, the sha256 of the file's bytes, kept in
agentd/store/policies.py), then each one an approver accepts. A policy file changed under it is
*unreviewed* (`policy.unreviewed`, with the semantic diff, at the reload or start that finds it):
the agent keeps running the accepted version until someone on the approver socket accepts the
new one (`policy.accepted`; not whoever loaded it), naming its hash, so that what is accepted is
what was reviewed even if the file moves again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pwd
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agentd.audit import AuditLog, record
from agentd.audit.evidence import Evidence, collect, read_records
from agentd.config import Config
from agentd.errors import AgentdError, FailedPrecondition, InvalidArgument, PermissionDenied
from agentd.identity import Caller
from agentd.policy.diff import diff
from agentd.policy.loader import read_source
from agentd.policy.model import STAGES, Gate, Gates
from agentd.scheduler.agents import AgentRegistry
from agentd.store.policies import PolicyCopies

log = structlog.get_logger("agentd.stages")

CHANGES = ("stage.set", "stage.promoted", "stage.demoted")
# The records a start-up reads to rebuild stages, pins, reviews and pending promotions.
KEPT = (*CHANGES, "stage.promotion_requested", "stage.promotion_approved",
        "stage.promotion_refused", "policy.accepted", "policy.pinned", "policy.unreviewed")
# How an approver names a policy version: the whole hash, never a prefix.
FULL_HASH = re.compile(r"(sha256:)?[0-9a-f]{64}")


@dataclass(frozen=True)
class StageChange:
    index: int
    time: str
    event: str
    stage: str
    previous: str
    actor: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class Criterion:
    """One condition of a gate, with the figure and the records behind it."""

    name: str
    met: bool
    figure: str
    records: tuple[int, ...] = ()


@dataclass
class Pending:
    agent: str
    to: str
    owner: str
    reason: str
    requested_by: Mapping[str, Any]
    """The requester's audit actor; its `uid` may not approve."""
    approvers: dict[int, str] = field(default_factory=dict)  # uid -> name


@dataclass(frozen=True)
class Unreviewed:
    """A policy file version that waits for an approver's acceptance."""

    source: str
    index: int
    """The `policy.unreviewed` record."""
    loaded_by: int | None
    """The uid whose reload found it: root's (0) when the daemon found it at start or on
    SIGHUP, which only root can send (None: not on record yet)."""


@dataclass(frozen=True)
class StageStatus:
    agent: str
    stage: str
    config_stage: str
    since_index: int
    next_stage: str
    criteria: tuple[Criterion, ...]
    pending: Pending | None
    approvals_needed: int
    policy_source: str = ""
    """The policy version in force (source hash); pinned once the agent was promoted."""
    config_ignored: bool = False
    """The config names another starting stage than the one the history began at: it was
    edited after the fact, and has no effect."""
    owner: str = ""
    """Who answers for the agent at its stage: its last promotion's owner."""
    evidence_head: Mapping[str, Any] = field(default_factory=dict)
    """The signed tree head whose records the criteria were judged on."""
    unreviewed: Unreviewed | None = None
    next_refuses: tuple[int, ...] = ()
    """Audit mode, at this stage: calls the next stage's policy would refuse, and ..."""
    next_allows: tuple[int, ...] = ()
    """... calls it would newly allow (the `stage.shadow` records)."""


class StageBook:
    """Every agent's stage history, pending promotion, pinned policy version and unreviewed
    one, from the log's records (KEPT)."""

    def __init__(self) -> None:
        self.history: dict[str, list[StageChange]] = {}
        self.pending: dict[str, Pending] = {}
        self.pins: dict[str, str] = {}
        self.unreviewed: dict[str, Unreviewed] = {}
        self.owners: dict[str, str] = {}

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> StageBook:
        book = cls()
        for rec in records:
            book.add(rec)
        return book

    def add(self, rec: Mapping[str, Any]) -> None:
        event = str(rec.get("event"))
        details = rec.get("details") or {}
        actor = rec.get("actor") or {}
        agent = str(details.get("agent"))
        if event in CHANGES:
            self.history.setdefault(agent, []).append(StageChange(
                int(rec["index"]), str(rec.get("time", "")), event,
                str(details.get("stage") or details.get("to")), str(details.get("from", "")),
                actor, str(details.get("reason", ""))))
            self.pending.pop(agent, None)
            if event == "stage.promoted":
                self.owners[agent] = str(details.get("owner", ""))
            if details.get("policy_source"):
                self.pins[agent] = str(details["policy_source"])
        elif event == "stage.promotion_requested":
            self.pending[agent] = Pending(agent, str(details.get("to")),
                                          str(details.get("owner", "")),
                                          str(details.get("reason", "")), actor)
        elif event == "stage.promotion_approved" and agent in self.pending:
            uid = actor.get("uid")
            if isinstance(uid, int):
                self.pending[agent].approvers[uid] = _user(uid)
        elif event == "stage.promotion_refused":
            self.pending.pop(agent, None)
        elif event in ("policy.accepted", "policy.pinned"):
            self.pins[agent] = str(details.get("source"))
            self.unreviewed.pop(agent, None)
        elif event == "policy.unreviewed":
            uid = actor.get("uid")
            self.unreviewed[agent] = Unreviewed(str(details.get("source")), int(rec["index"]),
                                                uid if isinstance(uid, int) else 0)

    def recorded(self, index: int, event: str, actor: Mapping[str, Any],
                 details: Mapping[str, Any]) -> None:
        """A change this daemon has just appended to the log (at `index`)."""
        self.add({"index": index, "time": record.now(), "event": event, "actor": actor,
                  "details": details})

    def stage(self, agent: str) -> str | None:
        changes = self.history.get(agent)
        return changes[-1].stage if changes else None

    def started(self, agent: str) -> str | None:
        """The stage the agent's history began at (its first `stage.set`)."""
        changes = self.history.get(agent)
        return changes[0].stage if changes else None

    def entered(self, agent: str) -> StageChange | None:
        changes = self.history.get(agent)
        return changes[-1] if changes else None


def next_stage(stage: str) -> str:
    index = STAGES.index(stage)
    return STAGES[index + 1] if index + 1 < len(STAGES) else ""


def criteria(gate: Gate, evidence: Evidence, *, entered_time: str, now: float,
             policy_hash: str) -> list[Criterion]:
    """Every condition of `gate` on `evidence` (of the stage below, since entering it)."""
    out = [
        Criterion("runs", len(evidence.runs) >= gate.min_runs,
                  f"{len(evidence.runs)} of at least {gate.min_runs}", tuple(evidence.runs)),
        Criterion("steps", evidence.steps >= gate.min_steps,
                  f"{evidence.steps} of at least {gate.min_steps}",
                  tuple(sorted(evidence.steps_committed + evidence.steps_failed))),
        Criterion("failure rate", evidence.failure_rate <= gate.max_failure_rate,
                  f"{evidence.failure_rate:.1%} of at most {gate.max_failure_rate:.1%}",
                  tuple(evidence.steps_failed)),
        Criterion("violations", len(evidence.violations) <= gate.max_violations,
                  f"{len(evidence.violations)} of at most {gate.max_violations}",
                  tuple(i for i, _, _ in evidence.violations)),
        Criterion("rollback drills", len(evidence.rollbacks) >= gate.rollback_drills,
                  f"{len(evidence.rollbacks)} of at least {gate.rollback_drills}",
                  tuple(evidence.rollbacks)),
    ]
    if gate.min_time is not None:
        since = record.parse_time(entered_time).timestamp() if entered_time else now
        held = now - since
        out.append(Criterion("time at the stage", held >= gate.min_time,
                             f"{held / 3600:.2f} h of at least {gate.min_time / 3600:.2f} h"))
    if gate.policy_unchanged:
        versions = set(evidence.policy_hashes) | {policy_hash}
        out.append(Criterion("policy unchanged", len(versions) == 1,
                             f"{len(versions)} version(s) in the window",
                             tuple(evidence.policy_hashes.values())))
    return out


class StageKeeper:
    """The daemon's stages: status, history, promotion requests and approvals."""

    def __init__(self, book: StageBook, registry: AgentRegistry, audit: AuditLog,
                 config_stages: Mapping[str, str], system: Mapping[str, Any]) -> None:
        self.book = book
        self._system = dict(system)
        self.registry = registry
        self.audit = audit
        self.config_stages = dict(config_stages)
        self.pending = book.pending
        self.lock = asyncio.Lock()
        """Every change of what an agent runs (promotion, demotion, acceptance, and the
        daemon's reload) holds it, so that none undoes another prepared meanwhile."""
        self._demoting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by `attach`: whose run it is, the agent's open runs, and how to stop a run's
        # workers (agentd/scheduler/runs.py).
        self._agent_of: Callable[[str], str] | None = None
        self._open_runs: Callable[[str], list[str]] | None = None
        self._stop_run: Callable[[str, str], Awaitable[int]] | None = None

    @property
    def gates(self) -> Gates:
        """The gates of the stages.yaml in force (as last loaded at start or reload)."""
        ceilings = self.registry.ceilings
        return ceilings.gates if ceilings is not None else Gates()

    def attach(self, agent_of: Callable[[str], str], open_runs: Callable[[str], list[str]],
               stop_run: Callable[[str, str], Awaitable[int]]) -> None:
        self._agent_of, self._open_runs, self._stop_run = agent_of, open_runs, stop_run

    def on_event(self, run_id: str, kind: str, what: str) -> None:
        """A violation or quarantine in `run_id`: if the agent's stage demotes on `kind`
        (its gate's `demote_on`), it drops one stage at once and its running steps stop."""
        if self._agent_of is None:
            return
        try:
            agent = self._agent_of(run_id)
            stage = self.stage(agent)
        except AgentdError:
            return
        gate: Gate | None = getattr(self.gates, stage, None)
        if gate is None or kind not in gate.demote_on or agent in self._demoting:
            return
        self._demoting.add(agent)
        task = asyncio.get_running_loop().create_task(self._demote(agent, stage, kind, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _demote(self, agent: str, stage: str, kind: str, what: str) -> None:
        try:
            async with self.lock:
                if self.stage(agent) != stage:
                    return
                to = STAGES[STAGES.index(stage) - 1]
                # From the bytes in memory: no file (another agent's, or an edited
                # stages.yaml) can make a demotion fail or bring in what no reload recorded.
                lower = self.registry.restage(agent, stage=to)
                details = {"agent": agent, "from": stage, "to": to,
                           "reason": f"{kind}: {what}"[:1000]}
                index = await self.audit.append("stage.demoted", actor=self._system,
                                                details=details)
                self.registry.replace(lower)
                self.book.recorded(index, "stage.demoted", self._system, details)
                self.pending.pop(agent, None)
                log.warning("stage.demoted", agent=agent, stage=to, reason=details["reason"])
            # Its running steps stop: a killed task fails its step, so nothing of it applies.
            if self._open_runs is not None and self._stop_run is not None:
                for run_id in self._open_runs(agent):
                    await self._stop_run(run_id, "cancelled")
        except AgentdError as exc:  # the log refused the record: nothing changed
            log.exception("stage.demotion_failed", agent=agent, error=exc.message)
        except Exception:  # a bug: logged loudly, and the agent keeps its (higher) stage
            log.exception("stage.demotion_failed", agent=agent)
        finally:
            self._demoting.discard(agent)

    def stage(self, agent: str) -> str:
        return self.registry.get(agent).stage

    def history(self, agent: str) -> list[StageChange]:
        self.registry.get(agent)  # NotFound for an unknown agent
        return list(self.book.history.get(agent, []))

    async def status(self, agent: str) -> StageStatus:
        current = self.registry.get(agent)
        stage = current.stage
        target = next_stage(stage)
        entered = self.book.entered(agent)
        found: list[Criterion] = []
        needed = 0
        # Over what the last signed head covers (every acknowledged record: each batch is
        # signed before its callers hear of it), so the figures are a signed state's.
        head = self.audit.last_head
        evidence = await asyncio.to_thread(self._evidence, agent, stage,
                                           entered.index if entered else 0,
                                           head.tree_size if head is not None else 0)
        if target:
            gate: Gate = getattr(self.gates, target)
            needed = gate.approvals
            found = criteria(gate, evidence, entered_time=entered.time if entered else "",
                             now=time.time(), policy_hash=current.policy.content_hash)
        return StageStatus(
            agent, stage, self.config_stages.get(agent, ""), entered.index if entered else -1,
            target, tuple(found), self.pending.get(agent), needed,
            policy_source=current.source, unreviewed=self._unreviewed(agent),
            next_refuses=tuple(evidence.next_refuses), next_allows=tuple(evidence.next_allows),
            config_ignored=self.book.started(agent) not in (None, self.config_stages.get(agent)),
            owner=self.book.owners.get(agent, ""),
            evidence_head=head.to_json() if head is not None else {})

    def _unreviewed(self, agent: str) -> Unreviewed | None:
        current = self.registry.get(agent)
        noted = self.book.unreviewed.get(agent)
        if not current.unreviewed:
            return None
        if noted is None or noted.source != current.file_source:
            return Unreviewed(current.file_source, -1, None)  # found, its record on the way
        return noted

    async def note_unreviewed(self, caller: Caller) -> list[str]:
        """After a reload or at start: a pinned agent whose file now says something else gets
        one `policy.unreviewed` record per new version, with what it would change."""
        noted = []
        for name, details in newly_unreviewed(self.registry, self.book):
            index = await self.audit.append("policy.unreviewed", actor=caller.actor(),
                                            details=details)
            self.book.recorded(index, "policy.unreviewed", caller.actor(), details)
            noted.append(name)
        return noted

    async def accept(self, agent: str, source: str, reason: str,
                     caller: Caller) -> StageStatus:
        """An approver accepts the unreviewed version named by `source`, its whole hash (a
        prefix would let an author prepare a harmless and a harmful file that share it): it
        is pinned and in force for steps planned from now on."""
        async with self.lock:
            current = self.registry.get(agent)
            waiting = self._unreviewed(agent)
            if waiting is None:
                raise FailedPrecondition(f"{agent}'s policy has no unreviewed change (in force: "
                                         f"{current.source or 'the file as loaded'})")
            wanted = source.strip().lower()
            if not FULL_HASH.fullmatch(wanted):
                raise InvalidArgument(
                    f"{source!r} is not a policy version: give the whole hash, sha256: and 64 "
                    f"hex digits, as `agentctl stage status {agent}` prints it")
            if "sha256:" + wanted.removeprefix("sha256:") != waiting.source:
                raise FailedPrecondition(
                    f"the unreviewed version of {agent}'s policy is {waiting.source}, not "
                    f"{source}; review that one (agentctl stage status {agent}) and accept it "
                    "by its hash")
            if caller.uid is None or caller.role != "approver":
                raise PermissionDenied("a policy change is accepted by a person on the approver "
                                       "socket", rule="stages: acceptance on the approver socket")
            if waiting.loaded_by is None:
                raise FailedPrecondition(f"{agent}'s policy change is being recorded; accept "
                                         "it once `agentctl stage status` shows its record")
            if caller.uid == waiting.loaded_by:
                raise PermissionDenied("whoever loaded a policy change cannot accept it; "
                                       "another person must",
                                       rule="stages: acceptor uid != reloader uid")
            after = await asyncio.to_thread(self.registry.restage, agent, pin=waiting.source)
            if self.registry.copies is not None:  # durable before the record that names it
                try:
                    await asyncio.to_thread(self.registry.copies.keep, after.source_text)
                except OSError as exc:
                    raise FailedPrecondition(
                        f"the accepted version could not be kept ({exc.strerror}): nothing "
                        "was accepted; free space in (or repair) the state directory and "
                        "accept again") from None
            details = {"agent": agent, "stage": current.stage,
                       "policy_file": current.policy_file, "source": waiting.source,
                       "previous": current.source,
                       "policy_hash": after.policy.content_hash,
                       "diff": [c.line().strip() for c in diff(current.policy, after.policy)],
                       "reason": reason[:1000]}
            index = await self.audit.append("policy.accepted", actor=caller.actor(),
                                            details=details)
            self.registry.replace(after, waiting.source)
            self.book.recorded(index, "policy.accepted", caller.actor(), details)
            log.warning("policy.accepted", agent=agent, source=waiting.source, uid=caller.uid)
        return await self.status(agent)

    def _evidence(self, agent: str, stage: str, since: int, size: int) -> Evidence:
        """From the record after `since` (the agent's entry into its stage), reached by the
        log's own index of positions, not by reading what comes before it."""
        records = self.audit.read(since + 1, size)
        return collect(records, agent).get(stage) or Evidence(agent, stage)

    async def request(self, agent: str, to: str, owner: str, reason: str,
                      caller: Caller) -> StageStatus:
        """A promotion request: refused with every unmet criterion, else pending approval."""
        async with self.lock:
            status = await self.status(agent)
            if to != status.next_stage:
                raise InvalidArgument(f"{agent} is at {status.stage}; the only promotion is to "
                                      f"{status.next_stage or 'nothing (it is at the top)'}")
            if not owner.strip() or not reason.strip():
                raise InvalidArgument("a promotion names an accountable owner and a reason")
            unmet = [c for c in status.criteria if not c.met]
            if unmet:
                raise FailedPrecondition(
                    f"{agent} cannot be promoted to {to}: "
                    + "; ".join(f"{c.name}: {c.figure}" for c in unmet))
            pending = Pending(agent, to, owner.strip(), reason.strip(), caller.actor())
            await self.audit.append("stage.promotion_requested", actor=caller.actor(),
                                    details={"agent": agent, "from": status.stage, "to": to,
                                             "owner": owner, "reason": reason[:1000]})
            self.pending[agent] = pending
            # The status just judged, with its request: the log is not read a second time.
            return dataclasses.replace(status, pending=pending)

    async def approve(self, agent: str, approve: bool, reason: str,
                      caller: Caller) -> StageStatus:
        """One approver's decision; the last approval promotes, a refusal drops the request.
        An approval counts once its record is written (a failed append lets them retry)."""
        async with self.lock:
            pending = self.pending.get(agent)
            if pending is None:
                raise FailedPrecondition(f"no promotion of {agent} is pending; request one "
                                         "with agentctl stage promote")
            if caller.uid is None:
                raise PermissionDenied("an approval needs the caller's uid (SO_PEERCRED)")
            name = _user(caller.uid)
            if caller.uid == pending.requested_by.get("uid"):
                raise PermissionDenied("the requester cannot approve their own promotion",
                                       rule="stages: approver uid != requester uid")
            if name == pending.owner:
                raise PermissionDenied(f"{name} is the promotion's owner and cannot approve it",
                                       rule="stages: owner is not an approver")
            if caller.uid in pending.approvers:
                raise FailedPrecondition(f"uid {caller.uid} has already approved; another "
                                         "person must")
            if not approve:
                await self.audit.append("stage.promotion_refused", actor=caller.actor(),
                                        details={"agent": agent, "to": pending.to,
                                                 "reason": reason[:1000]})
                del self.pending[agent]
                return await self.status(agent)
            approvers = {**pending.approvers, caller.uid: name}
            gate: Gate = getattr(self.gates, pending.to)
            if len(approvers) < gate.approvals:
                await self.audit.append("stage.promotion_approved", actor=caller.actor(),
                                        details={"agent": agent, "to": pending.to,
                                                 "approvals": len(approvers),
                                                 "needed": gate.approvals})
                pending.approvers[caller.uid] = name
                return await self.status(agent)
            # What the approvers judged is the version in force; a file edited since it was
            # loaded is read by the next reload, and waits for review then.
            await self._promote(dataclasses.replace(pending, approvers=approvers), caller)
            return await self.status(agent)

    async def _promote(self, pending: Pending, caller: Caller) -> None:
        agent = pending.agent
        before = self.registry.get(agent)
        status = await self.status(agent)
        unmet = [c for c in status.criteria if not c.met]
        if unmet:  # the evidence moved since the request (a violation meanwhile)
            self.pending.pop(agent, None)
            await self.audit.append("stage.promotion_refused", actor=self._system, details={
                "agent": agent, "to": pending.to,
                "reason": "the evidence no longer meets the gate"})
            raise FailedPrecondition(f"{agent} no longer meets the gate: "
                                     + "; ".join(f"{c.name}: {c.figure}" for c in unmet))
        # From here on the agent runs a reviewed version: the one in force now (a file
        # edited since it was loaded is unreviewed, not promoted with it).
        copies = self.registry.copies
        try:
            pin = (await asyncio.to_thread(copies.keep, before.source_text)
                   if copies is not None else before.source)
        except OSError as exc:
            raise FailedPrecondition(
                f"the reviewed policy version could not be kept ({exc.strerror}): nothing was "
                "promoted; free space in (or repair) the state directory and approve again"
            ) from None
        after = await asyncio.to_thread(self.registry.restage, agent, stage=pending.to, pin=pin)
        changes = diff(before.policy, after.policy)
        details = {
            "agent": agent, "from": before.stage, "to": pending.to, "owner": pending.owner,
            "reason": pending.reason, "requested_by": dict(pending.requested_by),
            "approvers": sorted(pending.approvers),
            "evidence_tree_size": status.evidence_head.get("tree_size", 0),
            "evidence_head": dict(status.evidence_head),
            "evidence": {c.name: {"met": c.met, "figure": c.figure,
                                  "records": list(c.records[:64])} for c in status.criteria},
            "policy_hash": after.policy.content_hash, "policy_source": pin,
            "diff": [c.line().strip() for c in changes]}
        index = await self.audit.append("stage.promoted", actor=caller.actor(),
                                        details=details)
        self.registry.replace(after, pin)
        self.book.recorded(index, "stage.promoted", caller.actor(), details)
        self.pending.pop(agent, None)
        log.warning("stage.promoted", agent=agent, to=pending.to, owner=pending.owner,
                    approvers=sorted(pending.approvers))


def newly_unreviewed(registry: AgentRegistry, book: StageBook
                     ) -> list[tuple[str, dict[str, Any]]]:
    """The `policy.unreviewed` records due: each pinned agent whose file holds a version not
    yet on record as waiting, with what it would change at the agent's stage."""
    due = []
    for name in registry.names():
        current = registry.get(name)
        known = book.unreviewed.get(name)
        if not current.unreviewed or (known is not None
                                      and known.source == current.file_source):
            continue
        changes = ([c.line().strip() for c in diff(current.policy, current.file_policy)]
                   if current.file_policy is not None else [])
        due.append((name, {
            "agent": name, "stage": current.stage, "policy_file": current.policy_file,
            "source": current.file_source, "accepted": current.source, "diff": changes,
            "cannot_run": current.file_problem,
            "reason": "a promoted agent's policy changes only when an approver accepts it "
                      "(agentctl policy accept); until then the accepted version runs"}))
        log.warning("policy.unreviewed", agent=name, source=current.file_source,
                    accepted=current.source, file=current.policy_file)
    return due


def open_stages(config: Config, audit: AuditLog, audit_dir: Path,
                system: Mapping[str, Any]) -> tuple[AgentRegistry, StageKeeper]:
    """At start-up: the stage history, pending promotions and pinned policy versions from the
    log; an agent without a history starts at its config stage (`stage.set`); then every
    agent is loaded at the stage its history says (a config that says otherwise is reported,
    not obeyed), running its pinned version, so that an unreviewed file can never decide a
    start; a file that differs from the pin is recorded as unreviewed."""
    config_stages = {name: section.stage for name, section in config.agents.items()}
    book = StageBook.from_records(_stage_records(audit_dir, audit.size))
    copies = PolicyCopies(config.daemon.state_dir / "policies")
    stages: dict[str, str] = {}
    for name in sorted(config.agents):
        configured = config_stages[name]
        current = book.stage(name)
        if current is None:
            details = {"agent": name, "stage": configured,
                       "reason": "no stage history yet: the config names its starting stage"}
            index = audit.append_sync("stage.set", actor=system, details=details)
            book.recorded(index, "stage.set", system, details)
            current = configured
        elif book.started(name) != configured:
            log.warning("stage.config_mismatch", agent=name, config_stage=configured,
                        stage=current, reason="stages change only through gates; the config's "
                        "stage is ignored (agentctl stage status)")
        if name not in book.pins and any(c.event == "stage.promoted"
                                         for c in book.history.get(name, ())):
            _pin_found_version(config, copies, audit, book, name, system)
        stages[name] = current
    registry = AgentRegistry.load(config, stages,
                                  {n: p for n, p in book.pins.items() if n in stages})
    for _, details in newly_unreviewed(registry, book):
        index = audit.append_sync("policy.unreviewed", actor=system, details=details)
        book.recorded(index, "policy.unreviewed", system, details)
    return registry, StageKeeper(book, registry, audit, config_stages, system)


def _pin_found_version(config: Config, copies: PolicyCopies, audit: AuditLog, book: StageBook,
                       name: str, system: Mapping[str, Any]) -> None:
    """An agent promoted by a daemon older than pinned versions: its promotion named none,
    and the bytes it was promoted with are gone. The file as found at this start is pinned,
    on record (`policy.pinned`), with no approver (it ran unpinned until now, so nothing
    becomes looser), and every later change waits for review like any other."""
    path = config.daemon.policy_dir / config.agents[name].policy
    source = copies.keep(read_source(path))
    details = {"agent": name, "stage": book.stage(name), "source": source,
               "policy_file": str(path),
               "reason": "promoted before policy versions were pinned: the file as found at "
                         "this start is pinned; later changes wait for an approver"}
    index = audit.append_sync("policy.pinned", actor=system, details=details)
    book.recorded(index, "policy.pinned", system, details)
    log.warning("policy.pinned", agent=name, source=source, file=str(path))


def _stage_records(directory: Path, size: int) -> Iterable[dict[str, Any]]:
    """The KEPT records among the first `size` (a cheap text test before parsing)."""
    for rec in read_records(directory, limit=size,
                            containing=(b'"event":"stage.', b'"event":"policy.')):
        if rec.get("event") in KEPT:
            yield rec


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"

