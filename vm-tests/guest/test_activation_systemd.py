"""agentd.activation and agentd.systemd against systemd's own implementation of the socket
activation protocol (systemd-socket-activate: LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES as
systemd sets them), with a real grpc.aio server behind the forwarder. Independent of the
daemon, so it shows the mechanism works even while the daemon does not use it yet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER = """
import asyncio, sys
from pathlib import Path
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from agentd import activation

out = Path(sys.argv[1])

class Health(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        peer = activation.peer_of(context.peer())
        out.write_text(f"{peer.role} {peer.uid} {peer.pid}" if peer else "none")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

async def main():
    act = activation.Activation.from_environment(out.parent)
    where = act.grpc_sockets({"client": out.parent / "unused.sock"})
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    server.add_insecure_port(f"unix:{where['client']}")
    await server.start()
    await act.start()
    await asyncio.sleep(60)

asyncio.run(main())
"""

CLIENT = """
import os, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("unix:" + sys.argv[1]) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
print(reply.status, os.getpid())
"""


@pytest.mark.timeout(120)
def test_activated_grpc_server_sees_the_caller(tmp_path: Path) -> None:
    """The first connection starts the server with the socket at fd 3 named 'client'; the
    call queued in the socket is served, and the handler knows the caller's uid and pid."""
    public = tmp_path / "public.sock"
    out = tmp_path / "peer"
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(public), "--fdname=client",
         sys.executable, "-c", SERVER, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not public.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate made no socket"
            time.sleep(0.1)
        done = subprocess.run([sys.executable, "-c", CLIENT, str(public)],
                              capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr
        status, client_pid = done.stdout.split()
        assert status == "1"  # SERVING
        assert out.read_text() == f"client {os.getuid()} {client_pid}"
        assert (tmp_path / "private" / "client.sock").exists()
    finally:
        activator.terminate()
        output = activator.communicate(timeout=30)[0]
        print(output)
