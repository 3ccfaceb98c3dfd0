"""Network egress against the real kernel: a fake internet in a namespace this test makes.

The "internet" is a network namespace (`ip netns add`, tests/fake_internet.py) whose
loopback holds the test addresses: servers on 198.18.0.10 (allowed) and 198.18.0.11 (not),
and a DNS server on 198.18.0.53 answering a small test zone. It has no route to the host's
uplink; the daemon is told to connect out from it (`egress_uplink_netns`) and to ask its DNS
server. Every packet of these tests stays inside namespaces the test or the daemon made. One
worker script per test checks several destinations, so a test costs one step; refusals are by
reset (TCP) or a short socket timeout (UDP), never a threshold on time. Every refused attempt
that leaves the worker is checked to be exactly one record (`net.refused`, and `net.dropped`
with the kernel's counts), and `agentctl timeline` is run against the daemon to show them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.sandbox import netns
from tests import fake_internet
from tests.conftest import (
    CONFIG,
    DaemonHandle,
    daemon_base,
    execute,
    marked_processes,
    start_daemon,
    stop_daemon,
    write_daemon_dir,
)

ALLOWED, OTHER, DNS = "198.18.0.10", "198.18.0.11", "198.18.0.53"
ZONE = {  # name -> (address, ttl)
    "allowed.test": (ALLOWED, 300),
    "short.test": (ALLOWED, 1),
    "rebind.test": ("127.0.0.1", 60),
    "other.test": (OTHER, 300),
    "a.wild.test": (ALLOWED, 300),
}
POLICY = """\
apiVersion: agentd/v1
kind: Policy
name: fetcher
stages:
  prototype:
    exec: {allow: [/usr/bin/, /bin/]}
    filesystem: {read_only: [/usr, /bin, /lib, /lib64]}
    network:
      egress:
        - allowed.test:8080
        - short.test:8080
        - rebind.test:8080
        - "*.wild.test:8080"
      limits: {bytes: 1MiB, connections_per_second: 50}
    limits: {wall_time: 60s}
"""
CEILING = """\
    network:
      egress: ["allowed.test:*", "short.test:*", "rebind.test:*", "other.test:*",
               "*.wild.test:*", "198.18.0.0/24:*"]
      limits: {bytes: 64MiB, connections_per_second: 100}
