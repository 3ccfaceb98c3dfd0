"""UDP egress against the real kernel: `/udp` entries relayed by the daemon, flow by flow.

The fake internet (tests/fake_internet.py) has UDP echo servers on 198.18.0.10:7000 and :7001
(the first reached by name, `echo.test:7000/udp`) and on 198.18.0.11:7000 (reached by address,
`198.18.0.11:7000/udp`). A worker's datagram to a destination the set holds is tproxied to the
daemon's relay (agentd/egress/udp.py), which checks it again and relays it from the uplink
namespace; anything else UDP is refused by the kernel and on record. One worker script per
test checks several destinations; refusals show as a short socket timeout in the worker and as
records, never as a threshold on time.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.egress.service import _outermost
from agentd.policy.egress import parse_rule, parse_rules
from tests import fake_internet
from tests.conftest import DaemonHandle, daemon_base, execute, start_daemon, stop_daemon
from tests.test_egress import CEILING as TCP_CEILING
from tests.test_egress import write_egress_dir

ECHO, OTHER, DNS = "198.18.0.10", "198.18.0.11", "198.18.0.53"
ZONE = {"echo.test": (ECHO, 300), "other.test": (OTHER, 300)}
LIMIT = 16 * 1024
POLICY = f"""\
apiVersion: agentd/v1
kind: Policy
name: fetcher
stages:
  prototype:
    exec: {{allow: [/usr/bin/, /bin/]}}
    filesystem: {{read_only: [/usr, /bin, /lib, /lib64]}}
    network:
      egress:
        - echo.test:7000/udp
        - {OTHER}:7000/udp
        - echo.test:8080
      limits: {{bytes: {LIMIT}B, connections_per_second: 50}}
    limits: {{wall_time: 60s}}
"""

CEILING = """\
    network:
      egress: ["echo.test:*/udp", "198.18.0.0/24:*/udp", "echo.test:*"]
      limits: {bytes: 64MiB, connections_per_second: 100}
