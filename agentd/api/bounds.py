"""Bounds on every field of every request, checked in one place before any handler runs.

A request is walked by its protobuf descriptor, so a field added to the proto is bounded the
day it is added: strings by `STRING_DEFAULT` characters, bytes by `BYTES_DEFAULT`, repeated
fields and maps by `COUNT_DEFAULT` entries, unless `LIMITS` names the field. A field past its
bound is INVALID_ARGUMENT naming the field and the bound, before anything else happens: no
run is forked with a 4,000,000-character label.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from agentd.api.limits import MAX_MESSAGE_BYTES, REPLY_HEADROOM
from agentd.errors import InvalidArgument

STRING_DEFAULT: Final = 4096
BYTES_DEFAULT: Final = 16 << 20
COUNT_DEFAULT: Final = 1024

# Full field name -> (most characters or bytes per value, most entries); None: the default.
LIMITS: Final[dict[str, tuple[int | None, int | None]]] = {
    "agentd.v1.CreateRunRequest.label": (200, None),
    "agentd.v1.ForkRequest.label": (200, None),
    "agentd.v1.ApproveRequest.reason": (2000, None),
    "agentd.v1.ResolveStepRequest.reason": (2000, None),
    "agentd.v1.PromoteStageRequest.reason": (2000, None),
    "agentd.v1.ApproveStageRequest.reason": (2000, None),
    "agentd.v1.PromoteStageRequest.owner": (200, None),
    "agentd.v1.ExecRequest.argv": (1 << 20, 4096),
    "agentd.v1.TaskSpec.argv": (1 << 20, 4096),
    "agentd.v1.ExecRequest.env": (32 << 10, 256),
    "agentd.v1.TaskSpec.env": (32 << 10, 256),
    "agentd.v1.StepRequest.tasks": (None, 64),
    "agentd.v1.CreateRunRequest.channels": (None, 256),
    "agentd.v1.ChannelDecl.barrier_tasks": (64, 64),
    # stdin: the scheduler's own check (16 MiB) answers first, with what to do instead.
    "agentd.v1.ExecRequest.stdin": (32 << 20, None),
    "agentd.v1.TaskSpec.stdin": (32 << 20, None),
    # One file per message: what a reply can carry back (agentd/scheduler/files.py).
    "agentd.v1.WriteFileRequest.data": (MAX_MESSAGE_BYTES - REPLY_HEADROOM, None),
    # A graph file and its inputs: the graph loop's own checks (1 MiB each) say what to do.
    "agentd.v1.RunGraphRequest.graph": (2 << 20, None),
    "agentd.v1.RunGraphRequest.source": (1000, None),
    "agentd.v1.RunGraphRequest.inputs": (2 << 20, 256),
}
# Identifiers: run ids, agent and channel names, task names.
for _name in ("GetRunRequest.run_id", "CloseRunRequest.run_id", "ExecRequest.run_id",
              "StepRequest.run_id", "ApproveRequest.run_id", "ResolveStepRequest.run_id",
              "ListStepsRequest.run_id",
              "ListCheckpointsRequest.run_id", "RollbackRequest.run_id", "ForkRequest.run_id",
              "ExportCheckpointRequest.run_id", "ReadFileRequest.run_id",
              "WriteFileRequest.run_id", "RunGraphRequest.run_id", "CreateRunRequest.agent",
              "ListRunsRequest.agent", "ChannelDecl.name", "ChannelDecl.reducer",
              "TaskSpec.name", "GetStageRequest.agent", "PromoteStageRequest.agent",
              "PromoteStageRequest.to", "ApproveStageRequest.agent"):
    LIMITS[f"agentd.v1.{_name}"] = (128, None)


def check(request: Message, *, where: str = "") -> None:
    """Raises InvalidArgument for the first field of `request` past its bound."""
    for field, value in request.ListFields():
        name = f"{where}{field.name}"
        most, count = LIMITS.get(field.full_name, (None, None))
        if _is_map(field):
            _count(name, len(value), count or COUNT_DEFAULT)
            assert field.message_type is not None  # a map is a repeated entry message
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                _size(f"{name}[{str(key)[:40]!r}] key", key, 256)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    check(item, where=f"{name}[{str(key)[:40]!r}].")
                else:
                    _size(f"{name}[{str(key)[:40]!r}]", item, most or STRING_DEFAULT)
        elif field.is_repeated:
            _count(name, len(value), count or COUNT_DEFAULT)
            for index, item in enumerate(value):
                _one(field, f"{name}[{index}]", item, most)
        else:
            _one(field, name, value, most)


def _one(field: FieldDescriptor, name: str, value: Any, most: int | None) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        check(value, where=name + ".")
    elif field.type == FieldDescriptor.TYPE_STRING:
        _size(name, value, most or STRING_DEFAULT)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        _size(name, value, most or BYTES_DEFAULT)


def _is_map(field: FieldDescriptor) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None
            and field.message_type.GetOptions().map_entry)


def _size(name: str, value: str | bytes, most: int) -> None:
    if len(value) > most:
        unit = "bytes" if isinstance(value, bytes) else "characters"
        raise InvalidArgument(f"{name} is {len(value)} {unit} long; at most {most} are "
                              "accepted: shorten it")


def _count(name: str, count: int, most: int) -> None:
    if count > most:
        raise InvalidArgument(f"{name} has {count} entries; at most {most} are accepted")