"""


class Internet(fake_internet.Internet):
    """The fake internet of these tests (tests/fake_internet.py): ZONE on DNS, hello servers
    on ALLOWED:8080, ALLOWED:8081 and OTHER:8080."""

    def __init__(self, name: str) -> None:
        super().__init__(name, addresses=(ALLOWED, OTHER), dns=DNS, zone=ZONE)
        for address, port in ((ALLOWED, 8080), (ALLOWED, 8081), (OTHER, 8080)):
            self.serve_tcp(address, port)


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    world = Internet(f"agentd-inet-{os.getpid()}")
    yield world
    world.close()


def write_egress_dir(base: Path, internet: Internet, config: str = CONFIG,
                     policy: str = POLICY) -> None:
    """A daemon directory with egress on through `internet`, prototype's ceiling opened by
    CEILING, and the agent `fetcher` running `policy`."""
    config += '\n[agents.fetcher]\npolicy = "fetcher.yaml"\nstage = "prototype"\n'
    config = config.replace("[daemon]\n", "[daemon]\negress = true\n"
                            + internet.daemon_settings(), 1)
    write_daemon_dir(base, config)
    stages = base / "policies" / "stages.yaml"
    text = stages.read_text()
    at = text.index("    network: none\n")  # prototype's
    stages.write_text(text[:at] + CEILING + text[at + len("    network: none\n"):])
    (base / "policies" / "fetcher.yaml").write_text(policy)


def _start(base: Path, internet: Internet) -> DaemonHandle:
    write_egress_dir(base, internet)
    return start_daemon(base, keep_files=True)


@pytest.fixture(scope="module")
def egress_daemon(internet: Internet) -> Iterator[DaemonHandle]:
    base = daemon_base()
    handle = _start(base, internet)
    yield handle
    stop_daemon(handle)


PROBE = textwrap.dedent("""\
    import json, socket, sys, time
    out = {}
    def tcp(host, port):
        s = socket.socket(); s.settimeout(5)
        try:
            s.connect((host, port)); return s.recv(100).decode().strip()
        except OSError as e:
            return type(e).__name__
        finally:
            s.close()
    def udp(host, port, data=b"x"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
        try:
            s.sendto(data, (host, port)); return s.recv(100).decode()
        except OSError as e:
            return type(e).__name__
    def query(name):  # a DNS question for `name`, by hand (dnslib is not in the worker)
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        head = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
        return head + labels + b"\\x00\\x00\\x01\\x00\\x01"
    def other(kind, host):  # each call the worker's own kernel refuses
        try:
            if kind == "tcp6":
                socket.socket(socket.AF_INET6).connect((host, 8080))
            elif kind == "mapped":  # IPv4 in an IPv6 address
                socket.socket(socket.AF_INET6).connect(("::ffff:" + host, 9))
            elif kind == "udp6":
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"x", (host, 53))
            elif kind == "raw":
                socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            elif kind == "tfo":  # TCP Fast Open: a connect made by sendto
                socket.socket().sendto(b"x", socket.MSG_FASTOPEN, (host, 9))
            elif kind == "tfomsg":
                socket.socket().sendmsg([b"x"], [], socket.MSG_FASTOPEN, (host, 10))
            elif kind == "mptcp":  # outside Landlock's port rule
                socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).connect((host, 9))
            elif kind == "packet":
                socket.socket(17, socket.SOCK_RAW, 0)
            else:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            return "opened"
        except OSError as e:
            return type(e).__name__
    def flood(host, count):  # refused connects in a loop
        for _ in range(count):
            s = socket.socket()
            try:
                s.connect((host, 9))
            except OSError:
                pass
            s.close()
        return count
    def resolve(name):
        try:
            return sorted({a[4][0] for a in socket.getaddrinfo(name, 8080, socket.AF_INET)})
        except OSError as e:
            return type(e).__name__
    for check in sys.argv[1:]:
        kind, _, arg = check.partition("=")
        if kind == "tcp":
            host, port = arg.rsplit(":", 1); out[check] = tcp(host, int(port))
        elif kind == "udp":
            host, port = arg.rsplit(":", 1); out[check] = udp(host, int(port))
        elif kind == "dns":
            server, name = arg.split("/"); out[check] = udp(server, 53, query(name))
        elif kind == "connect":  # connect and close at once, like `nc -z`
            s = socket.create_connection(arg.rsplit(":", 1)); s.close(); out[check] = "closed"
        elif kind in ("tcp6", "ping", "mapped", "udp6", "raw", "tfo", "tfomsg", "mptcp",
                      "packet"):
            out[check] = other(kind, arg)
        elif kind == "thread":  # from a thread that is not the process's first
            import threading
            host, port = arg.rsplit(":", 1); box = []
            t = threading.Thread(target=lambda: box.append(tcp(host, int(port))))
            t.start(); t.join(); out[check] = box[0]
        elif kind == "pipe":  # connect(2) on a pipe with an IP address, N times
            import ctypes, os, struct
            libc = ctypes.CDLL(None, use_errno=True)
            host, count = arg.split("*"); r, w = os.pipe(); errors = set()
            sa = struct.pack("=H", 2) + struct.pack("!H", 9) + socket.inet_aton(host) + bytes(8)
            for _ in range(int(count)):
                if libc.connect(r, sa, 16) < 0:
                    errors.add(ctypes.get_errno())
            out[check] = sorted(errors)
        elif kind == "flood":
            host, count = arg.split("*"); out[check] = flood(host, int(count))
        elif kind == "resolve":
            out[check] = resolve(arg)
        elif kind == "sleep":
            time.sleep(float(arg))
    print(json.dumps(out))
    """)


def _probe(handle: DaemonHandle, *checks: str) -> tuple[str, dict[str, Any]]:
    stub = handle.stub()
    run = stub.CreateRun(pb.CreateRunRequest(agent="fetcher"))
    result = execute(stub, run.run_id, ["/usr/bin/python3", "-c", PROBE, *checks])
    assert result.outcome is not None
    assert result.outcome.exit_code == 0, result.stderr.decode()
    return run.run_id, json.loads(result.stdout)


def _launcher_of(handle: DaemonHandle) -> int:
    """The pid of the daemon's launcher (agentd/sandbox/launcher.py)."""
    launchers = [p.pid for p in psutil.Process(handle.process.pid).children()
                 if "agentd.sandbox.launcher" in " ".join(p.cmdline())]
    assert len(launchers) == 1, launchers
    return launchers[0]


