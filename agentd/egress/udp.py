"""The UDP relay: what carries a worker's datagrams to a destination a `/udp` entry allows.

    worker ──udp──▶ egress netns: nft `from_workers`
                    (worker, destination, port) in @allowed_udp, or a flow already answered
                      └─ tproxy to 127.0.0.1:UDP_PORT, marked; `fwmark → local` routing
                         delivers it here with its destination unchanged
                    else: `jump refuse` (counted, NFLOG, a `net.refused` record)

A datagram reaches the relay's listener (IP_TRANSPARENT, so the kernel may hand it datagrams
for any address) with its original destination beside it (IP_RECVORIGDSTADDR). The first of
a flow (worker address and port, destination and port) is checked again here, as the proxy
checks a connection: an entry of the task, or a resolver answer whose TTL has not ended, for
UDP on that port; the byte budget; the connection rate (a new flow counts as a connection).
Refused, it is a `net.refused` record (by "udp-relay", within the task's refusal budget) and
nothing is sent. Allowed, the flow gets two sockets:

- toward the worker, a transparent socket bound to the destination's (address, port) and
  connected to the worker's: replies leave from the address and port the worker sent to, and
  the kernel's tproxy finds this connected socket first for the flow's next datagrams (the
  standard TPROXY UDP pattern), so only a flow's first datagram goes through the listener;
- toward the destination, a socket made in the uplink namespace (as the proxy's TCP), connected
  to it, so only the destination's datagrams come back.

Every datagram either way is counted against the task's byte budget; one that would pass it is
not sent and ends the flow. A flow ends when it has been idle for IDLE seconds, when either
socket reports an error (an ICMP port unreachable, say), or when the task closes (its flows are
in `TaskEgress.open`, cancelled by EgressService.close). It is one record when it ends:
`net.connection` with protocol "udp", destination, port, name, rule, bytes and datagrams each
way, seconds and result.

Why by hand rather than asyncio's datagram endpoints: the listener needs recvmsg's ancillary
data (the original destination), which a DatagramProtocol does not receive; the flows' sockets
use the loop's sock_recv/sock_sendall, so the relay is one coroutine per flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agentd.egress.task import MAX_OPEN, TaskEgress
from agentd.sandbox import netns
from agentd.sandbox.egress import UDP_PORT

log = structlog.get_logger("agentd.egress")

IDLE = 30.0
"""Seconds without a datagram either way after which a flow ends."""
MAX_DATAGRAM = 65535
# linux/in.h (Python's socket module does not name them)
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR = 20
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address
_PENDING = 64  # datagrams of a flow kept while its sockets are made; more are dropped

FlowKey = tuple[str, int, str, int]
"""(worker address, worker port, destination address, destination port)."""


class _OverBudget(Exception):
    """A datagram would pass the task's byte budget."""


@dataclass
class _Flow:
    task: TaskEgress
    key: FlowKey
    details: dict[str, Any]
    pending: list[bytes] = field(default_factory=list)
    """Datagrams that came through the listener before the flow's sockets existed."""
    upstream: socket.socket | None = None
    """Set once the pending datagrams are sent: a late one from the listener goes straight
    there."""
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    sizes: list[int] = field(default_factory=lambda: [0, 0])  # bytes out (to the destination), in
    datagrams: list[int] = field(default_factory=lambda: [0, 0])
    recorded: bool = False

    def charge(self, side: int, data: bytes) -> None:
        """Counts a datagram against the task's budget before it is sent, or refuses it."""
        if self.task.bytes_used + len(data) > self.task.bytes_limit:
            raise _OverBudget
        self.task.bytes_used += len(data)
        self.sizes[side] += len(data)
        self.datagrams[side] += 1
        self.last = time.monotonic()


