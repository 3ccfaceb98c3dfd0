"""The daemon's health and load as one value: what `agentctl status` shows and the metrics'
gauges are refreshed from. Built by the daemon (which owns every part), encoded by the API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DaemonStatus:
    version: str
    uptime_seconds: float
    cgroup_backend: str
    cgroup_parent: str
    workers_in_use: int
    max_workers: int
    open_runs: int
    draining: bool
    warm_pool_depth: int
    warm_pool_size: int
    audit_writable: bool
    audit_problem: str
    audit_records: int
    audit_queue_depth: int
    audit_head_size: int
    audit_head_time: str
    state_free_bytes: int
    state_reserve_bytes: int
    metrics_socket: str
    metrics_listen: str