def _records(handle: DaemonHandle, run_id: str) -> list[dict[str, Any]]:
    records = []
    for segment in sorted((handle.base / "state" / "audit").glob("audit-*.jsonl")):
        records += [json.loads(line) for line in segment.read_text().splitlines() if line]
    return [r for r in records if r.get("run_id") == run_id]


class TestEgress:
    def test_allowed_name_reachable_and_recorded(self, egress_daemon: DaemonHandle,
                                                 internet: Internet) -> None:
        """An allowed name resolves and its port is reached through the proxy; the answer
        and the connection (name, destination, bytes) are on record before exec.exited."""
        run_id, out = _probe(egress_daemon, "resolve=allowed.test", "tcp=allowed.test:8080",
                             "tcp=a.wild.test:8080")
        assert out["resolve=allowed.test"] == [ALLOWED]
        assert out["tcp=allowed.test:8080"] == f"hello from {ALLOWED}:8080"
        assert out["tcp=a.wild.test:8080"] == f"hello from {ALLOWED}:8080"
        records = _records(egress_daemon, run_id)
        events = [r["event"] for r in records]
        answers = [r["details"] for r in records if r["event"] == "dns.answer"]
        assert {"name": "allowed.test", "addresses": [ALLOWED]}.items() <= answers[0].items()
        connections = [r["details"] for r in records if r["event"] == "net.connection"]
        assert connections[0]["name"] == "allowed.test"
        assert connections[0]["destination"] == ALLOWED
        assert connections[0]["bytes_in"] == len(f"hello from {ALLOWED}:8080\n")
        assert events.index("net.connection") < events.index("exec.exited")
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["connections"] == 2

    def test_everything_else_refused(self, egress_daemon: DaemonHandle,
                                     internet: Internet) -> None:
        """Every attempt that leaves the worker and is refused is one `net.refused` record:
        TCP by address to an unlisted host (nft hands it to the refusal listener: accepted,
        then reset), DNS to another server (with its question) and other UDP (from the
        kernel's log), and the task's packet counts are one `net.dropped`. The fake internet
        saw none of them."""
        before = list(internet.seen)
        run_id, out = _probe(egress_daemon, "resolve=allowed.test", f"tcp={OTHER}:8080",
                             "resolve=other.test", f"dns={DNS}/leak.test",
                             f"udp={OTHER}:9999", f"connect={OTHER}:8080")
        assert out[f"tcp={OTHER}:8080"] == "ConnectionResetError"
        assert out["resolve=other.test"] == "gaierror"
        assert out[f"dns={DNS}/leak.test"] == "TimeoutError"
        assert out[f"udp={OTHER}:9999"] == "TimeoutError"
        assert internet.seen == before
        assert "leak.test" not in internet.queries
        assert "other.test" not in internet.queries
        records = _records(egress_daemon, run_id)
        dns_refused = [r["details"]["name"] for r in records if r["event"] == "dns.refused"]
        assert dns_refused == ["other.test"]
        listed = [r["details"] for r in records if r["event"] == "net.refused"]
        assert sorted((d["protocol"], d["destination"], d["port"]) for d in listed) == [
            ("tcp", OTHER, 8080), ("tcp", OTHER, 8080), ("udp", OTHER, 9999), ("udp", DNS, 53)]
        refused = {(d["protocol"], d["destination"], d["port"]): d for d in listed}
        assert refused[("tcp", OTHER, 8080)]["reason"] == "no egress entry allows this destination"
        assert refused[("udp", DNS, 53)]["query"] == "leak.test"
        assert refused[("udp", OTHER, 9999)]["reason"] == (
            "no egress entry allows UDP to this destination")
        dropped = [r["details"] for r in records if r["event"] == "net.dropped"]
        assert dropped == [{"packets": {"udp": 2}, "refusals_recorded": 4,
                            "refusals_unrecorded": 0}]
        events = [r["event"] for r in records]
        assert events.index("net.dropped") < events.index("exec.exited")
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["refused"] == 2
        assert exited["details"]["egress"]["packets_dropped"] == 2

    def test_refused_inside_the_worker_recorded(self, egress_daemon: DaemonHandle,
                                                internet: Internet) -> None:
        """What the worker's own kernel refuses before any packet exists is refused by the
        launcher's watch on the spot (agentd/sandbox/netwatch.py), with the kernel's errno, and
        is one `net.refused` record each (`by: worker`): a TCP port no entry names (by
        connect, by an IPv4-mapped IPv6 address, by TCP Fast Open through sendto and
        sendmsg, from a second thread), IPv6 (a connect, a datagram socket), a raw socket (and
        an AF_PACKET one) and a ping socket. An MPTCP socket, which Landlock's port rule does
        not cover, is refused as by a kernel without MPTCP. An allowed port still connects."""
        before = list(internet.seen)
        run_id, out = _probe(egress_daemon, "resolve=allowed.test", f"tcp={ALLOWED}:8081",
                             f"mapped={OTHER}", f"tfo={OTHER}", f"tfomsg={OTHER}",
                             "tcp6=2001:db8::1", "udp6=2001:db8::53", f"raw={OTHER}",
                             f"ping={OTHER}", f"thread={OTHER}:11", f"mptcp={OTHER}",
                             f"packet={OTHER}", "tcp=allowed.test:8080")
        assert out == {
            "resolve=allowed.test": [ALLOWED],
            f"tcp={ALLOWED}:8081": "PermissionError", f"mapped={OTHER}": "PermissionError",
            f"tfo={OTHER}": "PermissionError", f"tfomsg={OTHER}": "PermissionError",
            "tcp6=2001:db8::1": "OSError", "udp6=2001:db8::53": "OSError",
            f"raw={OTHER}": "PermissionError", f"ping={OTHER}": "PermissionError",
            f"thread={OTHER}:11": "PermissionError", f"mptcp={OTHER}": "OSError",
            f"packet={OTHER}": "PermissionError",
            "tcp=allowed.test:8080": f"hello from {ALLOWED}:8080"}
        assert internet.seen == [*before, f"{ALLOWED}:8080"]  # only the allowed one
        records = _records(egress_daemon, run_id)
        listed = [r["details"] for r in records if r["event"] == "net.refused"]
        assert all(d["by"] == "worker" for d in listed), listed
        assert [(d["call"], d["protocol"], d["destination"], d["port"], d["errno"])
                for d in listed] == [
            ("connect", "tcp", ALLOWED, 8081, "EACCES"),
            ("connect", "tcp", OTHER, 9, "EACCES"),
            ("sendto", "tcp", OTHER, 9, "EACCES"),
            ("sendmsg", "tcp", OTHER, 10, "EACCES"),
            ("connect", "tcp", "2001:db8::1", 8080, "ENETUNREACH"),
            ("socket", "udp", "", 0, "EAFNOSUPPORT"),
            ("socket", "raw", "", 0, "EPERM"),
            ("socket", "icmp", "", 0, "EACCES"),
            ("connect", "tcp", OTHER, 11, "EACCES"),
            ("socket", "raw", "", 0, "EPERM")]
        assert listed[0]["name"] == "allowed.test"  # what the resolver answered this task
        assert listed[0]["reason"] == (
            "port 8081 is not allowed: no egress entry names TCP port 8081")
        assert listed[4]["reason"].startswith("IPv6 is not allowed")
        events = [r["event"] for r in records]
        assert events.index("net.connection") < events.index("exec.exited")
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["refused"] == 10
        assert exited["details"]["egress"]["connections"] == 1
        shown = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(egress_daemon.socket()),
             "timeline", run_id], capture_output=True, text=True, timeout=60, check=True)
        lines = [" ".join(line.split()[:5]) for line in shown.stdout.splitlines()]
        for line in (f"net refused allowed.test {ALLOWED}:8081 tcp",
                     "net refused [2001:db8::1]:8080 tcp IPv6", "net refused socket() raw raw",
                     "net refused socket() icmp ICMP"):
            assert line in lines, shown.stdout

    def test_watch_holds_no_file_of_the_worker(self, egress_daemon: DaemonHandle) -> None:
        """connect() with an IP address on a pipe is the kernel's to refuse (ENOTSOCK); the
        launcher looks at the fd through /proc and takes no reference to it: 500 such calls
        leave it no fd more (a copy of each would exhaust it, or keep a worker's output pipe
        or a lingering socket open in the launcher)."""
        launcher = _launcher_of(egress_daemon)
        before = len(os.listdir(f"/proc/{launcher}/fd"))
        _run_id, out = _probe(egress_daemon, f"pipe={OTHER}*500")
        assert out == {f"pipe={OTHER}*500": [88]}  # ENOTSOCK, every time
        assert len(os.listdir(f"/proc/{launcher}/fd")) <= before + 2  # its pool may refill

    def test_refusals_inside_the_worker_bounded(self, egress_daemon: DaemonHandle) -> None:
        """A worker that loops on a refused connect gets EACCES every time, each counted; the
        audit log gets the task's refusal budget (128 records) and the count of the rest."""
        run_id, out = _probe(egress_daemon, f"flood={OTHER}*300")
        assert out == {f"flood={OTHER}*300": 300}
        records = _records(egress_daemon, run_id)
        listed = [r for r in records if r["event"] == "net.refused"]
        assert len(listed) == 128
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["refused"] == 300
        assert exited["details"]["egress"]["refusals_unrecorded"] == 300 - 128

    def test_icmp_from_the_slot_recorded(self, egress_daemon: DaemonHandle,
                                         internet: Internet) -> None:
        """ICMP is refused by the kernel and recorded with its type. A worker cannot send it
        (no raw or ping socket), so the test sends an echo request from the worker's slot
        namespace as root while the worker runs."""
        stub = egress_daemon.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="fetcher"))
        script = "import time; print('up', flush=True); time.sleep(1.5)  # icmp-probe"
        events = stub.Exec(pb.ExecRequest(run_id=run.run_id,
                                          argv=["/usr/bin/python3", "-c", script]), timeout=60)
        for event in events:
            if event.HasField("output"):
                break
        slot = netns.Namespace(netns.open_path(f"/proc/{marked_processes(script)[0]}/ns/net"),
                               "slot")
        try:
            def ping() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
                    s.sendto(b"\x08\x00\xf7\xff\x00\x00\x00\x00", (OTHER, 0))

            slot.call(ping)
        finally:
            slot.close()
        for _ in events:  # to its end: the records precede exec.exited
            pass
        records = _records(egress_daemon, run.run_id)
        refused = [r["details"] for r in records if r["event"] == "net.refused"]
        assert [(d["protocol"], d["destination"], d["icmp_type"]) for d in refused] == [
            ("icmp", OTHER, 8)]
        dropped = [r["details"]["packets"] for r in records if r["event"] == "net.dropped"]
        assert dropped == [{"icmp": 1}]

    def test_timeline_shows_network_records(self, egress_daemon: DaemonHandle) -> None:
        """`agentctl timeline RUN` shows, under its task, a step's connections (name,
        destination, bytes), its TCP, DNS and UDP refusals and the kernel's drop counts."""
        stub = egress_daemon.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="fetcher"))
        checks = ["tcp=allowed.test:8080", f"tcp={OTHER}:8080", "resolve=other.test",
                  f"udp={OTHER}:9999"]
        script = PROBE.replace("sys.argv[1:]", repr(checks))
        reply = stub.Step(pb.StepRequest(run_id=run.run_id, tasks=[
            pb.TaskSpec(name="fetch", argv=["/usr/bin/python3", "-c", script])]), timeout=60)
        assert reply.state == pb.STEP_STATE_COMMITTED or reply.tasks[0].outcome.exit_code == 0
        shown = subprocess.run(
            [sys.executable, "-m", "agentd.cli.main", "--socket", str(egress_daemon.socket()),
             "timeline", run.run_id], capture_output=True, text=True, timeout=60, check=True)
        lines = [line.split() for line in shown.stdout.splitlines()]
        hello = str(len(f"hello from {ALLOWED}:8080\n"))
        # In log order: a connection is recorded when it ends, so it may follow a refusal.
        shown_network = sorted(" ".join(line[:5]) for line in lines[2:])
        assert shown_network == sorted([
            f"net allowed allowed.test {ALLOWED}:8080 out",
            f"net refused {OTHER}:8080 tcp no",
            "dns refused other.test no egress",
            f"net refused {OTHER}:9999 udp no",
            "net dropped udp 1 (packets"]), shown.stdout
        allowed = next(line for line in lines if line[:2] == ["net", "allowed"])
        assert allowed[5:10] == ["0", "B,", "in", hello, "B"]
        assert len(lines) == 7, shown.stdout

    def test_rebinding_refused(self, egress_daemon: DaemonHandle) -> None:
        """An allowed name that resolves to loopback gets no address, on record."""
        run_id, out = _probe(egress_daemon, "resolve=rebind.test", "tcp=127.0.0.1:8080")
        assert out["resolve=rebind.test"] == "gaierror"
        records = _records(egress_daemon, run_id)
        rebinding = [r["details"] for r in records if r["event"] == "dns.rebinding_refused"]
        assert rebinding[0]["addresses"] == ["127.0.0.1"]

    def test_address_refused_after_ttl(self, egress_daemon: DaemonHandle) -> None:
        """An allowed name's address is reachable by IP while its TTL (1 s) lasts, and
        refused after it: the answer, not the address, is what was allowed."""
        _run_id, out = _probe(egress_daemon, "resolve=short.test", f"tcp={ALLOWED}:8080",
                             "sleep=2.5", f"tcp={ALLOWED}:8080 ")
        assert out[f"tcp={ALLOWED}:8080"] == f"hello from {ALLOWED}:8080"
        assert out[f"tcp={ALLOWED}:8080 "] == "ConnectionResetError"
        records = _records(egress_daemon, _run_id)
        refused = [r["details"] for r in records if r["event"] == "net.refused"]
        assert [(d["destination"], d["port"], d["name"]) for d in refused] == [
            (ALLOWED, 8080, "short.test")]
        assert refused[0]["reason"].startswith("its DNS answer expired")