"""

PROBE = textwrap.dedent("""\
    import json, socket, sys, time
    out = {}
    for check in sys.argv[1:]:
        kind, _, arg = check.partition("=")
        if kind == "resolve":
            try:
                out[check] = sorted({a[4][0] for a in socket.getaddrinfo(arg, 7000,
                                                                         socket.AF_INET)})
            except OSError as e:
                out[check] = type(e).__name__
            continue
        if kind == "tcp":
            host, port = arg.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                out[check] = "connected"
            except OSError as e:
                out[check] = type(e).__name__
            continue
        if kind == "flows":  # flows=HOST:PORT:COUNT: a socket (a flow) each, 25 a second
            host, port, count = arg.rsplit(":", 2)
            sockets, echoed = [], []
            for i in range(int(count)):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
                sockets.append(s)
                s.sendto(b"f", (host, int(port)))
                try:
                    s.recv(100); echoed.append(i)
                except OSError:
                    pass
                time.sleep(0.04)
            out[check] = echoed
            continue
        # udp=HOST:PORT:COUNT:SIZE, from one socket: the echoes that came back
        host, port, count, size = arg.rsplit(":", 3)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
        echoes = []
        for i in range(int(count)):
            data = (str(i) * int(size))[:int(size)].encode()
            try:
                s.sendto(data, (host, int(port)))
                reply, peer = s.recvfrom(65535)
                echoes.append([len(reply), reply == data, peer[0], peer[1]])
            except OSError as e:
                echoes.append(type(e).__name__)
        s.close()
        out[check] = echoes
    print(json.dumps(out))
    """)


class Internet(fake_internet.Internet):
    def __init__(self, name: str) -> None:
        super().__init__(name, addresses=(ECHO, OTHER), dns=DNS, zone=ZONE)
        for address, port in ((ECHO, 7000), (ECHO, 7001), (OTHER, 7000), (OTHER, 7001)):
            self.serve_udp(address, port)


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    world = Internet(f"agentd-udp-{os.getpid()}")
    yield world
    world.close()


@pytest.fixture(scope="module")
def udp_daemon(internet: Internet) -> Iterator[DaemonHandle]:
    base: Path = daemon_base()
    write_egress_dir(base, internet, policy=POLICY)  # type: ignore[arg-type]
    stages = base / "policies" / "stages.yaml"
    stages.write_text(stages.read_text().replace(TCP_CEILING, CEILING))
    handle = start_daemon(base, keep_files=True)
    yield handle
    stop_daemon(handle)


def _probe(handle: DaemonHandle, *checks: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    stub = handle.stub()
    run = stub.CreateRun(pb.CreateRunRequest(agent="fetcher"))
    result = execute(stub, run.run_id, ["/usr/bin/python3", "-c", PROBE, *checks])
    assert result.outcome is not None
    assert result.outcome.exit_code == 0, result.stderr.decode()
    records = []
    for segment in sorted((handle.base / "state" / "audit").glob("audit-*.jsonl")):
        records += [json.loads(line) for line in segment.read_text().splitlines() if line]
    return [r for r in records if r.get("run_id") == run.run_id], json.loads(result.stdout)


def _details(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r["details"] for r in records if r["event"] == event]


class TestUdpEgress:
    def test_allowed_name_and_address_relayed_and_recorded(
            self, udp_daemon: DaemonHandle, internet: Internet) -> None:
        """A name's udp port (after the daemon's resolver answered it) and a literal address's
        are reached; replies come from the address and port the worker sent to; each flow is
        one `net.connection` record (protocol udp, bytes and datagrams each way) before
        exec.exited, and its datagrams reached the server."""
        before = len(internet.seen)
        records, out = _probe(udp_daemon, "resolve=echo.test", "udp=echo.test:7000:3:100",
                              f"udp={OTHER}:7000:1:10")
        assert out["resolve=echo.test"] == [ECHO]
        assert out["udp=echo.test:7000:3:100"] == [[100, True, ECHO, 7000]] * 3
        assert out[f"udp={OTHER}:7000:1:10"] == [[10, True, OTHER, 7000]]
        assert sorted(internet.seen[before:]) == sorted(
            [f"udp {ECHO}:7000 100"] * 3 + [f"udp {OTHER}:7000 10"])
        answer = _details(records, "dns.answer")[0]
        assert (answer["name"], answer["udp_ports"], answer["ports"]) == (
            "echo.test", [7000], [8080])
        flows = {d["destination"]: d for d in _details(records, "net.connection")}
        assert set(flows) == {ECHO, OTHER}
        named = flows[ECHO]
        assert {k: named[k] for k in ("protocol", "port", "name", "rule", "bytes_out",
                                      "bytes_in", "datagrams_out", "datagrams_in")} == {
            "protocol": "udp", "port": 7000, "name": "echo.test", "rule": "echo.test:7000/udp",
            "bytes_out": 300, "bytes_in": 300, "datagrams_out": 3, "datagrams_in": 3}
        assert named["result"] == "ended with the task"
        literal = flows[OTHER]
        assert (literal["name"], literal["rule"], literal["datagrams_out"],
                literal["datagrams_in"]) == ("", f"{OTHER}:7000/udp", 1, 1)
        events = [r["event"] for r in records]
        assert max(i for i, e in enumerate(events) if e == "net.connection") < events.index(
            "exec.exited")
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["connections"] == 2
        assert not _details(records, "net.refused")

    def test_unlisted_port_and_host_refused_and_recorded(
            self, udp_daemon: DaemonHandle, internet: Internet) -> None:
        """UDP to a port no entry names (on an allowed name's address, and on an allowed
        address) and to a host no entry names is dropped by the kernel: the worker gets no
        answer, the server sees nothing, and each is a `net.refused` record (plus the kernel's
        counts). A /udp entry grants no TCP: the port is refused in the worker, before any
        packet (by the launcher's watch, and by Landlock behind it), on record too."""
        before = len(internet.seen)
        records, out = _probe(udp_daemon, "resolve=echo.test", "udp=echo.test:7001:1:5",
                              f"udp={OTHER}:7001:1:5", "udp=198.18.0.12:7000:1:5",
                              f"tcp={OTHER}:7000")
        assert out["udp=echo.test:7001:1:5"] == ["TimeoutError"]
        assert out[f"udp={OTHER}:7001:1:5"] == ["TimeoutError"]
        assert out["udp=198.18.0.12:7000:1:5"] == ["TimeoutError"]
        assert out[f"tcp={OTHER}:7000"] == "PermissionError"
        assert internet.seen[before:] == []
        refused = _details(records, "net.refused")
        assert [(d["protocol"], d["destination"], d["port"]) for d in refused
                if d["by"] == "worker"] == [("tcp", OTHER, 7000)]
        refused = [d for d in refused if d["by"] != "worker"]
        assert sorted((d["protocol"], d["destination"], d["port"]) for d in refused) == [
            ("udp", ECHO, 7001), ("udp", OTHER, 7001), ("udp", "198.18.0.12", 7000)]
        assert {d["reason"] for d in refused} == {
            "no egress entry allows UDP to this destination"}
        assert next(d for d in refused if d["destination"] == ECHO)["name"] == "echo.test"
        assert _details(records, "net.dropped")[0]["packets"] == {"udp": 3}
        assert not _details(records, "net.connection")

    def test_open_flows_capped(self, udp_daemon: DaemonHandle, internet: Internet) -> None:
        """A task has at most MAX_OPEN (64) connections and UDP flows open at once: 70 flows
        opened within the rate limit (each its own socket, open until the task ends), the 64
        first relayed, the rest refused on record, none of them reaching the server."""
        before = len(internet.seen)
        records, out = _probe(udp_daemon, f"flows={OTHER}:7000:70")
        assert out[f"flows={OTHER}:7000:70"] == list(range(64))
        assert len(internet.seen) - before == 64
        refused = _details(records, "net.refused")
        assert [d["reason"] for d in refused] == [
            "64 connections of this task are open already"] * 6
        assert len(_details(records, "net.connection")) == 64

    def test_byte_limit_holds(self, udp_daemon: DaemonHandle, internet: Internet) -> None:
        """Datagrams both ways count against limits.bytes: the one that would pass it is not
        sent, the flow ends (its record says why), and the next datagram, a new flow over the
        budget, is refused on record. Nothing past the limit reached the server."""
        before = len(internet.seen)
        size, count = 1000, 12  # 12 round trips of 2000 bytes: past 16 KiB at the 9th
        records, out = _probe(udp_daemon, f"udp={OTHER}:7000:{count}:{size}")
        echoes = out[f"udp={OTHER}:7000:{count}:{size}"]
        relayed = LIMIT // (2 * size)
        assert echoes[:relayed] == [[size, True, OTHER, 7000]] * relayed
        assert set(map(str, echoes[relayed:])) == {"TimeoutError"}
        seen = internet.seen[before:]
        assert sum(int(s.rsplit(" ", 1)[1]) for s in seen) * 2 <= LIMIT
        flows = _details(records, "net.connection")
        assert len(flows) == 1
        assert flows[0]["result"] == "limits.bytes reached"
        assert flows[0]["bytes_out"] + flows[0]["bytes_in"] <= LIMIT
        assert flows[0]["datagrams_in"] == relayed
        refused = _details(records, "net.refused")
        assert {d["reason"] for d in refused} == {"limits.bytes reached"}
        assert {d["by"] for d in refused} == {"udp-relay"}
        exited = next(r for r in records if r["event"] == "exec.exited")
        assert exited["details"]["egress"]["bytes"] <= LIMIT


def test_udp_entries_are_their_own_grants() -> None:
    """A /udp entry is said as UDP, goes to the UDP set even inside a TCP network on the same
    port, and a TCP entry does not hide it (nor the reverse)."""
    assert parse_rule("ntp.example.org:123/udp").in_words().endswith("UDP port 123")
    rules = parse_rules(["198.18.0.0/24:7000", "198.18.0.10:7000/udp", "198.18.0.10:7000"])
    assert [r.text for r in _outermost(rules)] == ["198.18.0.0/24:7000", "198.18.0.10:7000/udp"]
