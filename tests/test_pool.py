"""The warm pool (agentd/sandbox/pool.py), for real: prebuilt workers are confined exactly as
cold ones, serve one call each, only of their own shape, and leave nothing behind.

The rest of the suite runs on the session daemon, whose default `warm_pool = 2` serves every
call after a shape's first from a prebuilt worker: the confinement battery, the exec routes
and the hostile trees run on prebuilt workers. Here a cold daemon (`warm_pool = 0`) is the
reference they are compared with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.policy.execset import _library_dirs
from agentd.sandbox.launcher_client import LauncherClient
from agentd.sandbox.spec import Limits, WorkerSpec, shape_of
from tests.conftest import CONFIG, DaemonHandle, sh, start_daemon, stop_daemon

# What a worker's confinement looks like from inside; the same lines in a prebuilt and a cold
# worker. fds: only stdio and agentd's two channel fds (3, 4), plus ls's own directory fd.
PROBE = r"""
grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo "fds $(ls /proc/self/fd | tr '\n' ' ')"
echo "mounts $(awk '{print $5, $6}' /proc/self/mountinfo | sort | tr '\n' ';')"
echo "pid $$"
echo "tmp [$(ls -A /tmp)]"
echo "seen [$(cat /workspace/seen 2>/dev/null)]"
touch /tmp/left-by-an-earlier-call
echo once >> /workspace/seen
/lib64/ld-linux-x86-64.so.2 /usr/bin/python3 -c 'print("python ran")' 2>/dev/null ||
  echo "no python"
"""


def spawn_counts(handle: DaemonHandle) -> dict[str, float]:
    """agentd_spawns_total by `how`, scraped from the metrics socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(handle.base / "run" / "agentd-metrics.sock"))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    found = re.findall(rb'agentd_spawns_total\{how="(\w+)"\} ([0-9.e+]+)', text)
    return {how.decode(): float(n) for how, n in found}


@pytest.fixture(scope="module")
def daemons(short_tmp: Path) -> Iterator[dict[str, DaemonHandle]]:
    handles: dict[str, DaemonHandle] = {}
    try:
        for name, size in (("warm", 2), ("cold", 0)):
            base = short_tmp / name
            base.mkdir()
            config = CONFIG.replace("[daemon]\n", f"[daemon]\nwarm_pool = {size}\n", 1)
            handles[name] = start_daemon(base, config)
        yield handles
    finally:
        for handle in handles.values():
            stop_daemon(handle)


def probe(handle: DaemonHandle, agent: str = "shell-helper", calls: int = 4) -> list[str]:
    stub = handle.stub()
    run_id = stub.CreateRun(pb.CreateRunRequest(agent=agent)).run_id
    try:
        outputs = []
        for _ in range(calls):
            result = sh(stub, run_id, PROBE)
            assert result.outcome.exit_code == 0, result.stderr
            outputs.append(result.stdout.decode())
        return outputs
    finally:
        stub.CloseRun(pb.CloseRunRequest(run_id=run_id))


def lines(output: str, *prefixes: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefixes)]


