"""HTTP/1.1 through the egress proxy: every request's Host checked, secrets added as headers.

Used where the proxy can read the requests: plain HTTP on the transparent path, and HTTPS
whose TLS ends at the proxy because a secret goes to that name (agentd/egress/tls.py). Each
request of a connection (keep-alive included) is parsed with h11, its Host checked (a request
for another name on a shared address is refused with 421, not carried), its secret headers
replaced by the daemon's values, and re-framed to the destination; the response is carried
back the same way. One request at a time: a pipelined request waits for the previous answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

import h11

MAX_HEAD: Final = 64 * 1024
"""Bytes a request's or a response's head may take."""
_CHUNK: Final = 64 * 1024
# Never carried: they would make the destination switch protocol, wait for a 100 the proxy
# cannot relay in order, or route by something other than the checked Host.
_DROPPED: Final = frozenset({b"upgrade", b"expect", b"proxy-connection", b"proxy-authorization"})


class Side(Protocol):
    """One end of the relay: the worker's side or the destination's."""

    async def read(self, size: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class Refused(Exception):
    """A request the policy does not allow; the worker got an error response."""


async def relay(worker: Side, upstream: Side, *, check_host: Callable[[str], str],
                inject: Sequence[tuple[str, str]] = (), guard: Sequence[bytes] = ()) -> int:
    """Carries requests from `worker` to `upstream` until either closes; returns how many.
    `check_host(name)` says why a request's host is refused ("" allows it); Refused is raised
    (after a 421 or 400 to the worker) for the first one refused. `guard`: values that must
    never come back (the secrets sent): a response holding one is cut before those bytes
    reach the worker (as sent: an encoded or compressed echo is not recognised)."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    replaced = {name.lower().encode() for name, _ in inject}
    added = [(name.encode(), value.encode()) for name, value in inject]
    keep = max((len(g) for g in guard), default=1) - 1
    requests = 0
    while True:
        try:
            event = await _next(server, worker)
        except h11.RemoteProtocolError as exc:
            await _refuse(server, worker, 400, f"not HTTP/1.1 the proxy can read: {exc}")
            raise Refused(f"a request the proxy cannot read: {exc}") from None
        if not isinstance(event, h11.Request):
            return requests  # closed
        for status, why in ((400, _target_refusal(event)),
                            (405, _method_refusal(event, bool(guard))),
                            (421, check_host(_host(event)))):
            if why:
                await _refuse(server, worker, status, why)
                raise Refused(why)
        headers = [(k, v) for k, v in _framed(event.headers)
                   if k not in replaced and k not in _DROPPED]
        await _send(client, upstream, h11.Request(method=event.method, target=event.target,
                                                  headers=[*headers, *added]))
        requests += 1
        while not isinstance(event := await _next(server, worker), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return requests  # the worker closed in the middle of its body
            await _send(client, upstream, event)
        await _send(client, upstream, h11.EndOfMessage())
        while True:
            answer = await _next(client, upstream)
            if isinstance(answer, h11.InformationalResponse):
                continue  # 1xx: none the worker asked for (Expect and Upgrade are dropped)
            if not isinstance(answer, h11.Response):
                return requests  # the destination closed without answering
            break
        if any(g in value for g in guard for _, value in answer.headers):
            raise Refused("the destination sent a secret back in a response header; the"
                          " connection was cut before it reached the worker")
        await _send(server, worker, h11.Response(status_code=answer.status_code,
                                                 headers=_framed(answer.headers),
                                                 reason=answer.reason))
        held = b""  # a body's last bytes, kept until the next part shows no secret across
        while not isinstance(event := await _next(client, upstream), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return requests
            data = held + bytes(event.data)
            if any(g in data for g in guard):
                raise Refused("the destination sent a secret back in a response body; the"
                              " connection was cut before it reached the worker")
            cut = max(0, len(data) - keep) if guard else len(data)
            held = data[cut:]
            if cut:
                await _send(server, worker, h11.Data(data=data[:cut]))
        if held:
            await _send(server, worker, h11.Data(data=held))
        await _send(server, worker, h11.EndOfMessage())
        if h11.MUST_CLOSE in (server.our_state, client.our_state) or \
                server.their_state is not h11.DONE or client.their_state is not h11.DONE:
            return requests
        server.start_next_cycle()
        client.start_next_cycle()


def _host(request: h11.Request) -> str:
    for name, value in request.headers:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):
                return host  # an IPv6 literal: no name of a policy
            return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")
    return ""


def _framed(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers with one framing: a message with Transfer-Encoding is framed by it (h11 reads
    it so), so a Content-Length beside it is dropped rather than passed on for the other side
    to frame by (request smuggling, RFC 9112 6.3)."""
    if any(k == b"transfer-encoding" for k, _ in headers):
        return [(k, v) for k, v in headers if k != b"content-length"]
    return list(headers)


def _method_refusal(request: h11.Request, guarded: bool) -> str:
    """TRACE echoes the request, headers and all: never where a secret is added."""
    if guarded and request.method.upper() == b"TRACE":
        return "TRACE is refused where the proxy adds a secret (it echoes the request)"
    return ""


def _target_refusal(request: h11.Request) -> str:
    """Only origin-form ("/path") and "*" targets: an absolute URI names a host of its own,
    which a server would route by instead of the checked Host."""
    if request.target[:1] == b"/" or request.target == b"*":
        return ""
    return "the proxy carries requests in origin form (GET /path) only, not to another host"


async def _next(connection: h11.Connection, side: Side) -> object:
    """The next event of `connection`, reading `side` as it needs (h11.PAUSED when a cycle
    is over; never NEED_DATA)."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await side.read(_CHUNK))


async def _send(connection: h11.Connection, side: Side, event: h11.Event) -> None:
    data = connection.send(event)
    if data:
        await side.write(data)


async def _refuse(server: h11.Connection, worker: Side, status: int, why: str) -> None:
    """An error response to the worker, then the connection ends."""
    if server.our_state is not h11.SEND_RESPONSE and server.our_state is not h11.IDLE:
        return
    body = f"refused by agentd's egress proxy: {why}\n".encode()
    try:
        await _send(server, worker, h11.Response(status_code=status, headers=[
            (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]))
        await _send(server, worker, h11.Data(data=body))
        await _send(server, worker, h11.EndOfMessage())
    except (h11.LocalProtocolError, OSError):
        pass
