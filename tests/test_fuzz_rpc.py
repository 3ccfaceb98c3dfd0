"""Fuzzing every RPC of a real daemon with generated protobuf requests.

For each method of `agentd.v1.Agentd` and `agentd.v1.AuditService`, hypothesis builds
requests from the message descriptors (every field, repeated and map fields included), biased
towards what reaches deep code: run ids of real runs, registered agent names, executables the
policy allows, small step numbers, NUL bytes, surrogates, huge and non-finite numbers.

Properties:
- the status is never INTERNAL or UNKNOWN (a bug; the daemon's message carries an incident id);
- a refused call has no effect: the runs (id, state, step) are the same before and after;
- after the fuzz the daemon still serves, and its audit log verifies from the files alone.

Bounded: AGENTD_FUZZ_EXAMPLES examples per RPC (default 25), derandomized; the daemon is this
module's own (random CloseRun and Rollback calls must not touch other tests' runs).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.api.gen.v1 import agentd_pb2_grpc, audit_pb2, audit_pb2_grpc
from agentd.audit.verify import verify
from tests.conftest import DaemonHandle, daemon_base, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

EXAMPLES = int(os.environ.get("AGENTD_FUZZ_EXAMPLES", "25"))
# AGENTD_FUZZ_RANDOM=1 searches new inputs instead of the fixed, repeatable ones.
RANDOM = os.environ.get("AGENTD_FUZZ_RANDOM")
FUZZ = settings(max_examples=EXAMPLES, derandomize=RANDOM is None, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT = 60.0

# Filled by the fixture: the ids of real runs, so requests reach past the lookup.
KNOWN_RUNS: list[str] = []
EXECUTABLES = ["/bin/true", "/bin/echo", "/bin/sh", "/usr/bin/env", "/usr/bin/rm", "sh", ""]

# proto3 strings are UTF-8: a surrogate cannot even be put in a message, so none is made.
utf8 = st.text(st.characters(codec="utf-8"), max_size=40)
awkward_text = st.one_of(
    utf8,
    st.sampled_from(["", "\0", "a\0b", "..", "/", "/workspace", "../../etc",
                     "x" * 300, "r-", "r-000000000000", "t", "-", " ", "\n"]))
numbers = st.one_of(st.integers(0, 5), st.integers(0, (1 << 32) - 1), st.just((1 << 32) - 1))


def _text_for(name: str) -> st.SearchStrategy[str]:
    if name in ("run_id",):
        return st.one_of(st.sampled_from(KNOWN_RUNS) if KNOWN_RUNS else awkward_text,
                         awkward_text)
    if name == "agent":
        return st.one_of(st.sampled_from(["integration", "shell-helper", "nope"]),
                         awkward_text)
    if name == "reducer":
        return st.one_of(st.sampled_from(["last_value", "append", "topic", "barrier"]),
                         awkward_text)
    if name == "name":
        return st.one_of(st.sampled_from(["a", "b", "x", "y", "lv", "notes"]), awkward_text)
    return awkward_text


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if field.name == "argv":
            return st.one_of(st.sampled_from(EXECUTABLES), awkward_text)
        return _text_for(field.name)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\0" * 70000))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True,
                                                    width=32 if kind == 2 else 64))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(-5, 100))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return numbers
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(numbers, st.just((1 << 64) - 1))
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
                FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(1 << 31), (1 << 31) - 1)
    return st.integers(-(1 << 63), (1 << 63) - 1)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for the message `descriptor` describes; each field maybe left out."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], \
                field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
            continue
        if field.message_type is not None:
            if depth > 2:
                continue
            inner = messages(field.message_type, depth + 1).map(
                lambda kw, t=field.message_type._concrete_class: t(**kw))
        else:
            inner = _scalar(field)
        if field.is_repeated:
            fields[field.name] = st.lists(inner, max_size=4)
        else:
            fields[field.name] = inner
    return st.fixed_dictionaries({}, optional=fields)


def runs_state(stub: agentd_pb2_grpc.AgentdStub) -> list[tuple[str, int, int]]:
    listing = stub.ListRuns(pb.ListRunsRequest(include_closed=True), timeout=CALL_TIMEOUT)
    return sorted((r.run_id, r.state, r.step) for r in listing.runs)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonHandle]:
    base = daemon_base()
    handle = start_daemon(base)
    stub = handle.stub("admin")
    for _ in range(2):
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration", channels=[
            pb.ChannelDecl(name="lv", reducer="last_value"),
            pb.ChannelDecl(name="notes", reducer="append")]), timeout=CALL_TIMEOUT)
        stub.Step(pb.StepRequest(run_id=run.run_id, tasks=[pb.TaskSpec(
            name="a", argv=["/bin/sh", "-c", "echo hi > f"])]), timeout=CALL_TIMEOUT)
        KNOWN_RUNS.append(run.run_id)
    yield handle
    KNOWN_RUNS.clear()
    stop_daemon(handle)
    shutil.rmtree(base, ignore_errors=True)


def _methods(service: Any, module: Any) -> list[tuple[str, str, Any, bool]]:
    """(service, method, request class, server-streaming) for each method of the service."""
    found = []
    for method in service.methods:
        request = getattr(module, method.input_type.name)
        found.append((service.name, method.name, request, method.server_streaming))
    return found


METHODS = (_methods(pb.DESCRIPTOR.services_by_name["Agentd"], pb)
           + _methods(audit_pb2.DESCRIPTOR.services_by_name["AuditService"], audit_pb2))


def _call(handle: DaemonHandle, service: str, method: str, request: Message,
          streaming: bool) -> grpc.RpcError | None:
    channel = handle.channel("admin")
    stub: Any = (agentd_pb2_grpc.AgentdStub(channel) if service == "Agentd"
                 else audit_pb2_grpc.AuditServiceStub(channel))
    call: Callable[..., Any] = getattr(stub, method)
    follow = getattr(request, "follow", False)
    try:
        if streaming:
            stream = call(request, timeout=2.0 if follow else CALL_TIMEOUT)
            for count, _ in enumerate(stream):
                if count >= 200:
                    stream.cancel()
                    break
        else:
            call(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        if follow and error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                       grpc.StatusCode.CANCELLED):
            return None
        return error
    finally:
        channel.close()
    return None


@pytest.mark.parametrize(("service", "method", "request_type", "streaming"), METHODS,
                         ids=[f"{s}.{m}" for s, m, _, _ in METHODS])
class TestFuzzRpc:
    def test_no_internal_and_no_effect_when_refused(
            self, fuzz_daemon: DaemonHandle, service: str, method: str,
            request_type: type[Message], streaming: bool) -> None:
        """Generated requests never get INTERNAL/UNKNOWN; a refused one changes no run."""
        stub = fuzz_daemon.stub("admin")

        @FUZZ
        @given(fields=messages(request_type.DESCRIPTOR))
        def one(fields: dict[str, Any]) -> None:
            try:
                request = request_type(**fields)
            except (ValueError, TypeError):
                return  # not a message protobuf can hold (a client cannot send it either)
            before = runs_state(stub)
            error = _call(fuzz_daemon, service, method, request, streaming)
            if error is None:
                return
            assert error.code() not in BAD, (method, request, error.details())
            if method != "Exec":  # a refused Exec still counts as an exec attempt
                assert runs_state(stub) == before, (method, request, error.details())

        one()


class TestAfterFuzz:
    def test_daemon_still_serves_and_audit_log_verifies(
            self, fuzz_daemon: DaemonHandle) -> None:
        """Runs after everything above: a step still commits and the log checks out."""
        stub = fuzz_daemon.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="integration"), timeout=CALL_TIMEOUT)
        reply = stub.Step(pb.StepRequest(run_id=run.run_id, tasks=[pb.TaskSpec(
            name="a", argv=["/bin/true"])]), timeout=CALL_TIMEOUT)
        assert reply.state == pb.STEP_STATE_COMMITTED, reply.reason
        head = audit_pb2_grpc.AuditServiceStub(fuzz_daemon.channel()).GetTreeHead(
            audit_pb2.GetTreeHeadRequest(), timeout=CALL_TIMEOUT)
        assert head.tree_size > 0
        report = verify(fuzz_daemon.base / "state" / "audit")
        assert report.ok, [str(p) for p in report.problems]
        assert not math.isnan(reply.wall_seconds)
