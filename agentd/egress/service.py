"""The daemon's egress service: the resolver, the transparent proxy and the refusal log.

Everything runs on the daemon's event loop, on sockets made once in the egress namespace
(agentd/sandbox/egress.py) and, for the way out, in the uplink namespace:

- **Resolver** (UDP, RESOLVER:53): a worker's query for a name no domain or wildcard entry
  allows is answered REFUSED and recorded (`dns.refused`). An allowed A query is forwarded to
  the configured upstream; the answer's addresses are checked (an address in loopback,
  private, link-local or shared space is DNS rebinding: dropped from the answer and recorded
  unless an address entry names it), put in the nft sets for the ports of the entries that
  allow the name (`allowed` for TCP, `allowed_udp` for /udp) with the answer's TTL as
  timeout, remembered with the same expiry for the proxy and the UDP relay, and only then is
  the answer sent (`dns.answer`). Other query types get an empty answer (workers have no IPv6).
- **Proxy** (TCP, PROXY_PORT, every allowed connection redirected to it by nft): reads the
  original destination (SO_ORIGINAL_DST), checks it again against the task (an entry, or a
  resolver answer whose TTL has not ended), its connection rate and its byte budget, connects
  from the uplink namespace and copies both ways. Each attempt is one record when it ends:
  `net.connection` (destination, name, rule, bytes each way, seconds) or `net.refused`.
- **Refusal listener** (TCP, REFUSED_PORT): nft redirects every new TCP connection whose
  (worker, destination, port) is not in the set here, so a refused connection is a record too
  (`net.refused`: destination, port, the name the resolver gave this task for that address if
  any, and why), then a reset. It never connects anywhere.
- **UDP relay** (agentd/egress/udp.py): datagrams nft found in `allowed_udp` are tproxied to
  it; it checks each new flow again (destination, byte budget, rate), relays it from the
  uplink namespace, and records it when it ends (`net.connection`, protocol udp, bytes and
  datagrams each way) or refuses it (`net.refused`, by "udp-relay").
- **Kernel refusals** (everything else nft drops: UDP the set lacks, DNS to another server,
  ICMP; agentd/sandbox/nflog.py): each logged packet is a `net.refused` record (by
  "nft", with the DNS question of a query to another server), at most LOG_RATE a second per
  worker; all are counted by nft per worker address, and the counts are one `net.dropped`
  record when the task ends.
- **HTTPS proxy** (TCP, RESOLVER:CONNECT_PORT, the workers' https_proxy): `CONNECT
  host:port` is checked by name (a domain or wildcard entry on that port; an IP literal as on
  the transparent path), resolved by the daemon (rebinding refused), connected, and carried.
  A refused CONNECT is answered 403 (405 for another method, 400 for a request it cannot
  read) and recorded (`net.refused`, by "https-proxy").
- **What a connection carries** (both paths, `_carry`): the worker's first bytes decide,
  read until it is clear (`_classify`, bounded in bytes and time). A TLS ClientHello has its
  server name checked: through CONNECT it must be the host named; to an address a name let
  through, a name an entry allows on that port; on such a connection a ClientHello with no
  name, or one that cannot be read, is refused (fail closed). An HTTP/1.x request line,
  however split, goes request by request (agentd/egress/http.py), each Host checked the same
  way (421 otherwise). So a name no entry allows cannot ride an address it shares with an
  allowed one (a CDN) by SNI or Host; inside TLS the proxy does not end, a Host differing
  from the SNI (domain fronting) cannot be seen. Anything else, or a destination that speaks
  first, is copied as is. A task has at most MAX_OPEN connections open at once. When a secret
  of the policy goes to the server name, TLS ends here: the worker gets a certificate of its
  run's CA (agentd/egress/tls.py; only that run's workers trust it, and it can vouch only for
  the secrets' names), the destination is verified against the host's trust store (and
  `egress_upstream_ca`), and each request's Host must be that name; the secret's header is
  replaced by the daemon's value (agentd/egress/secrets.py), and a response sending it back
  is cut before it reaches the worker. Records name the secret, never its value.
- Refused before any packet exists, so with no per-attempt record: a port no entry names
  (Landlock, EACCES in the worker), IPv6 (no address in the slot) and raw or ping sockets (the
  worker has no CAP_NET_RAW over the slot's namespace).

A worker is known by its slot's address: the source address of everything it sends.

Choice between an IP path and a proxy path: forwarding allowed packets by IP (nft accept and
masquerade to an uplink) costs nothing per byte, but a connection would outlive the daemon
(the kernel keeps forwarding), its bytes and end would not be on record, a byte or rate limit
would need more rules per task, and a domain rule could only be enforced by the addresses a
name resolved to, which a CDN shares with names nobody allowed. Every connection through a
proxy costs a copy per byte and a thread-free asyncio task, and makes "nothing leaves without
the daemon" a property of the topology. Both ways a worker reaches the proxy end in the same
checks: the transparent path (a tool that resolves and connects itself: admitted by address,
then held to the name in its TLS server name or Host) and the HTTPS proxy (a tool that honours
https_proxy: admitted by name, resolved by the daemon, then held to that name). The proxy
path is the stricter one for names: the worker never needs an address, so an answer's TTL or a
shared address cannot widen what a rule allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import structlog
from dnslib import QTYPE, RCODE, RR, DNSRecord

from agentd.egress import secrets as secret_store
from agentd.egress.http import MAX_HEAD, Refused, relay
from agentd.egress.secrets import DEFAULT_DIRECTORY
from agentd.egress.task import MAX_OPEN, Recorder, TaskEgress
from agentd.egress.tls import (
    BUNDLE_PATH,
    MAX_HELLO,
    TRUST_ENV,
    Authorities,
    NotTls,
    TlsEnd,
    client_hello_name,
)
from agentd.egress.udp import UdpRelay, listener
from agentd.policy import EffectivePolicy
from agentd.policy.egress import (
    EgressRule,
    address_rule,
    name_matches,
    parse_rules,
)
from agentd.sandbox import netns, nflog
from agentd.sandbox.egress import (
    CONNECT_PORT,
    LOG_GROUP,
    MAX_TTL,
    PROXY_PORT,
    REFUSED_PORT,
    RESOLVER,
    EgressNetwork,
    SlotPool,
)

log = structlog.get_logger("agentd.egress")

SO_ORIGINAL_DST = 80
UPSTREAM_TIMEOUT = 3.0
CONNECT_TIMEOUT = 10.0
_CHUNK = 64 * 1024
_REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/\d\.\d")


@dataclass(frozen=True)
class EgressConfig:
    """Where the way out is: the upstream DNS server and the uplink namespace."""

    upstream: tuple[str, int]
    """The DNS server allowed names are forwarded to (reached from the uplink namespace)."""
    uplink: str | None = None
    """A network namespace file (/run/netns/NAME) to connect out from; None: the daemon's."""
    slots: int = 2
    """Worker slots kept ready."""
    credentials: Path = Path(DEFAULT_DIRECTORY)
    """Where the policy's secrets are read from (agentd/egress/secrets.py)."""
    runtime: Path = Path("/run/agentd")
    """Where the per-run trust bundles are written (workers mount them read-only)."""
    upstream_ca: str | None = None
    """A CA file trusted for destinations besides the host's (a private CA; tests)."""


