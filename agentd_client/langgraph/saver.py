"""A LangGraph checkpoint saver that keeps the agentd workspace with the graph's state.

Every LangGraph checkpoint of a thread's root graph gets two metadata keys: `agentd_run_id`
and `agentd_step`, the agentd run and checkpoint that belong to that state. A step taken from
a LangGraph checkpoint runs on exactly that workspace, so resuming or forking from an old
checkpoint (time travel) restores files as well as state.

Rollback or fork, when a step starts from a checkpoint whose agentd step is no longer the
run's head:

- rollback (`Rollback(run, step)`) keeps one run id per thread, but destroys the later agentd
  checkpoints, while LangGraph keeps the later checkpoints of its history. Those would then
  name steps that no longer exist, or worse, numbers that the next steps reuse with other
  contents: travelling back to the "future" would restore the wrong files;
- fork (`Fork(run, step)`, O(1) in the workspace's size) keeps every branch: the old one stays
  on its run, the new one continues on a new run that shares checkpoints 0..step. Every
  LangGraph checkpoint's (run, step) stays valid for as long as its run is open.

LangGraph's time travel never destroys history, so neither does this: it forks. The cost is a
run id per branch; the thread's current run is whatever its latest checkpoint names, and the
tools find it through this saver (`workspace`), never as a fixed id.

When the restore happens: lazily, at the first step taken from the old checkpoint, not when it
is loaded. `get_tuple` is also how `get_state` and `update_state` read, and reading must not
move anything; what matters is that every step runs on the workspace of the checkpoint it
comes from, and that one is checked then.

How a checkpoint learns its position: LangGraph saves checkpoints in the background, so the
run's head at `put` time may already include the next superstep's steps. Instead, a step
reports where it left the run, keyed by the checkpoint its superstep started from (a task's
`checkpoint_map`); the `put` whose parent is that checkpoint records it, and a checkpoint
without steps inherits its parent's position.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
)

from agentd_client.sync import Client

RUN_KEY = "agentd_run_id"
"""In checkpoint metadata: the agentd run of the checkpoint; in `configurable`: the run to
use for a thread that has none yet (or, without this saver, the run to use)."""
STEP_KEY = "agentd_step"
"""In checkpoint metadata: the agentd checkpoint (step) of the run that goes with it."""
# Where LangGraph hands a node its checkpointer (langgraph._internal._constants); read, not
# imported, so that a rename shows up as "no saver found" rather than an import error.
CHECKPOINTER_KEY = "__pregel_checkpointer"
#: How many checkpoints' positions are kept in memory (older ones are read from the saver).
REMEMBERED = 4096


@dataclass(frozen=True)
class Position:
    """An agentd run and one of its checkpoints."""

    run_id: str
    step: int


def recorded(metadata: Mapping[str, Any] | None) -> Position | None:
    """The position a checkpoint's metadata names, if it names one."""
    if not metadata or RUN_KEY not in metadata or STEP_KEY not in metadata:
        return None
    return Position(str(metadata[RUN_KEY]), int(metadata[STEP_KEY]))


def saver_of(config: RunnableConfig) -> AgentdCheckpointSaver | None:
    """The graph's AgentdCheckpointSaver, when the node runs under one."""
    found = config.get("configurable", {}).get(CHECKPOINTER_KEY)
    return found if isinstance(found, AgentdCheckpointSaver) else None


def workspace_of(config: RunnableConfig, run_id: str | None, owner: str
                 ) -> tuple[Position, int | None]:
    """Where a call runs, and the head it expects: the saver's workspace for this checkpoint,
    else the run `configurable[RUN_KEY]` or `owner`'s own `run_id` names (no expected head)."""
    saver = saver_of(config)
    if saver is not None:
        return saver.workspace(config)
    run = config.get("configurable", {}).get(RUN_KEY) or run_id
    if not run:
        raise ValueError(f"no agentd run: give {owner} a run_id, the config "
                         f"configurable[{RUN_KEY!r}], or the graph an AgentdCheckpointSaver")
    return Position(str(run), -1), None


async def aworkspace_of(config: RunnableConfig, run_id: str | None, owner: str
                        ) -> tuple[Position, int | None]:
    """As `workspace_of`, asking the saver asynchronously."""
    saver = saver_of(config)
    if saver is not None:
        return await saver.aworkspace(config)
    return workspace_of(config, run_id, owner)