class TestPrebuiltWorkers:
    def test_a_prebuilt_worker_is_confined_exactly_as_a_cold_one(
            self, daemons: dict[str, DaemonHandle]) -> None:
        before = spawn_counts(daemons["warm"])
        warm = probe(daemons["warm"])
        after = spawn_counts(daemons["warm"])
        cold = probe(daemons["cold"])
        # The warm daemon served most of these calls from its pool; the cold one none.
        assert after.get("prebuilt", 0) - before.get("prebuilt", 0) >= 3
        assert spawn_counts(daemons["cold"]).get("prebuilt", 0) == 0
        keys = ("Uid", "Gid", "Cap", "NoNewPrivs", "Seccomp", "fds", "mounts", "pid",
                "no python")
        for output in warm[1:]:
            assert lines(output, *keys) == lines(cold[-1], *keys), (output, cold[-1])
        assert "NoNewPrivs:\t1" in warm[-1]
        assert "Seccomp:\t2" in warm[-1]
        assert "CapEff:\t0000000000000000" in warm[-1]
        assert "pid 1" in warm[-1]  # pid 1 of its own pid namespace
        assert "no python" in warm[-1]
        assert "python ran" not in warm[-1]

    def test_a_prebuilt_worker_serves_one_call_on_the_runs_committed_workspace(
            self, daemons: dict[str, DaemonHandle]) -> None:
        outputs = probe(daemons["warm"], calls=4)
        for n, output in enumerate(outputs):
            # Each call sees the workspace every earlier call committed, and a fresh /tmp: no
            # worker (and no /tmp) outlives its call.
            assert f"seen [{chr(10).join(['once'] * n)}]" in output, output
            assert "tmp []" in output, output

    def test_the_pool_is_shown_and_emptied_at_stop(self, short_tmp: Path) -> None:
        base = short_tmp / "stopping"
        base.mkdir()
        config = CONFIG.replace("[daemon]\n", "[daemon]\nwarm_pool = 2\n", 1)
        handle = start_daemon(base, config)
        try:
            probe(handle, calls=1)
            stub = handle.stub()
            for _ in range(100):
                status = stub.GetStatus(pb.GetStatusRequest())
                if status.warm_pool_depth == 2:
                    break
                time.sleep(0.05)
            assert status.warm_pool_depth == 2
            assert status.warm_pool_size == 2
            assert prebuilt_cgroups(handle) == {"prebuilt-1", "prebuilt-2"}
        finally:
            stop_daemon(handle)
        assert prebuilt_cgroups(handle) == set()


def prebuilt_cgroups(handle: DaemonHandle) -> set[str]:
    """The names of the prebuilt workers' cgroups under this daemon's parent, in any
    hierarchy."""
    parent = re.search(r'cgroup_parent = "([^"]+)"', (handle.base / "agentd.toml").read_text())
    assert parent is not None
    found: set[str] = set()
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root).startswith(parent.group(1)):
            found.update(d for d in dirs if d.startswith("prebuilt-"))
            dirs.clear()
    return found


class TestShapes:
    BASE = WorkerSpec(task_id="t1", argv=("/bin/true",), env={"A": "1"}, cwd="/workspace",
                      read_only=("/usr",), exec_allow=("/usr/bin/true",),
                      exec_binds=("/usr/bin/true",), workspace_layers=("/s/l1",),
                      workspace_upper="/s/u1", workspace_work="/s/w1",
                      limits=Limits(memory_bytes=1 << 27, pids=32, wall_seconds=30))

    def test_the_calls_own_fields_do_not_change_the_shape(self) -> None:
        other = dataclasses.replace(
            self.BASE, task_id="t2", argv=("/bin/sh", "-c", "x"), env={}, cwd="/",
            workspace_layers=("/s/l1", "/s/l2"), workspace_upper="/s/u2",
            workspace_work="/s/w2", workspace_quota=True,
            limits=dataclasses.replace(self.BASE.limits, wall_seconds=1, output_bytes=5,
                                       open_files=9, file_size_bytes=7))
        assert shape_of(other) == shape_of(self.BASE)

    @pytest.mark.parametrize("change", [
        {"read_only": ("/usr", "/etc")}, {"exec_allow": ("/usr/bin/",)},
        {"exec_binds": ()}, {"exec_withheld": ("/usr/bin/true",)}, {"uid": 1000},
        {"gid": 1000}, {"hostname": "x"}, {"user_namespace": True}, {"seccomp": False},
        {"landlock": False}, {"workspace_writable": False},
        {"workspace_layers": (), "workspace_upper": None, "workspace_work": None},
        {"limits": Limits(memory_bytes=1 << 28, pids=32)},
        {"limits": Limits(memory_bytes=1 << 27, pids=33)},
        {"limits": Limits(memory_bytes=1 << 27, pids=32, cpu=0.5)},
        {"limits": Limits(memory_bytes=1 << 27, pids=32, tmp_bytes=1 << 20)},
    ])
    def test_what_the_worker_is_built_with_changes_the_shape(
            self, change: dict[str, object]) -> None:
        assert shape_of(dataclasses.replace(self.BASE, **change)) != shape_of(self.BASE)


