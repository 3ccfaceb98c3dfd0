"""What the network watch (agentd/sandbox/netwatch.py) costs an egress worker per call.

Two calls, timed inside the process that makes them: a TCP connect to a port no entry names
(refused: by the launcher's answer in an agentd egress worker, by Landlock in the reference)
and a UDP connect to 127.0.0.1 (no packet: let through to the kernel after the round trip).
The reference is the same script in a process of its own in a fresh network namespace under
Landlock's port rule and no watch, run in the same rounds: the difference is the watch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

from agentd.api.gen.v1 import agentd_pb2 as pb
from tests.conftest import execute, stop_daemon
from tests.test_egress import Internet
from tests.test_egress import _start as start_egress_daemon

CALLS = 500
SCRIPT = textwrap.dedent(f"""\
    import json, socket, time
    def timed(fn):
        start = time.perf_counter_ns()
        for _ in range({CALLS}):
            fn()
        return (time.perf_counter_ns() - start) / {CALLS} / 1e3
    def refused():
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 9))
        except PermissionError:
            pass
        s.close()
    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", 9))
        s.close()
    print(json.dumps({{"refused_us": timed(refused), "udp_connect_us": timed(udp)}}))
    """)
# The reference: a new network namespace (loopback up) and Landlock allowing TCP port 8080.
REFERENCE = textwrap.dedent("""\
    import os, subprocess, sys
    from agentd.sandbox import landlock, libc
    libc.unshare(libc.CLONE_NEWNET)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    libc.prctl(38, 1, 0, 0, 0)  # no_new_privs
    landlock.enter(read=["/"], write=["/tmp"], execute=["/"], devices=(), connect=[8080])
    exec(sys.argv[1])
    """)


def run(report: Callable[[str, dict[str, float]], None], rounds: int = 5) -> None:
    samples: dict[str, list[float]] = {}
    internet = Internet(f"agentd-bench-inet-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
            handle = start_egress_daemon(Path(tmp), internet)
            try:
                stub = handle.stub()
                for _ in range(rounds):
                    run_id = stub.CreateRun(pb.CreateRunRequest(agent="fetcher")).run_id
                    result = execute(stub, run_id, ["/usr/bin/python3", "-c", SCRIPT])
                    for key, value in json.loads(result.stdout).items():
                        samples.setdefault(f"agentd_{key}", []).append(value)
                    reference = subprocess.run(
                        [sys.executable, "-c", REFERENCE, SCRIPT], capture_output=True,
                        text=True, check=True, timeout=60)
                    for key, value in json.loads(reference.stdout).items():
                        samples.setdefault(f"landlock_{key}", []).append(value)
            finally:
                stop_daemon(handle)
    finally:
        internet.close()
    figures = {key: statistics.median(values) for key, values in samples.items()}
    report(f"netwatch: µs per call, median of {rounds} runs of {CALLS}", figures)
    report("netwatch: what the watch adds, µs per call", {
        "refused_connect": figures["agentd_refused_us"] - figures["landlock_refused_us"],
        "udp_connect": figures["agentd_udp_connect_us"] - figures["landlock_udp_connect_us"]})
