"""Export of a checkpoint: sparse files stay sparse, and the archive has a size cap.

The layer is made the way a task makes it (a write in its overlay mount, then commit); the
archive is checked by GNU tar extracting it (`tar --sparse -x`), and by Python's tarfile.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.errors import ResourceExhausted
from agentd.store.layers import LayerStore
from tests.conftest import CONFIG, REPO, daemon_base, start_daemon, stop_daemon
from tests.test_layers import WORKER, lower_paths
from tests.test_overlay import base as base  # noqa: PLC0414 - the fixture, shared
from tests.test_overlay import mounted

pytestmark = pytest.mark.privileged

GiB = 1 << 30
# 4 GiB apparent size, three small runs of data: at the start, in the middle, at the end.
SPARSE = """
truncate -s 4G big
printf head | dd of=big conv=notrunc status=none
printf middle | dd of=big bs=1 seek=2147483648 conv=notrunc status=none
printf tail | dd of=big bs=1 seek=4294967292 conv=notrunc status=none
truncate -s 1G holes-only
truncate -s 20M mixed
head -c 3000000 /dev/urandom | dd of=mixed bs=1M seek=5 conv=notrunc status=none
echo plain > plain.txt
"""


def layer_from(base: Path, script: str) -> tuple[LayerStore, list[str]]:
    """[base, the layer `script` made as a task in its overlay mount]."""
    store = LayerStore(base / "store")
    stack = [store.create_base(WORKER, WORKER)]
    upper = store.new_upper("t-export", WORKER, WORKER)
    with mounted(base, lower_paths(store, stack), upper.upper, upper.work) as m:
        m.sh(script, uid=WORKER)
    layer = store.commit([upper.upper], lowers=stack)
    assert layer is not None
    return store, [*stack, layer]


@pytest.fixture
def sparse_stack(base: Path) -> tuple[LayerStore, list[str]]:
    return layer_from(base, SPARSE)


def export(store: LayerStore, stack: list[str], **kwargs: int) -> bytes:
    buffer = io.BytesIO()
    store.export_tar(stack, buffer, **kwargs)
    return buffer.getvalue()


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class TestSparseExport:
    def test_a_4_gib_sparse_file_exports_small_and_extracts_whole(
            self, sparse_stack: tuple[LayerStore, list[str]], tmp_path: Path) -> None:
        """GNU tar recreates the same apparent size, the same data, and holes, from a small
        archive."""
        store, stack = sparse_stack
        data = export(store, stack)
        assert len(data) < 4 << 20  # the 3 MB of random data in `mixed`, and headers
        archive = tmp_path / "export.tar"
        archive.write_bytes(data)
        out = tmp_path / "out"
        out.mkdir()
        subprocess.run(["tar", "--sparse", "-xf", str(archive), "-C", str(out)], check=True)
        big = out / "big"
        assert big.stat().st_size == 4 * GiB
        assert big.stat().st_blocks * 512 < 1 << 20  # holes, not 4 GiB of zeros
        assert read_at(big, 0, 4) == b"head"
        assert read_at(big, 2 * GiB, 6) == b"middle"
        assert read_at(big, 4 * GiB - 4, 4) == b"tail"
        assert read_at(big, GiB, 16) == b"\0" * 16
        assert (out / "holes-only").stat().st_size == GiB
        assert (out / "plain.txt").read_text() == "plain\n"
        layer = store.path(stack[-1])
        assert (out / "mixed").read_bytes() == (layer / "mixed").read_bytes()
        assert not (out / "GNUSparseFile.0").exists()

    def test_python_tarfile_reads_the_sparse_members(
            self, sparse_stack: tuple[LayerStore, list[str]]) -> None:
        """Members carry their real names and sizes for tarfile too."""
        store, stack = sparse_stack
        with tarfile.open(fileobj=io.BytesIO(export(store, stack))) as tar:
            sizes = {m.name.removeprefix("./"): m.size for m in tar if m.isfile()}
        assert sizes == {"big": 4 * GiB, "holes-only": GiB, "mixed": 20 << 20, "plain.txt": 6}


class TestExportCap:
    def test_an_export_past_max_bytes_is_resource_exhausted(
            self, base: Path) -> None:
        """A 2 MiB file under a 1 MiB cap stops the export with the reason."""
        store, stack = layer_from(base, "head -c 2097152 /dev/urandom > data")
        with pytest.raises(ResourceExhausted, match="max_export_bytes"):
            export(store, stack, max_bytes=1 << 20)
        assert len(export(store, stack, max_bytes=3 << 20)) > 2 << 20

    def test_only_data_counts_towards_the_cap(
            self, sparse_stack: tuple[LayerStore, list[str]]) -> None:
        """5 GiB of sparse files (3 MB of data) fit a 4 MiB cap."""
        store, stack = sparse_stack
        assert len(export(store, stack, max_bytes=4 << 20)) < 4 << 20


def test_gnu_tar_is_there() -> None:
    """The sparse tests need GNU tar (Debian's `tar`)."""
    assert b"GNU tar" in subprocess.run(["tar", "--version"], capture_output=True,
                                        check=True).stdout
    assert os.path.exists("/usr/bin/tar") or os.path.exists("/bin/tar")


class TestExportCapOverGrpc:
    def test_the_daemon_answers_resource_exhausted_and_agentctl_keeps_no_file(
            self, tmp_path: Path) -> None:
        """max_export_bytes in the config: the stream ends RESOURCE_EXHAUSTED, and
        `agentctl export -o FILE` fails saying so, leaving no partial FILE."""
        base = daemon_base()
        handle = start_daemon(base, CONFIG.replace("[daemon]\n",
                                                   "[daemon]\nmax_export_bytes = 1048576\n"))
        try:
            stub = handle.stub()
            run = stub.CreateRun(pb.CreateRunRequest(agent="integration"))
            reply = stub.Step(pb.StepRequest(run_id=run.run_id, tasks=[pb.TaskSpec(
                name="a", argv=["/bin/sh", "-c", "head -c 2097152 /dev/urandom > data"])]),
                timeout=60)
            assert reply.state == pb.STEP_STATE_COMMITTED, reply.reason
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.ExportCheckpoint(pb.ExportCheckpointRequest(
                        run_id=run.run_id, step=1), timeout=60):
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_export_bytes" in (info.value.details() or "")
            target = tmp_path / "out.tar"
            result = subprocess.run(
                [str(REPO / ".venv" / "bin" / "agentctl"), "--socket", str(handle.socket()),
                 "export", run.run_id, "1", "-o", str(target)],
                capture_output=True, text=True, check=False)
            assert result.returncode != 0
            assert "max_export_bytes" in result.stderr
            assert not target.exists()
        finally:
            stop_daemon(handle)
            shutil.rmtree(base, ignore_errors=True)
