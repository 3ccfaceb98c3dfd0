"""Soak: the kill -9 rounds of tests/test_steps_crash.py, as many as asked, with a tally.

Not collected by pytest (the name does not start with test_). Needs root, like the suite:

    sudo .venv/bin/python -m tests.soak_steps --kills 500 [--seed N]

Each kill is one round of `CrashSuite`: a step on each of two runs, SIGKILL of the daemon at
a random moment, a restart on the same directory, and every check of the suite. Stops at the
first failed check, printing the round, the seed and the daemon directory (kept for a look).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from tests.conftest import stop_daemon
from tests.test_steps_crash import CrashSuite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=500, help="rounds, one kill -9 each")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: new)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("soak_steps: needs root (namespaces, cgroups, mounts)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    suite = CrashSuite(seed=seed)
    print(f"soak: {args.kills} kills, seed {seed}, daemon directory {suite.base}", flush=True)
    started = time.monotonic()
    try:
        for number in range(1, args.kills + 1):
            suite.round()
            if number % 25 == 0 or number == args.kills:
                print(f"  {number} kills, {time.monotonic() - started:.0f} s: "
                      f"{dict(sorted(suite.outcomes.items()))}", flush=True)
    except AssertionError as failure:
        print(f"FAILED at kill {suite.rounds} (seed {seed}); directory kept: {suite.base}\n"
              f"{failure}", file=sys.stderr, flush=True)
        stop_daemon(suite.handle)
        return 1
    suite.close()
    print(f"ok: {args.kills} kills in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
