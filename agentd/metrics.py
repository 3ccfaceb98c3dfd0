"""Prometheus metrics of the daemon: one registry, every metric defined here, one line at each
place that moves one.

Served in the text exposition format on a unix socket (`[daemon] metrics_socket`, 0660, group
`admin_group`) and, if configured, on a loopback TCP address (`metrics_listen`); see
docs/architecture.md, "Metrics". prometheus-client renders the metrics; it has no unix-socket
server, so the few lines of HTTP it needs are written here (`serve`), on the event loop,
without threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FSYNC = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)

SPAWN_SECONDS = Histogram(
    "agentd_spawn_seconds", "A worker's time by phase: cgroup (create), launch (clone to the "
    "tool's execve), run (execve to exit), cleanup (usage and cgroup removal).",
    ["phase"], buckets=_LATENCY, registry=REGISTRY)
STEP_SECONDS = Histogram(
    "agentd_step_seconds", "A step's time by phase: recorded, tasks, merged, layer, committed, "
    "finished (see agentd/scheduler/steps.py), and total.",
    ["phase"], buckets=_LATENCY, registry=REGISTRY)
STEPS = Counter("agentd_steps_total", "Steps that ended, by state.", ["state"],
                registry=REGISTRY)
REFUSALS = Counter("agentd_refusals_total",
                   "Calls refused, by the rule that refused them (or the error code).",
                   ["rule"], registry=REGISTRY)
WORKERS_IN_USE = Gauge("agentd_workers_in_use", "Workers running now.", registry=REGISTRY)
WORKERS_LIMIT = Gauge("agentd_workers_limit", "max_concurrent_workers.", registry=REGISTRY)
WARM_POOL_DEPTH = Gauge("agentd_warm_pool_depth",
                        "Prebuilt workers ready to be taken (agentd/sandbox/pool.py).",
                        registry=REGISTRY)
SPAWNS = Counter("agentd_spawns_total",
                 "Workers started, by how: prebuilt, cold, or cold_into_cgroup (clone3 "
                 "CLONE_INTO_CGROUP, cgroup v2).",
                 ["how"], registry=REGISTRY)
AUDIT_QUEUE = Gauge("agentd_audit_queue_depth",
                    "Audit records submitted and not yet written.", registry=REGISTRY)
AUDIT_FSYNC_SECONDS = Histogram("agentd_audit_fsync_seconds",
                                "Write and fdatasync of one audit batch.", buckets=_FSYNC,
                                registry=REGISTRY)
AUDIT_WRITABLE = Gauge("agentd_audit_writable",
                       "1 while the audit log can be written; 0 while agentd fails closed.",
                       registry=REGISTRY)
WORKSPACE_BYTES = Gauge("agentd_workspace_bytes",
                        "Bytes of an open run's workspace (its current stack of layers).",
                        ["run_id"], registry=REGISTRY)
STATE_FREE_BYTES = Gauge("agentd_state_free_bytes",
                         "Free bytes on the state filesystem.", registry=REGISTRY)


def observe_phases(histogram: Histogram, durations_ms: dict[str, float]) -> None:
    """Feeds `{phase}_ms` figures (as the timing logs give them) into `histogram`."""
    for name, ms in durations_ms.items():
        histogram.labels(name.removesuffix("_ms")).observe(ms / 1e3)


def render() -> bytes:
    return generate_latest(REGISTRY)


async def serve_unix(path: str, *, mode: int, gid: int | None,
                     refresh: Callable[[], None]) -> asyncio.Server:
    """The metrics on a unix socket: any HTTP GET gets the exposition text."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(_handler(refresh), path=path)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, 0, gid)
    return server


async def serve_tcp(host: str, port: int, *, refresh: Callable[[], None]) -> asyncio.Server:
    """The metrics on a (loopback) TCP address, for a Prometheus that scrapes over TCP."""
    return await asyncio.start_server(_handler(refresh), host=host, port=port)


def _handler(refresh: Callable[[], None]
             ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # The request line and headers, bounded; the path does not matter.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            if not head.startswith((b"GET ", b"HEAD ")):
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            else:
                refresh()
                body = render()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode()
                             + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n"
                             + (b"" if head.startswith(b"HEAD ") else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return handle
