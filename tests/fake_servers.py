"""grpc.aio servers on their own event loop in a daemon thread (httpx's serve_in_thread).

For the client and agentctl tests, which run `agentctl` as a subprocess against servicers
with canned behaviour; the real daemon's tests start the real daemon instead.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import grpc

from agentd.api.gen.v1 import agentd_pb2_grpc as pb_grpc


class ServeInThread:
    """One server per unix socket path, each serving its Agentd servicer."""

    def __init__(self, servicers: Mapping[str, Any]) -> None:
        self.servicers = dict(servicers)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._main, name="fake-agentd", daemon=True)

    def __enter__(self) -> ServeInThread:
        self._thread.start()
        assert self._started.wait(10), "fake agentd did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stop = self._stop
        assert stop is not None
        self._loop.call_soon_threadsafe(stop.set_result, None)
        self._thread.join(10)
        self._loop.close()

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        servers = []
        for path, servicer in self.servicers.items():
            server = grpc.aio.server()
            pb_grpc.add_AgentdServicer_to_server(servicer, server)
            server.add_insecure_port(f"unix:{path}")
            await server.start()
            servers.append(server)
        self._stop = self._loop.create_future()
        self._started.set()
        await self._stop
        for server in servers:
            await server.stop(grace=None)


def read_until(stream: IO[bytes], end: bytes, timeout: float = 20.0) -> bytes:
    """Reads what a running subprocess has written so far, until `end` appears (or timeout):
    proof that output arrives live, before the process ends."""
    seen = b""
    deadline = time.monotonic() + timeout
    while end not in seen and time.monotonic() < deadline:
        readable, _, _ = select.select([stream], [], [], 0.1)
        if readable:
            seen += os.read(stream.fileno(), 4096)
    return seen