def upstream_from_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The host's first IPv4 nameserver (the default upstream)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and "." in parts[1]:
                    return parts[1], 53
    except OSError:
        pass
    return "127.0.0.53", 53


class EgressService:
    """Started once by the daemon when egress is configured; `open` a task, `close` it."""

    def __init__(self, config: EgressConfig) -> None:
        self.config = config
        self.network = EgressNetwork()
        self._by_address: dict[str, TaskEgress] = {}
        self._uplink: netns.Namespace | None = None
        self._slots: SlotPool | None = None
        self._sockets: list[socket.socket] = []
        self._server: asyncio.AbstractServer | None = None
        self._refusals: asyncio.AbstractServer | None = None
        self._log: socket.socket | None = None
        self._refusal_socket: socket.socket | None = None
        self.log_lost = 0
        """Times the kernel's log overflowed (ENOBUFS): packets refused and counted, not
        recorded one by one."""
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_server: asyncio.AbstractServer | None = None
        self._udp: UdpRelay | None = None
        self.authorities = Authorities(config.runtime / "egress-ca")
        self._upstream_tls = ssl.create_default_context()
        if config.upstream_ca:
            self._upstream_tls.load_verify_locations(config.upstream_ca)
        self._upstream_tls.set_alpn_protocols(["http/1.1"])

    async def start(self) -> None:
        """Makes the egress namespace and its sockets; raises OSError if the kernel cannot."""
        loop = self._loop = asyncio.get_running_loop()
        ns = await asyncio.to_thread(self.network.start)
        uplink_fd = netns.open_path(self.config.uplink) if self.config.uplink else None
        self._uplink = netns.Namespace(uplink_fd, "uplink")

        def sockets() -> list[socket.socket]:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            udp.bind((RESOLVER, 53))
            return [udp, socket.create_server(("0.0.0.0", PROXY_PORT), backlog=256),
                    socket.create_server(("0.0.0.0", REFUSED_PORT), backlog=256),
                    nflog.open_group(LOG_GROUP),
                    socket.create_server((RESOLVER, CONNECT_PORT), backlog=256),
                    listener()]

        await asyncio.to_thread(self.authorities.start)
        made = await asyncio.to_thread(ns.call, sockets)
        self._sockets += made
        udp, tcp, self._refusal_socket, self._log, connect, relayed = made
        for sock in made:
            sock.setblocking(False)
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Resolver(self), sock=udp)
        self._server = await asyncio.start_server(self._on_connection, sock=tcp)
        self._refusals = await asyncio.start_server(self._on_refused,
                                                    sock=self._refusal_socket)
        self._connect_server = await asyncio.start_server(self._on_connect, sock=connect)
        loop.add_reader(self._log.fileno(), self._read_log)
        self._udp = UdpRelay(self._by_address.get, ns, self._uplink)
        self._udp.start(relayed)
        self.network.start_maker()  # on the loop's thread, which lives as long as the daemon
        self._slots = SlotPool(self.network, self.config.slots)

    async def open(self, run_id: str, task_id: str, policy: EffectivePolicy,
                   recorder: Recorder, secrets: tuple[secret_store.LoadedSecret, ...] = ()
                   ) -> TaskEgress:
        """A slot for one task, with its literal addresses and networks allowed and, if it
        has `secrets` (the policy's, read by `load_secrets` before anything was made for the
        task), its run's CA."""
        assert self._slots is not None, "start() first"
        authority = None
        if secrets:
            domains = tuple(sorted({d for s in secrets for d in s.rule.domains}))
            authority = await asyncio.to_thread(self.authorities.of, run_id, domains)
        slot = self._slots.take_ready()  # on the loop: a ready slot needs no thread
        if slot is None:
            slot = await asyncio.to_thread(self._slots.take)  # made now (blocking)
        rules = parse_rules(policy.egress)
        task = TaskEgress(run_id, task_id, rules, policy.egress_bytes,
                          policy.egress_connections_per_second, slot, recorder,
                          log_lost_at_open=self.log_lost, secrets=secrets, authority=authority,
                          bundle=str(self.authorities.bundle_path(authority))
                          if authority is not None else "")
        grants = {protocol: [(rule.target, rule.port, None) for rule in _outermost(rules)
                             if rule.port is not None and rule.protocol == protocol]
                  for protocol in ("tcp", "udp")}
        try:
            for protocol, granted in grants.items():
                if granted:  # one nft transaction for all of a set's
                    await asyncio.to_thread(self.network.allow_all, slot, granted, protocol)
        except BaseException:
            await asyncio.to_thread(self.network.release, slot)
            raise
        self._by_address[slot.address] = task
        return task

    def load_secrets(self, policy: EffectivePolicy) -> tuple[secret_store.LoadedSecret, ...]:
        """The policy's secret values (blocking); SecretUnavailable says which and why."""
        return secret_store.load(self.config.credentials, policy.egress_secrets)

    async def close(self, task: TaskEgress) -> None:
        """After the task's worker is gone: its open connections are ended (and recorded),
        its set elements and slot released."""
        if task.slot.fd < 0:
            return  # closed already
        if self._udp is not None:
            self._udp.drain()
        for connection in list(task.open):
            connection.cancel()
        if task.open:
            await asyncio.gather(*task.open, return_exceptions=True)
        # The worker is gone: the log holds every packet of it the kernel refused (one
        # message per packet, sent as it was dropped), and the refusal listener's backlog
        # every refused connection not yet accepted (a worker that connects and exits at
        # once); take both before the counts.
        self._read_log()
        self._drain_refusals()
        # Every worker's first refused packet is logged (a new address starts with a full
        # log budget): with none logged and no log overflow, there is nothing to count, and
        # the task's end does not wait for nft.
        dropped = (await asyncio.to_thread(self.network.take_dropped, task.slot)
                   if task.logged or self.log_lost != task.log_lost_at_open else {})
        if dropped:
            task.record("net.dropped", {"packets": dropped, "refusals_recorded": task.refusals,
                                        "refusals_unrecorded": task.unrecorded})
        task.dropped_packets = dropped
        self._by_address.pop(task.slot.address, None)
        await asyncio.to_thread(self.network.release, task.slot)

    async def stop(self) -> None:
        """Closes every socket and the namespaces' threads: the egress namespace is gone."""
        if self._server is not None:
            self._server.close()
        if self._refusals is not None:
            self._refusals.close()
        if self._connect_server is not None:
            self._connect_server.close()
        if self._log is not None and self._loop is not None:
            self._loop.remove_reader(self._log.fileno())
        if self._transport is not None:
            self._transport.close()
        if self._udp is not None:
            self._udp.stop()
        for sock in self._sockets:
            sock.close()
        if self._slots is not None:
            await asyncio.to_thread(self._slots.close)
        if self._uplink is not None:
            self._uplink.close()
        await asyncio.to_thread(self.network.close)

    # -- proxy --------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        task = self._admit(writer, "proxy")
        if task is None:
            return
        current = asyncio.current_task()
        assert current is not None
        task.open.add(current)
        try:
            await self._proxy(task, sock, reader, writer)
        finally:
            task.open.discard(current)

    def _admit(self, writer: asyncio.StreamWriter, door: str) -> TaskEgress | None:
        """The task a new connection on `door` comes from, or None (and a reset): from no
        task's worker, or over the task's MAX_OPEN at once (then on record)."""
        peer = writer.get_extra_info("peername")
        task = self._by_address.get(peer[0]) if peer else None
        if task is not None and len(task.open) >= MAX_OPEN:
            task.refused += 1
            task.refusal({"destination": "?", "port": 0, "protocol": "tcp", "by": door,
                          "reason": f"{MAX_OPEN} connections of this task are open already"})
            task = None
        if task is None:
            _reset(writer)
        return task

    async def _on_refused(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """A new TCP connection nft did not find in the set: on record, then reset."""
        peer = writer.get_extra_info("peername")
        self._refuse(writer.get_extra_info("socket"), peer[0] if peer else "")
        _reset(writer)

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        task = self._by_address.get(peer)
        if task is None:
            return
        try:
            address, port = _original_destination(sock)
        except OSError:  # its conntrack entry is gone: still an attempt, destination unknown
            address, port = "?", 0
        task.refused += 1
        task.refusal({"destination": address, "port": port, "protocol": "tcp", "by": "nft",
                      "reason": task.why_refused(address, port)})

    def _drain_refusals(self) -> None:
        """Accepts, records and resets every connection waiting on the refusal listener
        (on the loop's thread; the server then finds the backlog empty)."""
        if self._refusal_socket is None:
            return
        while True:
            try:
                sock, peer = self._refusal_socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ECONNABORTED: gone before it was accepted
            with sock:
                self._refuse(sock, peer[0])
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))

    async def _proxy(self, task: TaskEgress, sock: socket.socket, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        address, port = _original_destination(sock)
        details: dict[str, Any] = {"destination": address, "port": port, "by": "proxy"}
        allowed = task.destination(address, port)
        reason = (task.why_refused(address, port) if allowed is None else
                  self._over_limits(task))
        if reason:
            task.refused += 1
            task.refusal({**details, "protocol": "tcp", "reason": reason})
            _reset(writer)
            return
        assert allowed is not None
        details.update(name=allowed[0], rule=allowed[1])
        await self._forward(task, details, reader, writer)

    @staticmethod
    def _over_limits(task: TaskEgress) -> str:
        """Why a new connection is over the task's limits, or ""."""
        return task.over_limits()

    async def _forward(self, task: TaskEgress, details: dict[str, Any],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                       connect_host: str = "", initial: bytes = b"") -> None:
        """Connects to the decided destination and carries the connection (`_carry`); one
        record when it ends: `net.connection`, or `net.refused` if what the worker sent was
        refused before anything reached the destination. `connect_host`: the host a CONNECT
        named (the proxy answers it once connected)."""
        task.connections += 1
        started = time.monotonic()
        counts = [0, 0]  # out (worker -> destination), in
        result = "closed"
        upstream: asyncio.StreamWriter | None = None
        carried: list[int] = [0]  # requests or opaque bytes that reached the destination
        try:
            try:
                upstream_reader, upstream = await self._connect(details["destination"],
                                                                details["port"])
            except OSError:
                if connect_host:
                    await _answer(writer, 502, "the destination cannot be reached")
                raise
            if connect_host:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            result = await self._carry(task, details, reader, writer, upstream_reader,
                                       upstream, counts, carried, connect_host, initial)
        except Refused as exc:
            result = f"refused: {exc}"
            task.refused += 1
            await _linger(reader, writer)  # the error response is read, not lost to a reset
            if not carried[0]:
                task.refusal({**details, "protocol": "tcp", "reason": str(exc)})
                return
        except asyncio.CancelledError:
            result = "ended with the task"
        except OSError as exc:
            result = f"error: {exc.strerror or exc}"
        except h11.ProtocolError as exc:
            result = f"error: not HTTP/1.1: {exc}"[:200]
        except Exception as exc:  # a bug here must not lose the connection's record
            log.exception("egress.proxy_failed", destination=details.get("destination"))
            result = f"error: {exc!r}"[:200]
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.close()
            if not result.startswith("refused") or carried[0]:
                task.record("net.connection", {**details, "bytes_out": counts[0],
                                               "bytes_in": counts[1], "result": result,
                                               "seconds": round(time.monotonic() - started, 6)})

    async def _carry(self, task: TaskEgress, details: dict[str, Any],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     upstream_reader: asyncio.StreamReader, upstream: asyncio.StreamWriter,
                     counts: list[int], carried: list[int], connect_host: str,
                     initial: bytes) -> str:
        """What the worker sends first decides how it is carried (see the module docstring):
        TLS has its server name checked (and ends here if a secret goes to that name), plain
        HTTP goes request by request with each Host checked, anything else is copied."""
        first = initial or await self._first_from_worker(reader, upstream_reader, writer,
                                                         task, counts)
        if first is None or not first:
            # The destination spoke first (SSH, SMTP...) or the worker closed: copied as is.
            await self._pumps(task, reader, writer, upstream_reader, upstream, counts, carried)
            return "limits.bytes reached" if task.bytes_used >= task.bytes_limit else "closed"
        # Admitted by a name (the resolver's answer, or CONNECT's host): what the worker sends
        # must not name another one. Read until it is clear what it is (bounded in bytes and
        # time); TLS that cannot be read or names nothing, on such a connection, is refused.
        name_rule = details.get("name") or connect_host
        async with asyncio.timeout(CONNECT_TIMEOUT):
            kind, first, sni = await _classify(reader, first)
        if kind == "tls":
            if sni is None and name_rule:
                raise Refused("a TLS ClientHello the proxy cannot read (malformed, or over"
                              f" {MAX_HELLO // 1024} KiB) to an address admitted by name")
            if sni is not None:
                details["sni"] = sni
                why = self._sni_refusal(task, sni, details["port"], name_rule, connect_host)
                if why:
                    raise Refused(why)
                if sni and task.authority is not None and secret_store.names_for(
                        task.secrets, sni):
                    return await self._intercept(task, details, sni, first, reader, writer,
                                                 upstream_reader, upstream, counts, carried)
        elif kind == "http" and name_rule:
            port = details["port"]

            def check_host(host: str) -> str:
                if connect_host:
                    return "" if host == connect_host else \
                        f"Host {host} differs from the CONNECT host {connect_host}"
                return "" if host == details["destination"] or task.name_allowed(host, port) \
                    else f"Host {host} is not allowed on port {port} (no egress entry names it)"

            counted = _Counted(_Stream(reader, writer), task, counts, first)
            requests = await relay(counted, _Upstream(upstream_reader, upstream, carried),
                                   check_host=check_host)
            details["requests"] = requests
            return "closed"
        _charge(task, counts, 0, len(first))
        upstream.write(first)
        carried[0] += len(first)
        await self._pumps(task, reader, writer, upstream_reader, upstream, counts, carried)
        return "limits.bytes reached" if task.bytes_used >= task.bytes_limit else "closed"

    async def _first_from_worker(self, reader: asyncio.StreamReader,
                                 upstream_reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter, task: TaskEgress,
                                 counts: list[int]) -> bytes | None:
        """The worker's first bytes, or None if the destination spoke first (its bytes are
        then passed on to the worker here)."""
        from_worker = asyncio.ensure_future(reader.read(_CHUNK))
        from_upstream = asyncio.ensure_future(upstream_reader.read(_CHUNK))
        try:
            await asyncio.wait({from_worker, from_upstream},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (from_worker, from_upstream):
                if not pending.done():
                    pending.cancel()
                    # its stream is free for the next read only once the cancel is through
                    await asyncio.gather(pending, return_exceptions=True)
        if from_worker.done() and not from_worker.cancelled():
            if from_upstream.done() and not from_upstream.cancelled() and from_upstream.result():
                # Both at once: the destination's bytes are not lost.
                data = from_upstream.result()
                _charge(task, counts, 1, len(data))
                writer.write(data)
            return from_worker.result()
        data = from_upstream.result()
        _charge(task, counts, 1, len(data))
        writer.write(data)
        return None

    @staticmethod
    def _sni_refusal(task: TaskEgress, sni: str, port: int, name_rule: str,
                     connect_host: str) -> str:
        """Why a ClientHello's server name is refused, or "". Through CONNECT it must be the
        host named; to an address a name let through, a name an entry allows on this port
        (two names an entry allows may share an address; a third name may not ride it)."""
        if not name_rule:
            return ""  # admitted by address (an ip or cidr entry): any name, or none
        if not sni:
            return ("a TLS ClientHello without a server name, to an address admitted by name"
                    " (the name it is for cannot be checked)")
        if connect_host:
            return "" if sni == connect_host else \
                f"TLS server name {sni} differs from the CONNECT host {connect_host}"
        return "" if task.name_allowed(sni, port) else \
            f"TLS server name {sni} is not allowed on port {port} (no egress entry names it)"

    async def _intercept(self, task: TaskEgress, details: dict[str, Any], name: str,
                         hello: bytes, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, upstream_reader: asyncio.StreamReader,
                         upstream: asyncio.StreamWriter, counts: list[int],
                         carried: list[int]) -> str:
        """TLS to a name a secret goes to ends here: the worker gets a certificate of its
        run's CA, the destination is verified against the host's trust (and upstream_ca), and
        each request gets the secret's header, its Host held to `name`."""
        assert task.authority is not None
        details["tls"] = "ended at the proxy"
        details["secrets"] = secret_store.names_for(task.secrets, name)
        context = await asyncio.to_thread(task.authority.context_for, name)
        _charge(task, counts, 0, len(hello))
        worker = TlsEnd(context, reader, writer, hello)
        await asyncio.wait_for(worker.handshake(), CONNECT_TIMEOUT)
        try:
            await asyncio.wait_for(upstream.start_tls(self._upstream_tls, server_hostname=name),
                                   CONNECT_TIMEOUT)
        except ssl.SSLError as exc:
            raise Refused(f"the destination's certificate for {name} is not trusted"
                          f" ({exc.reason or exc}); no secret was sent") from None

        def check_host(host: str) -> str:
            return "" if host == name else \
                f"Host {host} differs from the TLS server name {name}, which the secret is for"

        requests = await relay(_Counted(worker, task, counts, b""),
                               _Upstream(upstream_reader, upstream, carried),
                               check_host=check_host,
                               inject=secret_store.headers_for(task.secrets, name),
                               guard=secret_store.values_for(task.secrets, name))
        details["requests"] = requests
        return "closed"

    async def _pumps(self, task: TaskEgress, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, upstream_reader: asyncio.StreamReader,
                     upstream: asyncio.StreamWriter, counts: list[int],
                     carried: list[int]) -> None:
        carried[0] += 1
        pumps = [asyncio.ensure_future(self._pump(reader, upstream, task, counts, 0)),
                 asyncio.ensure_future(self._pump(upstream_reader, writer, task, counts, 1))]
        try:
            await asyncio.gather(*pumps)
        finally:
            for pump in pumps:
                pump.cancel()

    # -- the HTTPS proxy (CONNECT) ------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """A worker's `CONNECT host:port` (its https_proxy): the host is checked by name
        against the policy, resolved by the daemon, and the tunnel carried like a
        transparent connection, with the TLS server name held to the host."""
        task = self._admit(writer, "https-proxy")
        if task is None:
            return
        why = self._over_limits(task)  # a CONNECT is a connection from its first byte
        if why:
            task.refused += 1
            task.refusal({"destination": "?", "port": 0, "protocol": "tcp",
                          "by": "https-proxy", "reason": why})
            _reset(writer)
            return
        current = asyncio.current_task()
        assert current is not None
        task.open.add(current)
        try:
            await self._connect_request(task, reader, writer)
        except Exception as exc:  # a bug here must not lose the attempt's record
            log.exception("egress.connect_failed")
            task.refused += 1
            task.refusal({"destination": "?", "port": 0, "protocol": "tcp",
                          "by": "https-proxy", "reason": f"error: {type(exc).__name__}"})
        finally:
            task.open.discard(current)
            writer.close()

    async def _connect_request(self, task: TaskEgress, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        details: dict[str, Any] = {"by": "https-proxy", "protocol": "tcp"}
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):  # the whole head, not each read
                request = await _request_head(connection, reader)
        except (h11.RemoteProtocolError, TimeoutError) as exc:
            why = (f"no whole CONNECT request within {CONNECT_TIMEOUT:g} s"
                   if isinstance(exc, TimeoutError) else f"not an HTTP/1.1 request: {exc}")
            task.refused += 1
            task.refusal({**details, "destination": "?", "port": 0, "reason": why[:200]})
            await _answer(writer, 400, why)
            return
        target = request.target.decode("latin-1")
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]").lower().rstrip(".")
        if request.method != b"CONNECT" or not port_text.isdigit() or not host:
            details.update(destination=target[:255], port=0)
            why = ("the HTTPS proxy takes CONNECT host:port only (https_proxy); plain http://"
                   " goes directly, by name, through the daemon's resolver")
            task.refused += 1
            task.refusal({**details, "reason": why})
            await _answer(writer, 405, why)
            return
        port = int(port_text)
        details.update(destination=host[:255], port=port, name=host[:255])
        rule, address, why = await self._decide_connect(task, host, port)
        if not why and (not isinstance(connection.next_event(), h11.EndOfMessage)
                        or connection.next_event() is not h11.PAUSED):
            why = "a CONNECT request with a body; send none"
        if why:
            task.refused += 1
            task.refusal({**details, "reason": why})
            await _answer(writer, 403, why)
            return
        details.update(destination=address, rule=rule, name="" if host == address else host)
        await self._forward(task, details, reader, writer,
                            connect_host="" if host == address else host,
                            initial=connection.trailing_data[0])

    async def _decide_connect(self, task: TaskEgress, host: str, port: int
                              ) -> tuple[str, str, str]:
        """(rule, address, "") for a CONNECT the policy allows, else ("", "", why)."""
        try:
            socket.inet_aton(host)
            literal = host.count(".") == 3
        except OSError:
            literal = False
        if literal:
            allowed = task.destination(host, port)
            return (allowed[1], host, "") if allowed is not None else \
                ("", "", task.why_refused(host, port))
        rule = task.name_allowed(host, port)
        if not rule:
            return "", "", f"no egress entry allows {host} on port {port}"
        query = DNSRecord.question(host, "A")
        try:
            answer = await self._ask_upstream(query)
        except (OSError, TimeoutError) as exc:
            return "", "", f"{host} could not be resolved (upstream: {exc!r})"[:200]
        addresses = [str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A]
        usable = [a for a in addresses if not task.rebinding(a, port)]
        if not usable:
            return "", "", (f"{host} resolves to no address the policy allows"
                            f" ({', '.join(addresses[:4]) or 'no A record'}; a private,"
                            " loopback or link-local answer is refused as rebinding)")
        return rule, usable[0], ""

    async def _connect(self, address: str, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection from the uplink namespace (the socket is made by its thread)."""
        assert self._uplink is not None
        sock = await asyncio.wrap_future(self._uplink.submit(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)))
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, (address, port)), CONNECT_TIMEOUT)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    task: TaskEgress, counts: list[int], side: int) -> None:
        """Copies one direction, counting against the task's budget; EOF is passed on."""
        while task.bytes_used < task.bytes_limit:
            data = await source.read(min(_CHUNK, task.bytes_limit - task.bytes_used))
            if not data:
                with contextlib.suppress(OSError):
                    if sink.can_write_eof():
                        sink.write_eof()
                return
            counts[side] += len(data)
            task.bytes_used += len(data)
            sink.write(data)
            await sink.drain()
        raise ConnectionAbortedError("limits.bytes reached")

    # -- the kernel's refusals --------------------------------------------------------------

    def _read_log(self) -> None:
        """Reads every message waiting on the NFLOG socket (the loop calls it when readable;
        `close` calls it to drain) and puts each packet on its task's record."""
        if self._log is None:
            return
        while True:
            try:
                data = self._log.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:  # ENOBUFS: the kernel dropped log messages, not packets
                self.log_lost += 1
                log.warning("egress.log_overflow", error=str(exc))
                continue
            for packet in nflog.parse(data):
                task = self._by_address.get(packet.source)
                if task is None:
                    log.info("egress.refused_unattributed", source=packet.source,
                             destination=packet.destination, protocol=packet.protocol)
                    continue
                task.logged += 1
                task.refusal(refused_packet(packet))

    # -- resolver -----------------------------------------------------------------------------

    async def resolve(self, task: TaskEgress, query: DNSRecord) -> DNSRecord:
        """The answer a task gets for `query` (see the module docstring)."""
        name = str(query.q.qname).rstrip(".").lower()
        qtype = QTYPE.get(query.q.qtype, str(query.q.qtype))
        # (protocol, port) of each entry that allows the name: an address answered goes in
        # that protocol's set for that port
        wanted = sorted({(r.protocol, r.port) for r in task.rules if r.port is not None
                         and name_matches(r, name)})
        reply = query.reply()
        if not wanted:
            reply.header.rcode = RCODE.REFUSED
            task.record("dns.refused", {"name": name[:255], "type": qtype,
                                        "reason": "no egress entry allows this name"})
            return reply
        if qtype != "A":
            return reply  # no records: workers have IPv4 only
        upstream = await self._ask_upstream(query)
        rules = {(protocol, port): next(r.text for r in task.rules if r.port == port
                                        and r.protocol == protocol and name_matches(r, name))
                 for protocol, port in wanted}
        kept: list[str] = []
        refused: list[str] = []
        ttl = MAX_TTL
        for rr in upstream.rr:
            if rr.rtype != QTYPE.A:
                reply.add_answer(rr)
                continue
            address = str(rr.rdata)
            if task.rebinding(address, wanted[0][1], wanted[0][0]):
                refused.append(address)
                continue
            ttl = min(ttl, max(1, int(rr.ttl)))
            kept.append(address)
        expiry = time.monotonic() + ttl
        grants: dict[str, list[tuple[str, int, int | None]]] = {}
        for address in kept:
            for protocol, port in wanted:
                # An address an ip or cidr entry names is in the set already, for good (an
                # overlapping element would be refused by nft's interval set).
                if address_rule(task.rules, address, port, protocol) is None:
                    grants.setdefault(protocol, []).append((address, port, ttl))
                task.resolved[(address, port, protocol)] = (name, rules[(protocol, port)],
                                                            expiry)
            task.answered[address] = name
        for protocol, granted in grants.items():  # one nft transaction a set
            await asyncio.to_thread(self.network.allow_all, task.slot, granted, protocol)
        for address in kept:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=_a(address), ttl=ttl))
        if refused:
            task.record("dns.rebinding_refused", {
                "name": name, "addresses": refused[:16],
                "reason": "a private, loopback or link-local address no address entry names"})
        answer: dict[str, Any] = {
            "name": name, "addresses": kept[:16], "ttl": ttl,
            "ports": [p for protocol, p in wanted if protocol == "tcp"],
            "rule": rules[wanted[0]], "rcode": RCODE.get(upstream.header.rcode, "?")}
        if any(protocol == "udp" for protocol, _p in wanted):
            answer["udp_ports"] = [p for protocol, p in wanted if protocol == "udp"]
        task.record("dns.answer", answer)
        reply.header.rcode = upstream.header.rcode
        return reply

    async def _ask_upstream(self, query: DNSRecord) -> DNSRecord:
        assert self._uplink is not None
        sock = await asyncio.wrap_future(self._uplink.submit(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)))
        try:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, self.config.upstream)
            ask = DNSRecord(header=query.header, questions=query.questions)
            ask.header.id = int.from_bytes(os.urandom(2), "big")
            await loop.sock_sendall(sock, ask.pack())
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), UPSTREAM_TIMEOUT)
                answer = DNSRecord.parse(data)
                if answer.header.id == ask.header.id:
                    return answer
        finally:
            sock.close()


