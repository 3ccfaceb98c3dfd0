"""AuditService through a real grpc.aio server on a unix socket, and the CLI that reads it.

The server runs in its own thread and event loop (httpx's serve_in_thread), so that the
tests can use ordinary blocking stubs and the CLI's own code path (`args.client().audit`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from agentd.api.audit_service import AuditServicer
from agentd.api.gen.v1 import audit_pb2 as pb
from agentd.api.gen.v1 import audit_pb2_grpc as pb_grpc
from agentd.audit import (
    AuditLog,
    TreeHead,
    load_public_key,
    verify_consistency,
    verify_head,
    verify_inclusion,
)
from agentd.audit.signing import PUB_FILE
from agentd.cli import audit_cmd
from agentd.cli.output import UsageError
from agentd.client import AuditClient
from agentd.errors import AgentdError

ACTOR = {"role": "client", "socket": "/run/agentd/agentd.sock"}


class MapErrors(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """What the daemon's interceptor does for these tests: AgentdError -> its status."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner(request, context)
            except AgentdError as exc:
                await context.abort(grpc.StatusCode[exc.code], exc.message)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class Server:
    """A grpc.aio server with an AuditServicer, in a thread with its own loop."""

    def __init__(self, log: AuditLog, socket: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server = self._call(self._start(log, socket))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self, log: AuditLog, socket: Path) -> grpc.aio.Server:
        server = grpc.aio.server(interceptors=[MapErrors()])
        pb_grpc.add_AuditServiceServicer_to_server(AuditServicer(log), server)
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        return server

    def stop(self) -> None:
        self._call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    audit = AuditLog.open(tmp_path / "audit")
    for i in range(10):
        audit.append_sync("exec.allowed" if i % 2 else "run.created", actor=ACTOR,
                          run_id=f"r-{i % 3}", task_id=f"t-{i}",
                          details={"i": i, "argv": ["/bin/sh", "-c", "echo \x1b[31mred"]})
    yield audit
    audit.close()


@pytest.fixture
def channel(log: AuditLog, tmp_path: Path) -> Iterator[grpc.Channel]:
    socket = tmp_path / "a.sock"
    server = Server(log, socket)
    chan = grpc.insecure_channel(f"unix:{socket}")
    yield chan
    chan.close()
    server.stop()


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.AuditServiceStub:
    return pb_grpc.AuditServiceStub(channel)


def head_of(reply: pb.SignedTreeHead) -> TreeHead:
    timestamp = json.loads(reply.signed_data)["timestamp"]
    return TreeHead(reply.tree_size, reply.root_hash, timestamp, reply.signature)