class TestFailClosed:
    def test_kill_9_leaves_no_path_out(self, internet: Internet) -> None:
        """kill -9 of the daemon during a connection: the connection ends at the server, and
        no namespace the daemon made (egress, slots) is left: no path out remains."""
        handle = _start(daemon_base(), internet)
        stub = handle.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="fetcher"))
        script = ("import socket,time; s=socket.create_connection(('allowed.test', 8080));"
                  " print(s.recv(100).decode(), flush=True); time.sleep(60)")
        events = stub.Exec(pb.ExecRequest(run_id=run.run_id,
                                          argv=["/usr/bin/python3", "-c", script]), timeout=60)
        for event in events:  # the first output: the connection is up
            if event.HasField("output"):
                break
        namespaces = _daemon_namespaces(handle.process.pid)
        assert len(namespaces - {_own_namespace()}) >= 1  # the egress namespace
        workers = {_ns_inode(f"/proc/{pid}/ns/net") for pid in marked_processes(script)}
        assert len(workers - namespaces - {_own_namespace()}) == 1  # the worker's slot
        namespaces |= workers
        connected = len(internet.seen)
        handle.process.send_signal(signal.SIGKILL)
        handle.process.wait()
        events.cancel()
        for _ in range(200):  # bounded: the kernel tears namespaces down asynchronously
            if not (_all_namespaces() & namespaces - {_own_namespace()}):
                break
            time.sleep(0.05)
        assert not (_all_namespaces() & namespaces - {_own_namespace()})
        assert len(internet.seen) == connected
        stop_daemon(handle, signal.SIGKILL)


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _own_namespace() -> int | None:
    return _ns_inode("/proc/self/ns/net")


def _daemon_namespaces(pid: int) -> set[int]:
    """The network namespaces the daemon's threads are in (its own, egress, uplink...)."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        inode = _ns_inode(f"/proc/{pid}/task/{tid}/ns/net")
        if inode is not None:
            found.add(inode)
    return found - {_ns_inode(f"/run/netns/{n}") for n in os.listdir("/run/netns")}


def _all_namespaces() -> set[int | None]:
    """Every network namespace a process or thread on the host is in."""
    found: set[int | None] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                found.add(_ns_inode(f"/proc/{pid}/task/{tid}/ns/net"))
    return found