def _outermost(rules: tuple[EgressRule, ...]) -> list[EgressRule]:
    """The ip and cidr entries to put in the sets: one inside another on the same port and
    protocol is allowed by that one already (and nft's interval set refuses overlapping
    elements)."""
    literal = [r for r in rules if r.network is not None and r.port is not None]
    kept: list[EgressRule] = []
    for rule in literal:
        inner = rule.network
        assert inner is not None
        if any(other is not rule and other.port == rule.port
               and other.protocol == rule.protocol and other.network is not None
               and inner.subnet_of(other.network)
               and (inner != other.network or literal.index(other) < literal.index(rule))
               for other in literal):
            continue
        kept.append(rule)
    return kept


def egress_environment(task: TaskEgress) -> dict[str, str]:
    """What an egress worker's environment says by default (a policy's env or the request
    may override it): the HTTPS proxy, and with secrets the trust bundle holding its run's CA
    (mounted at BUNDLE_PATH)."""
    proxy = f"http://{RESOLVER}:{CONNECT_PORT}"
    env = {"https_proxy": proxy, "HTTPS_PROXY": proxy}
    if task.bundle:
        env |= dict.fromkeys(TRUST_ENV, BUNDLE_PATH)
    return env


def refused_packet(packet: nflog.Logged) -> dict[str, Any]:
    """The `net.refused` details of one packet the kernel refused, with the reason in the
    policy's words (the name is added by the task)."""
    details: dict[str, Any] = {"destination": packet.destination, "protocol": packet.protocol,
                               "by": "nft"}
    if packet.port is not None:
        details["port"] = packet.port
    if packet.family == socket.AF_INET6:
        details["reason"] = "IPv6 is not granted"
    elif packet.protocol == "udp" and packet.port == 53:
        details["reason"] = f"DNS to a server other than the daemon's resolver ({RESOLVER})"
        with contextlib.suppress(Exception):  # a packet cut short or not DNS at all
            details["query"] = str(DNSRecord.parse(packet.data).q.qname).rstrip(".")[:255]
    elif packet.protocol == "udp":
        details["reason"] = "no egress entry allows UDP to this destination"
    elif packet.protocol == "icmp":
        details["reason"] = "ICMP is not granted"
        details["icmp_type"], details["icmp_code"] = packet.icmp or (0, 0)
    else:
        details["reason"] = (f"{packet.protocol} is not granted (egress entries are TCP or"
                             " UDP)")
    return details