class TestLauncherHandsOver:
    """The launcher itself refuses to give a prebuilt worker a call of another shape."""

    def spec(self, task_id: str, read_only: tuple[str, ...], argv: tuple[str, ...]
             ) -> WorkerSpec:
        programs = [os.path.realpath(p) for p in ("/usr/bin/true", "/usr/bin/test")]
        return WorkerSpec(task_id=task_id, argv=argv, env={}, cwd="/",
                          read_only=read_only, exec_allow=("/usr/bin/",),
                          exec_binds=(*programs, *sorted(_library_dirs(programs))))

    def test_a_call_of_another_shape_is_served_cold_and_the_prebuilt_worker_dies(
            self, short_tmp: Path) -> None:
        shape_a = self.spec("a", ("/usr", "/lib", "/lib64"), ("/usr/bin/true",))
        call_b = self.spec("b", ("/usr", "/lib", "/lib64", "/etc/ssl"),
                           ("/usr/bin/test", "-d", "/etc/ssl"))
        assert shape_of(shape_a) != shape_of(call_b)

        async def scenario() -> tuple[list[tuple[str, int]], int]:
            client = LauncherClient(str(short_tmp / "launcher-root"))
            client.start()
            client.attach(asyncio.get_running_loop())
            events: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
            client.on_pool_event = lambda op, slot, _m: events.put_nowait((op, slot))
            try:
                client.prebuild(7, shape_a, [])
                seen = [await asyncio.wait_for(events.get(), 10)]
                null = os.open(os.devnull, os.O_RDWR)
                try:
                    spawned = await client.spawn(call_b, [], (null, null, null), pooled=7)
                finally:
                    os.close(null)
                status = await asyncio.wait_for(spawned.exited, 10)
                seen.append(await asyncio.wait_for(events.get(), 10))
                return seen, status
            finally:
                client.stop()

        seen, status = asyncio.run(scenario())
        assert seen == [("ready", 7), ("pool_exited", 7)]
        # The call ran, cold, with its own root: /etc/ssl is there, as call_b asked.
        assert os.WIFEXITED(status)
        assert os.WEXITSTATUS(status) == 0


UNIFIED = "/sys/fs/cgroup/unified"  # this host's cgroup2 mount (hybrid); /sys/fs/cgroup on v2


@pytest.mark.skipif(not os.path.isfile(f"{UNIFIED}/cgroup.procs"),
                    reason=f"no cgroup2 mount at {UNIFIED} (on a v2 host the vm-tests cover it)")
class TestCloneIntoCgroup:
    """Cold workers on cgroup v2 are born in their cgroup (clone3 CLONE_INTO_CGROUP): no
    cgroup.procs write, by the launcher or anyone."""

    def test_a_worker_is_cloned_straight_into_the_cgroup_it_is_given(
            self, short_tmp: Path) -> None:
        directory = f"{UNIFIED}/agentd-test-clone-into-{os.getpid()}"
        os.mkdir(directory)
        programs = [os.path.realpath("/usr/bin/sleep")]
        spec = WorkerSpec(task_id="c", argv=("/usr/bin/sleep", "5"), env={}, cwd="/",
                          read_only=("/usr", "/lib", "/lib64"), exec_allow=("/usr/bin/",),
                          exec_binds=(*programs, *sorted(_library_dirs(programs))))

        async def scenario() -> tuple[int, str]:
            client = LauncherClient(str(short_tmp / "launcher-root-c"))
            client.start()
            client.attach(asyncio.get_running_loop())
            null = os.open(os.devnull, os.O_RDWR)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                # No join paths at all: only the clone can have put it there.
                spawned = await client.spawn(spec, [], (null, null, null), cgroup_fd=fd)
                pid = await asyncio.wait_for(spawned.started, 10)
                with open(f"{directory}/cgroup.procs") as f:
                    members = f.read()
                os.kill(pid, 9)
                await asyncio.wait_for(spawned.exited, 10)
                return pid, members
            finally:
                os.close(fd)
                os.close(null)
                client.stop()

        try:
            pid, members = asyncio.run(scenario())
        finally:
            os.rmdir(directory)
        assert members.split() == [str(pid)]
