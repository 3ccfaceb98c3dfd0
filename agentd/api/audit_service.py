"""The gRPC face of the audit log: `agentd.v1.AuditService`, read-only.

A thin adapter in the containerd manner: each method looks up, calls `AuditLog`, converts to
protobuf. Errors are `agentd.errors` exceptions raised by the log (InvalidArgument for an
index or size beyond the log); the interceptor turns them into statuses. Anything that reads
files runs in a worker thread so that the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agentd.api.gen.v1 import audit_pb2 as pb
from agentd.api.gen.v1 import audit_pb2_grpc as pb_grpc
from agentd.audit import AuditLog, TreeHead, canonical
from agentd.audit.record import parse_time
from agentd.errors import InvalidArgument

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_SLICE = 512


def _timestamp(text: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(parse_time(text))
    return stamp


def record_to_proto(rec: dict[str, Any]) -> pb.AuditRecord:
    """A record dict (as `AuditLog.read` gives it) as an AuditRecord, its exact bytes included."""
    return pb.AuditRecord(
        index=rec["index"], time=_timestamp(rec["time"]), event=rec["event"],
        run_id=rec["run_id"] or "", task_id=rec["task_id"] or "",
        actor_json=canonical(rec["actor"]).decode(),
        details_json=canonical(rec["details"]).decode(), record=canonical(rec))


def head_to_proto(head: TreeHead, key_id: str) -> pb.SignedTreeHead:
    return pb.SignedTreeHead(
        tree_size=head.tree_size, root_hash=head.root_hash, timestamp=_timestamp(head.timestamp),
        signature=head.signature, signed_data=head.signed_data(), key_id=key_id)


def _matches(rec: dict[str, Any], run_id: str, event: str) -> bool:
    return (not run_id or rec["run_id"] == run_id) and (not event or rec["event"] == event)


class AuditServicer(pb_grpc.AuditServiceServicer):
    """AuditService over one `AuditLog`."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def GetTreeHead(self, request: pb.GetTreeHeadRequest,
                          context: Context) -> pb.SignedTreeHead:
        head = await asyncio.to_thread(self._log.tree_head)
        return head_to_proto(head, self._log.key_id)

    async def GetInclusionProof(self, request: pb.GetInclusionProofRequest,
                                context: Context) -> pb.InclusionProof:
        size = request.tree_size or self._log.size
        index = request.leaf_index
        path = await asyncio.to_thread(self._log.inclusion_proof, index, size)
        records = await asyncio.to_thread(self._read, index, index + 1)
        return pb.InclusionProof(leaf_index=index, tree_size=size, inclusion_path=path,
                                 leaf_hash=self._log.leaf_hash(index),
                                 record=record_to_proto(records[0]))

    async def GetConsistencyProof(self, request: pb.GetConsistencyProofRequest,
                                  context: Context) -> pb.ConsistencyProof:
        first, second = request.first_tree_size, request.second_tree_size or self._log.size
        path = await asyncio.to_thread(self._log.consistency_proof, first, second)
        return pb.ConsistencyProof(first_tree_size=first, second_tree_size=second,
                                   consistency_path=path)

    async def Tail(self, request: pb.TailRequest,
                   context: Context) -> AsyncIterator[pb.AuditRecord]:
        size = self._log.size
        start = max(0, size - request.last) if request.last else request.from_index
        run_id, event = request.run_id, request.event
        if request.follow:
            async for rec in self._log.follow(start):
                if _matches(rec, run_id, event):
                    yield record_to_proto(rec)
            return
        while start < size:
            stop = min(size, start + _SLICE)
            batch = await asyncio.to_thread(self._read, start, stop)
            for rec in batch:
                if _matches(rec, run_id, event):
                    yield record_to_proto(rec)
            start = stop

    def _read(self, start: int, stop: int) -> list[dict[str, Any]]:
        return list(self._log.read(start, stop))

    async def Query(self, request: pb.QueryRequest, context: Context) -> pb.QueryResponse:
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        since = _time(request.since, "since") if request.HasField("since") else None
        until = _time(request.until, "until") if request.HasField("until") else None
        found = await asyncio.to_thread(
            self._log.query, run_id=request.run_id or None, event=request.event or None,
            since=since, until=until, limit=limit, start=request.from_index)
        return pb.QueryResponse(records=[record_to_proto(r) for r in found],
                                more=len(found) >= limit)


def _time(stamp: Timestamp, name: str) -> datetime:
    """A request's timestamp; INVALID_ARGUMENT for one that is not a valid time."""
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"{name} is not a valid timestamp (seconds {stamp.seconds}, nanos {stamp.nanos});"
            " use seconds since 1970 within years 1-9999 and nanos in 0..999999999") from None

