"""Workspace files without a worker: what a framework's "read file" and "write file" tools need
without paying for a confined process each time.

A read names a checkpoint (the head by default) and reads the merged view of its layers, which
are immutable once published: no step, no record (reads change nothing, like `ListSteps`).
A write changes state, so it is what every change is here: the next checkpoint, on record
before it is in force, queued behind a running step, refused on a read-only workspace and held
to the policy's quota, and undone by a rollback (`StepRunner.write_file`).

Paths are the worker's view of the workspace: relative ("src/app.py") or under "/workspace".
Nothing on the way is followed: a symlink an agent made could point anywhere on the host.
"""

from __future__ import annotations

import asyncio
import functools
import posixpath

from agentd.errors import InvalidArgument
from agentd.scheduler.runs import RunManager
from agentd.store.layers import LayerStore
from agentd.store.trees import MAX_PATH_BYTES

# Each level is one lookup through every layer of the stack (and one directory made): a
# deep path must not hold the run's writer slot for seconds.
MAX_DEPTH = 64

WORKSPACE = "/workspace"


def workspace_path(raw: str) -> str:
    """`raw` as a path relative to the workspace root; InvalidArgument for anything that is
    not a plain path inside it."""
    if not raw or "\x00" in raw:
        raise InvalidArgument("a workspace path is a non-empty relative path, like src/app.py")
    path = raw
    if path == WORKSPACE or path.startswith(WORKSPACE + "/"):
        path = path[len(WORKSPACE):].lstrip("/")
    if path.startswith("/"):
        raise InvalidArgument(f"{raw!r} is outside the workspace; give a path relative to it "
                              f"(or under {WORKSPACE})")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise InvalidArgument(f"{raw!r} names the workspace itself, not a file in it")
    if ".." in parts:
        raise InvalidArgument(f"{raw!r} leaves the workspace ('..' is not allowed)")
    joined = posixpath.join(*parts)
    if any(len(p.encode()) > 255 for p in parts) or len(joined.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{raw[:80]!r}... is longer than a workspace path may be "
                              f"({MAX_PATH_BYTES} bytes, 255 per name)")
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"{raw[:80]!r}... is nested {len(parts)} deep; a file written "
                              f"without a worker is at most {MAX_DEPTH} directories deep")
    return joined


async def read_file(runs: RunManager, layers: LayerStore, run_id: str, raw_path: str,
                    step: int | None, max_bytes: int) -> tuple[bytes, int, int]:
    """(data, mode, checkpoint) of a regular file at `step` (default: the head), of at most
    `max_bytes` (what one reply carries; the API layer knows the message size)."""
    path = workspace_path(raw_path)
    run = runs.get_run(run_id)
    number = run.step if step is None else step
    checkpoint = runs.steps.checkpoint(run_id, number)  # NOT_FOUND for a missing one
    # Held while read: a rollback or squash meanwhile deletes nothing under the reader.
    async with runs.refs.hold(checkpoint.layers):
        data, mode = await asyncio.to_thread(functools.partial(
            layers.read_file, checkpoint.layers, path, max_bytes))
    return data, mode, number