def listener() -> socket.socket:
    """The relay's listener: made in the egress namespace (by its thread), where nft's tproxy
    sends allowed datagrams."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind(("127.0.0.1", UDP_PORT))
    except BaseException:
        sock.close()
        raise
    return sock


def _toward_worker(destination: tuple[str, int], worker: tuple[str, int]) -> socket.socket:
    """A flow's socket on the worker's side, in the egress namespace: bound to the address
    and port the worker sent to (IP_TRANSPARENT: not an address of the namespace;
    SO_REUSEADDR: other flows to that destination have one too) and connected to the worker."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(destination)
        sock.connect(worker)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _original_destination(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 16:
            port, packed = _SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntoa(packed), port
    return None


class UdpRelay:
    """The listener and its flows. `task_of` maps a worker's address to its task."""

    def __init__(self, task_of: Callable[[str], TaskEgress | None], egress: netns.Namespace,
                 uplink: netns.Namespace) -> None:
        self._task_of = task_of
        self._egress = egress
        self._uplink = uplink
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flows: dict[FlowKey, _Flow] = {}

    def start(self, sock: socket.socket) -> None:
        """Reads `sock` (a `listener()`) on the running loop."""
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._read)

    def stop(self) -> None:
        """Stops reading the listener (closing it is the caller's; flows end with their
        tasks)."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock = None

    def drain(self) -> None:
        """Takes every datagram waiting on the listener now (a task that ends: its last
        datagrams become flows, ended and recorded with it, not unattributed later)."""
        self._read()

    def _read(self) -> None:
        """Every datagram waiting on the listener (the loop calls it when readable)."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, ancillary, _flags, source = sock.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_SOCKADDR_IN.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an error queued on the socket: the next read goes on
                log.warning("egress.udp_listener", error=str(exc))
                continue
            destination = _original_destination(ancillary)
            if destination is not None:
                self._datagram(data, source, destination)

    def _datagram(self, data: bytes, source: tuple[str, int],
                  destination: tuple[str, int]) -> None:
        task = self._task_of(source[0])
        if task is None:
            log.info("egress.udp_unattributed", source=source[0], destination=destination[0])
            return
        key: FlowKey = (source[0], source[1], destination[0], destination[1])
        flow = self._flows.get(key)
        if flow is not None:  # its sockets are being made, or it was read late
            if flow.upstream is None:
                if len(flow.pending) < _PENDING:
                    flow.pending.append(data)
                return
            with contextlib.suppress(_OverBudget, OSError):  # dropped, as UDP may be
                flow.charge(0, data)
                flow.upstream.send(data)
            return
        address, port = destination
        details: dict[str, Any] = {"destination": address, "port": port, "protocol": "udp",
                                   "by": "udp-relay"}
        allowed = task.destination(address, port, "udp")
        reason = (task.why_refused(address, port, "udp") if allowed is None else
                  "limits.bytes reached" if task.bytes_used + len(data) > task.bytes_limit
                  else f"{MAX_OPEN} connections of this task are open already"
                  if len(task.open) >= MAX_OPEN else task.over_limits())
        if reason:
            task.refused += 1
            task.refusal({**details, "reason": reason})
            return
        assert allowed is not None
        details.update(name=allowed[0], rule=allowed[1])
        flow = self._flows[key] = _Flow(task, key, details, [data])
        task.connections += 1
        job = asyncio.ensure_future(self._run(flow))
        task.open.add(job)
        job.add_done_callback(task.open.discard)
        # A job cancelled before its first step never runs its body: it ends here then.
        job.add_done_callback(lambda _job: self._end(flow, "ended with the task"))

    async def _run(self, flow: _Flow) -> None:
        """One flow from its first datagram to its record."""
        worker = upstream = None
        result = "idle"
        try:
            destination = (flow.key[2], flow.key[3])
            worker = await asyncio.wrap_future(self._egress.submit(
                lambda: _toward_worker(destination, (flow.key[0], flow.key[1]))))
            upstream = await asyncio.wrap_future(self._uplink.submit(
                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)))
            upstream.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(upstream, destination)
            while flow.pending:  # the kernel now hands the flow's datagrams to `worker`
                data = flow.pending.pop(0)
                flow.charge(0, data)
                await loop.sock_sendall(upstream, data)
            flow.upstream = upstream
            result = await self._carry(flow, worker, upstream)
        except _OverBudget:
            result = "limits.bytes reached"
        except asyncio.CancelledError:
            result = "ended with the task"
        except OSError as exc:
            result = f"error: {exc.strerror or exc}"
        except Exception as exc:  # a bug here must not lose the flow's record
            log.exception("egress.udp_failed", destination=flow.key[2])
            result = f"error: {exc!r}"[:200]
        finally:
            for sock in (worker, upstream):
                if sock is not None:
                    sock.close()
            self._end(flow, result)

    def _end(self, flow: _Flow, result: str) -> None:
        """The flow's one record (the first call; the job's done callback is the second)."""
        if flow.recorded:
            return
        flow.recorded = True
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        flow.task.record("net.connection", {
            **flow.details, "bytes_out": flow.sizes[0], "bytes_in": flow.sizes[1],
            "datagrams_out": flow.datagrams[0], "datagrams_in": flow.datagrams[1],
            "seconds": round(time.monotonic() - flow.started, 6), "result": result})

    @staticmethod
    async def _carry(flow: _Flow, worker: socket.socket, upstream: socket.socket) -> str:
        """Datagrams both ways until the flow idles out; raises what ends it otherwise."""
        loop = asyncio.get_running_loop()

        async def pump(source: socket.socket, sink: socket.socket, side: int) -> None:
            while True:
                data = await loop.sock_recv(source, MAX_DATAGRAM)
                flow.charge(side, data)
                await loop.sock_sendall(sink, data)

        async def idle() -> None:
            while (left := flow.last + IDLE - time.monotonic()) > 0:
                await asyncio.sleep(left)

        jobs = [asyncio.ensure_future(pump(worker, upstream, 0)),
                asyncio.ensure_future(pump(upstream, worker, 1)),
                asyncio.ensure_future(idle())]
        try:
            done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            for job in done:
                job.result()  # a pump's error ends the flow with it
            return "idle"
        finally:
            for job in jobs:
                job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*jobs, return_exceptions=True)
