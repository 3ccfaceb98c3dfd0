"""A short soak (tests/soak.py) as part of `make test`: a few hundred mixed calls against a
real daemon, then no leaked fd, mount, cgroup, network namespace, process or zombie, and a flat
RSS. `make soak` runs the long one (10,000 calls)."""

from __future__ import annotations

from tests.soak import describe, soak


def test_short_soak_leaks_nothing() -> None:
    report = soak(300, clients=4, seed=20261205, warmup=60)
    print(describe(report))
    assert report.calls == 300
    assert report.warm is not None
    assert report.end is not None
    assert report.ok, describe(report)