def _original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going: (address, port), from conntrack."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


async def _classify(reader: asyncio.StreamReader, data: bytes
                    ) -> tuple[str, bytes, str | None]:
    """What a connection's first bytes are, reading more until it is clear (the caller bounds
    the time): ("tls", bytes, server name: "" if none, None if the ClientHello cannot be
    read), ("http", bytes without leading blank lines, None) for an HTTP/1.x request line,
    else ("other", bytes, None). A request sent a byte at a time, or after blank lines, is
    still HTTP; a ClientHello over MAX_HELLO is unreadable, not "other"."""
    if data[:1] == b"\x16":
        while True:
            try:
                name = client_hello_name(data)
            except NotTls:
                return "tls", data, None
            if name is not None:
                return "tls", data, name
            if (grown := await _read_more(reader, data, MAX_HELLO)) is None:
                return "tls", data, None
            data = grown
    while True:
        stripped = data.lstrip(b"\r\n")
        if stripped[:1] and not (b"A" <= stripped[:1] <= b"Z"):
            return "other", data, None  # not a method's first letter: no request line
        line, newline, _ = stripped.partition(b"\n")
        if newline:
            return ("http", stripped, None) if _REQUEST_LINE.fullmatch(line.rstrip(b"\r")) \
                else ("other", data, None)
        if (grown := await _read_more(reader, data, MAX_HEAD)) is None:
            return "other", data, None
        data = grown