def note_moved(config: RunnableConfig, position: Position) -> None:
    """Tells the graph's saver (if any) where a call left the run."""
    saver = saver_of(config)
    if saver is not None:
        saver.moved(config, position)


def origin(config: RunnableConfig) -> str | None:
    """The root checkpoint a task's superstep started from."""
    configurable = config.get("configurable", {})
    return configurable.get("checkpoint_map", {}).get("") or configurable.get("checkpoint_id")


class AgentdCheckpointSaver(BaseCheckpointSaver[Any]):
    """Wraps any saver (`inner` stores everything); adds the agentd position to each root
    checkpoint's metadata and forks the workspace when a step starts from an old checkpoint.

    `agent` names the agentd agent whose run a new thread gets (else the thread's
    `configurable["agentd_run_id"]` must name one). `wait_stored` bounds how long a step
    waits for its checkpoint to be stored (LangGraph stores them in the background); a graph
    run with `durability="exit"` stores none before the end and is not supported.
    """

    def __init__(self, inner: BaseCheckpointSaver[Any], client: Client, *,
                 agent: str | None = None, wait_stored: float = 60.0) -> None:
        super().__init__(serde=inner.serde)
        self.inner = inner
        self.client = client
        self.agent = agent
        self.wait_stored = wait_stored
        self._changed = threading.Condition()
        # checkpoint id -> its position (None: stored without one, a thread with no run yet)
        self._stored: OrderedDict[str, Position | None] = OrderedDict()
        # checkpoint id -> where the steps of the superstep started from it left the run
        self._branches: OrderedDict[str, Position] = OrderedDict()

    # -- what the tools and the tool node call ----------------------------------------------

    def workspace(self, config: RunnableConfig) -> tuple[Position, int | None]:
        """The run a step of this task runs on, and the step to expect as its head (None for
        a parallel branch of the same superstep: it queues behind its sibling). Forks the
        run when the checkpoint's step is no longer its head (see the module docstring)."""
        start = origin(config)
        if start is None:
            raise ValueError("an agentd tool ran outside a LangGraph task with a checkpoint")
        with self._changed:
            branch = self._branches.get(start)
            if branch is not None:
                return branch, None
            branch = self._branch(config, self._position_of(config, start))
            _remember(self._branches, start, branch)
            return branch, branch.step

    async def aworkspace(self, config: RunnableConfig) -> tuple[Position, int | None]:
        return await asyncio.to_thread(self.workspace, config)

    def moved(self, config: RunnableConfig, position: Position) -> None:
        """A step of this task ended with the run at `position`."""
        start = origin(config)
        if start is None:
            return
        with self._changed:
            known = self._branches.get(start)
            if known is None or known.run_id != position.run_id or known.step < position.step:
                _remember(self._branches, start, position)

    def _position_of(self, config: RunnableConfig, checkpoint_id: str) -> Position | None:
        """The position recorded with a checkpoint, waiting (bounded) for a checkpoint that
        LangGraph is still storing in the background. Called with the lock held."""
        deadline = time.monotonic() + self.wait_stored
        while checkpoint_id not in self._stored:
            stored = self.inner.get_tuple(_at(config, checkpoint_id))
            if stored is not None:
                return recorded(stored.metadata)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"LangGraph checkpoint {checkpoint_id} was not stored within "
                                   f"{self.wait_stored} s (durability='exit' is not supported)")
            self._changed.wait(min(left, 0.5))
        return self._stored[checkpoint_id]

    def _branch(self, config: RunnableConfig, at: Position | None) -> Position:
        """The run to continue on from a checkpoint at `at`: its own run while the step is
        still the head, else a fork of it at the step; a new run for a new thread."""
        configurable = config.get("configurable", {})
        thread = str(configurable.get("thread_id", ""))
        if at is None:
            if configurable.get(RUN_KEY):
                run = str(configurable[RUN_KEY])
                return Position(run, self.client.head(run))
            if not self.agent:
                raise ValueError(f"thread {thread!r} has no agentd run: give the saver an agent "
                                 f"or the thread's config configurable[{RUN_KEY!r}]")
            return Position(self.client.create_run(self.agent, label=f"langgraph {thread}"), 0)
        if self.client.head(at.run_id) == at.step:
            return at
        fork = self.client.fork(at.run_id, at.step,
                                label=f"langgraph {thread}: from {at.run_id}@{at.step}")
        return Position(fork, at.step)

    # -- recording ---------------------------------------------------------------------------

    def _after(self, config: RunnableConfig) -> tuple[bool, Position | None]:
        """Whether `config` is a root checkpoint's, and the position its new checkpoint gets,
        if known without asking the inner saver: what its parent's superstep left."""
        configurable = config.get("configurable", {})
        if configurable.get("checkpoint_ns", ""):
            return False, None
        parent = configurable.get("checkpoint_id")
        with self._changed:
            if parent is None:
                return True, None
            if parent in self._branches:
                return True, self._branches.pop(parent)
            return True, self._stored.get(parent)

    def _needs_parent(self, config: RunnableConfig) -> bool:
        parent = config.get("configurable", {}).get("checkpoint_id")
        with self._changed:
            return parent is not None and parent not in self._stored

    def _record(self, checkpoint_id: str, position: Position | None) -> None:
        with self._changed:
            _remember(self._stored, checkpoint_id, position)
            self._changed.notify_all()

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        root, position = self._after(config)
        if root and position is None and self._needs_parent(config):
            parent = self.inner.get_tuple(config)
            position = recorded(parent.metadata) if parent else None
        stored = self.inner.put(config, checkpoint, _with(metadata, position), new_versions)
        if root:
            self._record(checkpoint["id"], position)
        return stored

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        root, position = self._after(config)
        if root and position is None and self._needs_parent(config):
            parent = await self.inner.aget_tuple(config)
            position = recorded(parent.metadata) if parent else None
        stored = await self.inner.aput(config, checkpoint, _with(metadata, position),
                                       new_versions)
        if root:
            self._record(checkpoint["id"], position)
        return stored

    # -- the rest is the inner saver's --------------------------------------------------------

    @property
    def config_specs(self) -> list[Any]:
        return self.inner.config_specs

    def with_allowlist(self, extra_allowlist: Collection[tuple[str, ...]]
                       ) -> AgentdCheckpointSaver:
        """The same saver (positions shared) over the inner saver's stricter clone."""
        clone = copy.copy(self)
        clone.inner = self.inner.with_allowlist(extra_allowlist)
        clone.serde = clone.inner.serde
        return clone

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self.inner.get_next_version(current, channel)

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self.inner.get_tuple(config)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        return self.inner.list(config, filter=filter, before=before, limit=limit)

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        self.inner.put_writes(config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        self.inner.delete_thread(thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self.inner.delete_for_runs(run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self.inner.copy_thread(source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self.inner.prune(thread_ids, strategy=strategy)

    def get_delta_channel_history(self, *, config: RunnableConfig, channels: Sequence[str]
                                  ) -> Mapping[str, DeltaChannelHistory]:
        return self.inner.get_delta_channel_history(config=config, channels=channels)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self.inner.aget_tuple(config)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None, before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        async for item in self.inner.alist(config, filter=filter, before=before, limit=limit):
            yield item

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await self.inner.aput_writes(config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self.inner.adelete_thread(thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self.inner.adelete_for_runs(run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self.inner.acopy_thread(source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest"
                     ) -> None:
        await self.inner.aprune(thread_ids, strategy=strategy)

    async def aget_delta_channel_history(self, *, config: RunnableConfig,
                                         channels: Sequence[str]
                                         ) -> Mapping[str, DeltaChannelHistory]:
        return await self.inner.aget_delta_channel_history(config=config, channels=channels)


def _at(config: RunnableConfig, checkpoint_id: str) -> RunnableConfig:
    configurable = config.get("configurable", {})
    return {"configurable": {"thread_id": configurable.get("thread_id"), "checkpoint_ns": "",
                             "checkpoint_id": checkpoint_id}}


def _with(metadata: CheckpointMetadata, position: Position | None) -> CheckpointMetadata:
    if position is None:
        return metadata
    added: dict[str, Any] = {**metadata, RUN_KEY: position.run_id, STEP_KEY: position.step}
    return added  # type: ignore[return-value]  # CheckpointMetadata is open (total=False)


def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMEMBERED:
        table.popitem(last=False)
