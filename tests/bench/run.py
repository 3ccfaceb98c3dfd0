"""`make bench`: every benchmark, one run, one host, printed side by side with its reference.

Benchmarks are not tests: nothing here fails on a number. Select with `BENCH_ARGS=spawn`.
"""

from __future__ import annotations

import importlib
import json
import sys

BENCHES = {"spawn": "tests.bench.spawn_bench", "audit": "tests.bench.audit_bench",
           "layers": "tests.bench.layers_bench", "steps": "tests.bench.steps_bench",
           "throughput": "tests.bench.throughput_bench",
           "netwatch": "tests.bench.netwatch_bench"}


def report(name: str, figures: dict[str, float]) -> None:
    shown = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in figures.items())
    print(f"{name:<48} {shown}", flush=True)
    print(json.dumps({"bench": name, **figures}), file=sys.stderr, flush=True)


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHES)
    for name in chosen:
        module = importlib.import_module(BENCHES[name])
        module.run(report)


if __name__ == "__main__":
    main()