async def _read_more(reader: asyncio.StreamReader, data: bytes, limit: int) -> bytes | None:
    """`data` and the worker's next bytes; None once `data` is over `limit` or at EOF."""
    if len(data) > limit:
        return None
    more = await reader.read(_CHUNK)
    return data + more if more else None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Ends our side (FIN) and discards what the worker still sends, for at most a second:
    closing with unread bytes would reset the connection, and the worker could lose the
    error response sent just before (a lingering close, as HTTP servers do)."""
    with contextlib.suppress(OSError, TimeoutError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            while await reader.read(_CHUNK):
                pass


async def _request_head(connection: h11.Connection, reader: asyncio.StreamReader
                        ) -> h11.Request:
    """The next request's head from `reader`; RemoteProtocolError if it is not one, or the
    worker closed before it was whole."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(_CHUNK))
        elif isinstance(event, h11.Request):
            return event
        else:
            raise h11.RemoteProtocolError("closed before a whole request")


def _charge(task: TaskEgress, counts: list[int], side: int, size: int) -> None:
    counts[side] += size
    task.bytes_used += size


class _Stream:
    """An asyncio stream pair as a relay side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, size: int) -> bytes:
        return await self.reader.read(size)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class _Upstream(_Stream):
    """The destination's side; counts the requests that reached it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 carried: list[int]) -> None:
        super().__init__(reader, writer)
        self.carried = carried

    async def write(self, data: bytes) -> None:
        self.carried[0] += 1
        await super().write(data)


