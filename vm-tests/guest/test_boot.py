"""The VM itself: what every other test here relies on. If these fail, read console.log."""

from __future__ import annotations

from pathlib import Path


class TestGuest:
    def test_systemd_is_pid_1(self) -> None:
        """systemd is init, so the units are exercised for real."""
        assert Path("/proc/1/comm").read_text().strip() == "systemd"

    def test_cgroup_v2_with_controllers(self) -> None:
        """/sys/fs/cgroup is a cgroup2 root offering memory, pids and cpu."""
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        assert any(line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in mounts)
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        assert {"memory", "pids", "cpu"} <= set(controllers)
