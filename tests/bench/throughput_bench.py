"""Throughput: Exec of /bin/true from 16 clients at once, each on its own run (goal: >= 200
calls/s on 2 cores). Every call goes through the daemon's SO_PEERCRED forwarder, as under
systemd: the daemon binds the role sockets itself in every mode (agentd/activation.py).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import start_daemon, stop_daemon

CLIENTS = 16
SECONDS = 10.0


def run(report: Callable[[str, dict[str, float]], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        handle = start_daemon(Path(tmp))
        try:
            runs = [handle.stub().CreateRun(pb.CreateRunRequest(agent="integration")).run_id
                    for _ in range(CLIENTS)]
            counts = [0] * CLIENTS
            errors: list[BaseException] = []
            stop = threading.Event()

            def client(i: int) -> None:
                stub = handle.stub()  # a channel per client, as separate processes would
                request = pb.ExecRequest(run_id=runs[i], argv=["/bin/true"])
                try:
                    while not stop.is_set():
                        events = list(stub.Exec(request, timeout=60))
                        assert events[-1].outcome.committed, events[-1]
                        counts[i] += 1
                except BaseException as exc:  # reported below, never silently dropped
                    errors.append(exc)

            for i in range(CLIENTS):  # warm: imports, the first cgroups, the page cache
                list(handle.stub().Exec(pb.ExecRequest(run_id=runs[i], argv=["/bin/true"])))
            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(SECONDS)
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
        finally:
            stop_daemon(handle)
    if errors:
        raise SystemExit(f"throughput: {len(errors)} client(s) failed: {errors[0]!r}")
    report(f"throughput: Exec /bin/true, {CLIENTS} clients on {CLIENTS} runs (goal >= 200)",
           {"calls_per_s": sum(counts) / elapsed, "calls": float(sum(counts))})
