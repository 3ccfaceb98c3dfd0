"""scripts/install.sh on a live host: what `make install` does to a running installation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SRC = Path("/opt/agentd-src")  # the release as run.sh unpacked it: scripts/, systemd/, wheels/
CONFIG = Path("/etc/agentd/agentd.toml")


def show(prop: str, unit: str = "agentd.service") -> str:
    done = subprocess.run(["systemctl", "show", "-P", prop, unit], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def agentctl_ok() -> bool:
    done = subprocess.run(["agentctl", "--socket", "/run/agentd/agentd.sock", "run", "list",
                           "--all"], capture_output=True, text=True, timeout=180, check=False)
    return done.returncode == 0


@pytest.mark.timeout(900)
def test_reinstall_upgrades_a_running_service() -> None:
    """Run again on a host where agentd runs, install.sh keeps the operator's config and
    policies, restarts agentd onto the new files, and the service serves afterwards."""
    assert agentctl_ok()  # started (by its socket) if it was not
    pid = show("MainPID")
    config = CONFIG.read_text()
    policy = Path("/etc/agentd/policies/e2e.yaml").read_text()
    wheel = next((SRC / "wheels").glob("agentd-*.whl"))
    done = subprocess.run([str(SRC / "scripts/install.sh"), "--offline", str(SRC / "wheels"),
                           str(wheel)], capture_output=True, text=True, timeout=800, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "starting the sockets" in done.stdout
    assert CONFIG.read_text() == config
    assert Path("/etc/agentd/policies/e2e.yaml").read_text() == policy
    assert show("ActiveState") == "active"
    assert show("MainPID") != pid
    assert agentctl_ok()
