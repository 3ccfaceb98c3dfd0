"""Deep layer stacks are squashed in the background without changing any checkpoint."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator

import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import CONFIG, DaemonHandle, daemon_base, execute, start_daemon, stop_daemon

SQUASH_DEPTH = 4


@pytest.fixture(scope="module")
def squashing_daemon() -> Iterator[DaemonHandle]:
    config = CONFIG.replace("[daemon]\n", f"[daemon]\nsquash_depth = {SQUASH_DEPTH}\n", 1)
    handle = start_daemon(daemon_base(), config)
    yield handle
    stop_daemon(handle)


def tree_of(stub: object, run_id: str, step: int) -> dict[str, bytes]:
    """The workspace at a checkpoint, from its export: path -> content (b"" for dirs)."""
    data = b"".join(c.data for c in stub.ExportCheckpoint(  # type: ignore[attr-defined]
        pb.ExportCheckpointRequest(run_id=run_id, step=step)))
    tree = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            tree[member.name] = extracted.read() if extracted else b""
    return tree


class TestSquash:
    def test_deep_stack_is_squashed_and_checkpoints_keep_their_content(
            self, squashing_daemon: DaemonHandle) -> None:
        """Once a run's stack reaches squash_depth it becomes one layer, and every checkpoint
        exports exactly what it exported before."""
        stub = squashing_daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="integration")).run_id
        scripts = ["echo one > a; mkdir d; echo x > d/x", "echo two > b; rm a",
                   "rm -r d; echo d > d", "chmod 600 b; ln -s b link", "echo five > e"]
        for script in scripts:
            assert execute(stub, run_id, ["/bin/sh", "-c", script]).outcome.committed
        before = {step: tree_of(stub, run_id, step) for step in range(len(scripts) + 1)}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            layers = {c.step: c.layers for c in stub.ListCheckpoints(
                pb.ListCheckpointsRequest(run_id=run_id)).checkpoints}
            if layers[len(scripts)] < SQUASH_DEPTH:
                break
            time.sleep(0.1)
        assert layers[len(scripts)] < SQUASH_DEPTH, layers
        after = {step: tree_of(stub, run_id, step) for step in range(len(scripts) + 1)}
        assert after == before
        listing = execute(stub, run_id, ["/bin/sh", "-c", "ls -l | cut -c1-10; cat d"]).text
        assert "d\n" in listing
        assert "-rw-------" in listing
        assert "squashed" in squashing_daemon.log()
