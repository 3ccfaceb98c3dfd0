"""agentd.systemd against the real protocols: a datagram socket standing in for systemd's
notification socket, and real processes started with descriptors at 3, 4 and LISTEN_* set,
as systemd starts a socket-activated service. Nothing of the protocol is mocked."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path, named by NOTIFY_SOCKET, as systemd's is."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


class TestNotify:
    def test_sends_the_state_as_one_datagram(self, notify_socket: socket.socket) -> None:
        """The whole state, newlines included, arrives as one datagram."""
        assert systemd.notify("READY=1\nSTATUS=serving")
        assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"

    def test_abstract_socket(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A NOTIFY_SOCKET starting with '@' is in the abstract namespace."""
        name = f"agentd-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(b"\0" + name.encode())
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            assert systemd.notify("STOPPING=1")
            assert sock.recv(4096) == b"STOPPING=1"

    def test_without_systemd_is_a_no_op(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No NOTIFY_SOCKET (development mode): nothing is sent, False is returned."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert not systemd.notify("READY=1")

    def test_unreachable_socket_is_reported(self, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A NOTIFY_SOCKET nobody listens on gives False, not an exception."""
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
        assert not systemd.notify("READY=1")


class TestWatchdog:
    def test_interval_for_this_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """WATCHDOG_USEC is returned in seconds when WATCHDOG_PID is this process."""
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert systemd.watchdog_interval() == 30.0

    def test_not_for_another_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A child that inherited the variables (the launcher) does not pet the watchdog."""
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
        assert systemd.watchdog_interval() is None

    def test_no_watchdog(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without WATCHDOG_USEC there is no watchdog."""
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        assert systemd.watchdog_interval() is None

    def test_pets_at_half_the_interval(self, notify_socket: socket.socket,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """pet_watchdog sends WATCHDOG=1 at once and then every interval/2."""
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

        async def run() -> None:
            task = asyncio.create_task(systemd.pet_watchdog())
            await asyncio.sleep(0.25)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(run())
        notify_socket.settimeout(0)
        received = []
        while True:
            try:
                received.append(notify_socket.recv(64))
            except BlockingIOError:
                break
        assert received[:3] == [b"WATCHDOG=1"] * 3

    def test_unhealthy_stops_the_petting(self, notify_socket: socket.socket,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """While healthy() is false nothing is sent, so systemd will restart the daemon."""
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)

        async def run() -> None:
            task = asyncio.create_task(systemd.pet_watchdog(lambda: False))
            await asyncio.sleep(0.15)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(run())
        notify_socket.settimeout(0)
        with pytest.raises(BlockingIOError):
            notify_socket.recv(64)


# Run in a child started the way systemd starts a socket-activated service: the sockets at
# descriptors 3 and 4 and LISTEN_PID its own pid, set by a tiny launcher that then execs it.
LAUNCHER = """
import os, sys
high, own_pid, child = sys.argv[1].split(","), sys.argv[2] == "1", sys.argv[3]
for target, fd in enumerate(high, start=3):
    os.dup2(int(fd), target)  # dup2 leaves the copy inheritable
    os.close(int(fd))
os.environ["LISTEN_PID"] = str(os.getpid()) if own_pid else "1"
os.execv(sys.executable, [sys.executable, "-c", child])
"""
CHILD = """
import fcntl, json, os, socket
from agentd import systemd
fds = systemd.listen_fds()
print(json.dumps({
    "fds": fds,
    "paths": {name: [socket.socket(fileno=os.dup(fd)).getsockname() for fd in numbers]
              for name, numbers in fds.items()},
    "cloexec": all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                   for numbers in fds.values() for fd in numbers),
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def _run_activated(tmp_path: Path, env: dict[str, str], own_pid: bool = True) -> dict:
    listeners = []
    for name in ("a.sock", "b.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / name))
        sock.listen()
        listeners.append(sock)
    # Above 10, so that moving them to 3 and 4 never overwrites one with the other.
    high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for sock in listeners]
    try:
        done = subprocess.run(
            [sys.executable, "-c", LAUNCHER, ",".join(map(str, high)), "1" if own_pid else "0",
             CHILD],
            env={"PATH": os.environ["PATH"], **env}, pass_fds=high,
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        for fd in high:
            os.close(fd)
        for sock in listeners:
            sock.close()
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class TestListenFds:
    def test_named_sockets(self, tmp_path: Path) -> None:
        """Descriptors 3.. are returned under their FileDescriptorName=, close-on-exec, and
        the LISTEN_* variables are gone from the environment."""
        got = _run_activated(tmp_path, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "client:admin"})
        assert got["fds"] == {"client": [3], "admin": [4]}
        assert got["paths"] == {"client": [str(tmp_path / "a.sock")],
                                "admin": [str(tmp_path / "b.sock")]}
        assert got["cloexec"]
        assert got["env_left"] == []

    def test_unnamed_sockets(self, tmp_path: Path) -> None:
        """Without LISTEN_FDNAMES every descriptor is 'unknown', in order."""
        got = _run_activated(tmp_path, {"LISTEN_FDS": "2"})
        assert got["fds"] == {"unknown": [3, 4]}

    def test_same_name_twice(self, tmp_path: Path) -> None:
        """Two sockets of one unit share its name and are both returned."""
        got = _run_activated(tmp_path, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "client:client"})
        assert got["fds"] == {"client": [3, 4]}

    def test_variables_meant_for_another_process(self, tmp_path: Path) -> None:
        """LISTEN_PID of another process: nothing is taken, the variables are still removed."""
        got = _run_activated(tmp_path, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "client:admin"},
                             own_pid=False)
        assert got["fds"] == {}
        assert got["env_left"] == []

    def test_not_activated(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside socket activation the result is empty."""
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            monkeypatch.delenv(name, raising=False)
        assert systemd.listen_fds() == {}