class _Counted:
    """The worker's side of a relay, counted against the task's byte budget (`first`: bytes
    already read from it, given back first)."""

    def __init__(self, side: _Stream | TlsEnd, task: TaskEgress, counts: list[int],
                 first: bytes) -> None:
        self.side, self.task, self.counts, self.first = side, task, counts, first

    async def read(self, size: int) -> bytes:
        if self.first:
            data, self.first = self.first, b""
        else:
            left = self.task.bytes_limit - self.task.bytes_used
            if left <= 0:
                raise ConnectionAbortedError("limits.bytes reached")
            data = await self.side.read(min(size, left))
        _charge(self.task, self.counts, 0, len(data))
        return data

    async def write(self, data: bytes) -> None:
        if self.task.bytes_used + len(data) > self.task.bytes_limit:
            raise ConnectionAbortedError("limits.bytes reached")
        _charge(self.task, self.counts, 1, len(data))
        await self.side.write(data)


async def _answer(writer: asyncio.StreamWriter, status: int, why: str) -> None:
    """A proxy's own short answer to a CONNECT (then the connection ends)."""
    reason = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
              502: "Bad Gateway"}.get(status, "")
    body = f"refused by agentd's egress proxy: {why}\n".encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


def _a(address: str) -> Any:
    from dnslib import A

    return A(address)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes a worker's connection with a reset, not a FIN: refused, not ended."""
    sock: socket.socket | None = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


class _Resolver(asyncio.DatagramProtocol):
    """The UDP side of the resolver: one task per query, answered to the sender."""

    def __init__(self, service: EgressService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        task = self.service._by_address.get(addr[0])
        if task is None:
            return
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return
        job = asyncio.ensure_future(self._answer(task, query, addr))
        self.pending.add(job)
        job.add_done_callback(self.pending.discard)

    async def _answer(self, task: TaskEgress, query: DNSRecord,
                      addr: tuple[str | Any, int]) -> None:
        try:
            reply = await self.service.resolve(task, query)
        except (OSError, TimeoutError) as exc:
            reply = query.reply()
            reply.header.rcode = RCODE.SERVFAIL
            task.record("dns.failed", {"name": str(query.q.qname)[:255],
                                       "reason": f"upstream: {exc!r}"[:200]})
        if self.transport is not None:
            self.transport.sendto(reply.pack(), addr)
