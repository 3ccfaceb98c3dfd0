"""The egress proxy's HTTP relay (agentd/egress/http.py) on scripted bytes: one framing per
message (no request smuggling), a secret sent back by the destination cut before the worker
sees it (in a header, or split across body parts), TRACE refused where a secret is added."""

from __future__ import annotations

import asyncio

import pytest

from agentd.egress.http import Refused, relay

SECRET = b"Bearer s3cr3t-value"


class Scripted:
    """A relay side that hands out `parts` one read at a time and keeps what it is sent."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = list(parts)
        self.sent = bytearray()

    async def read(self, size: int) -> bytes:
        return self.parts.pop(0) if self.parts else b""

    async def write(self, data: bytes) -> None:
        self.sent += data


def _run(worker: Scripted, upstream: Scripted, **kwargs: object) -> int:
    return asyncio.run(relay(worker, upstream, check_host=lambda h: "", **kwargs))  # type: ignore[arg-type]


GET = b"GET / HTTP/1.1\r\nHost: api.example.org\r\n\r\n"


def test_transfer_encoding_wins_and_content_length_is_dropped() -> None:
    worker = Scripted(b"POST / HTTP/1.1\r\nHost: api.example.org\r\nContent-Length: 4\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
    upstream = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert _run(worker, upstream) == 1
    sent = bytes(upstream.sent).lower()
    assert b"transfer-encoding: chunked" in sent
    assert b"content-length" not in sent
    assert bytes(worker.sent).endswith(b"\r\n\r\nok")


def test_a_secret_in_a_response_header_is_cut() -> None:
    worker = Scripted(GET)
    upstream = Scripted(b"HTTP/1.1 200 OK\r\nX-Echo: " + SECRET + b"\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(Refused, match="response header"):
        _run(worker, upstream, inject=[("Authorization", SECRET.decode())], guard=[SECRET])
    assert SECRET not in worker.sent
    assert b"X-Echo" not in worker.sent


def test_a_secret_split_across_body_parts_never_reaches_the_worker() -> None:
    body = b"xx" + SECRET + b"yy"
    worker = Scripted(GET)
    upstream = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                        + body[:8], body[8:])
    with pytest.raises(Refused, match="response body"):
        _run(worker, upstream, inject=[("Authorization", SECRET.decode())], guard=[SECRET])
    assert SECRET[:8] not in worker.sent  # the part before the split was held back too
    assert b"s3cr3t" not in worker.sent


def test_a_clean_body_arrives_whole() -> None:
    body = b"a" * 100
    worker = Scripted(GET)
    upstream = Scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body[:30],
                        body[30:])
    assert _run(worker, upstream, guard=[SECRET]) == 1
    assert bytes(worker.sent).endswith(body)


def test_trace_is_refused_where_a_secret_is_added() -> None:
    worker = Scripted(b"TRACE / HTTP/1.1\r\nHost: api.example.org\r\n\r\n")
    upstream = Scripted()
    with pytest.raises(Refused, match="TRACE"):
        _run(worker, upstream, inject=[("Authorization", SECRET.decode())], guard=[SECRET])
    assert worker.sent.startswith(b"HTTP/1.1 405")
    assert upstream.sent == b""