class TestService:
    def test_tree_head_is_signed_by_the_published_key(self, stub: pb_grpc.AuditServiceStub,
                                                      log: AuditLog) -> None:
        """The head covers every record and its signature verifies with audit.pub."""
        reply = stub.GetTreeHead(pb.GetTreeHeadRequest())
        assert reply.tree_size == 10
        assert reply.key_id == log.key_id
        head = head_of(reply)
        assert head.signed_data() == reply.signed_data
        assert verify_head(load_public_key(log.directory / PUB_FILE), head)

    def test_inclusion_proof_verifies_the_exact_record(self,
                                                       stub: pb_grpc.AuditServiceStub) -> None:
        """The proof, the record bytes and the head's root fit together (RFC 9162)."""
        head = stub.GetTreeHead(pb.GetTreeHeadRequest())
        proof = stub.GetInclusionProof(pb.GetInclusionProofRequest(leaf_index=6))
        assert proof.tree_size == 10
        leaf = hashlib.sha256(b"\x00" + proof.record.record).digest()
        assert leaf == proof.leaf_hash
        assert verify_inclusion(6, 10, leaf, list(proof.inclusion_path), head.root_hash)
        rec = proof.record
        assert (rec.index, rec.event, rec.run_id, rec.task_id) == (6, "run.created", "r-0", "t-6")
        assert json.loads(rec.actor_json) == ACTOR
        assert json.loads(rec.details_json)["i"] == 6

    def test_consistency_between_two_heads(self, stub: pb_grpc.AuditServiceStub,
                                           log: AuditLog) -> None:
        """A head taken before more appends is proved a prefix of the head after them."""
        before = stub.GetTreeHead(pb.GetTreeHeadRequest())
        for _ in range(7):
            log.append_sync("run.closed", actor=ACTOR)
        after = stub.GetTreeHead(pb.GetTreeHeadRequest())
        proof = stub.GetConsistencyProof(pb.GetConsistencyProofRequest(first_tree_size=10))
        assert proof.second_tree_size == 17
        assert verify_consistency(10, 17, before.root_hash, after.root_hash,
                                  list(proof.consistency_path))

    def test_beyond_the_log_is_invalid_argument(self, stub: pb_grpc.AuditServiceStub) -> None:
        """An index past the end is the caller's mistake, said plainly."""
        with pytest.raises(grpc.RpcError) as info:
            stub.GetInclusionProof(pb.GetInclusionProofRequest(leaf_index=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "log has 10 records" in str(info.value.details())

    def test_tail_filters_and_last(self, stub: pb_grpc.AuditServiceStub) -> None:
        """Tail streams from an index or the last N, keeping only matching records."""
        assert [r.index for r in stub.Tail(pb.TailRequest(from_index=7))] == [7, 8, 9]
        assert [r.index for r in stub.Tail(pb.TailRequest(last=2))] == [8, 9]
        got = stub.Tail(pb.TailRequest(run_id="r-1", event="exec.allowed"))
        assert [r.index for r in got] == [1, 7]

    def test_tail_follow_streams_new_records(self, stub: pb_grpc.AuditServiceStub,
                                             log: AuditLog) -> None:
        """With follow, records appended later arrive on the open stream."""
        call = stub.Tail(pb.TailRequest(from_index=9, follow=True, event="run.closed"))
        seen: list[int] = []
        ended: list[grpc.StatusCode] = []

        def consume() -> None:
            try:
                for rec in call:
                    seen.append(rec.index)
            except grpc.RpcError as exc:
                ended.append(exc.code())

        reader = threading.Thread(target=consume)
        reader.start()
        time.sleep(0.1)
        log.append_sync("run.created", actor=ACTOR)
        log.append_sync("run.closed", actor=ACTOR)
        log.append_sync("run.closed", actor=ACTOR)
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        call.cancel()  # type: ignore[no-untyped-call]
        reader.join(5)
        assert seen == [11, 12]
        assert ended == [grpc.StatusCode.CANCELLED]

    def test_query(self, stub: pb_grpc.AuditServiceStub) -> None:
        """Query combines run, event, time range and limit; `more` says there is more."""
        reply = stub.Query(pb.QueryRequest(run_id="r-2"))
        assert [r.index for r in reply.records] == [2, 5, 8]
        assert not reply.more
        reply = stub.Query(pb.QueryRequest(event="exec.allowed", limit=2))
        assert [r.index for r in reply.records] == [1, 3]
        assert reply.more
        request = pb.QueryRequest(from_index=8)
        request.until.GetCurrentTime()
        assert [r.index for r in stub.Query(request).records] == [8, 9]
        request = pb.QueryRequest()
        request.since.GetCurrentTime()
        assert list(stub.Query(request).records) == []


class TestCli:
    def run(self, channel: grpc.Channel, argv: list[str]) -> int:
        parser = argparse.ArgumentParser()
        audit_cmd.register(parser.add_subparsers())
        args = parser.parse_args(["audit", *argv])
        args.client = lambda: SimpleNamespace(audit=AuditClient(channel))
        return int(args.func(args))

    def test_tail_prints_one_safe_line_per_event(self, channel: grpc.Channel,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """Readable lines, with terminal escape sequences from a tool's argv neutralised."""
        assert self.run(channel, ["tail", "-n", "3"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3
        assert out[0].split()[0] == "7"
        assert "exec.allowed" in out[0]
        assert "run=r-1 task=t-7" in out[0]
        assert "by client socket=/run/agentd/agentd.sock" in out[0]
        assert "\x1b" not in "".join(out)
        assert "\\u001b[31mred" in out[0]

    def test_tail_json_is_the_records_as_logged(self, channel: grpc.Channel, log: AuditLog,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints the exact canonical lines, which hash to the tree's leaves."""
        assert self.run(channel, ["tail", "--json", "--run", "r-0", "-n", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["index"] for line in lines] == [6, 9]
        assert [line.encode() for line in lines] == list(log.read_lines(6, 7)) + list(
            log.read_lines(9, 10))

    def test_show_checks_the_inclusion_proof(self, channel: grpc.Channel, log: AuditLog,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        """show prints the record and verifies it is in the signed tree, and the signature
        too when given the key."""
        key = str(log.directory / PUB_FILE)
        assert self.run(channel, ["show", "4", "--key", key]) == 0
        out = capsys.readouterr().out
        assert '"index": 4' in out
        assert "inclusion in tree head of size 10" in out
        assert ": verified" in out
        assert "signature: valid" in out
        assert self.run(channel, ["show", "4", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["inclusion_verified"] is True
        assert shown["record"]["index"] == 4

    def test_query_with_an_age(self, channel: grpc.Channel,
                               capsys: pytest.CaptureFixture[str]) -> None:
        """--since accepts an age like 1h; --until accepts RFC 3339."""
        assert self.run(channel, ["query", "--event", "run.created", "--since", "1h"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 5
        assert self.run(channel, ["query", "--until", "2000-01-01T00:00:00Z"]) == 0
        assert capsys.readouterr().out == ""
        with pytest.raises(UsageError, match="RFC 3339"):
            self.run(channel, ["query", "--since", "yesterday"])

    def test_tail_follow(self, channel: grpc.Channel, log: AuditLog,
                         capsys: pytest.CaptureFixture[str]) -> None:
        """tail -f with a filter prints past matches, then new ones as they come."""
        errors: list[BaseException] = []

        def follow() -> None:
            try:
                self.run(channel, ["tail", "-f", "-n", "1", "--event", "run.closed"])
            except grpc.RpcError as exc:
                errors.append(exc)

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(0.3)
        log.append_sync("run.closed", actor=ACTOR, run_id="r-9")
        deadline = time.monotonic() + 5
        out = ""
        while "r-9" not in out and time.monotonic() < deadline:
            time.sleep(0.02)
            out += capsys.readouterr().out
        channel.close()
        follower.join(5)
        assert "run.closed  run=r-9" in out
        assert len(errors) == 1
