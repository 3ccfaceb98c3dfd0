"""Stage ceilings bound every policy field, and every clamp is shown with its ceiling line.

The unit tests clamp policies in memory; the command tests run the real `agentctl` and
`agentd --check`; the worker tests start a real daemon with a policy that asks for more than
its stage allows and look from inside a worker at what it really got.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import BaseModel

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.policy import StageRules, effective_policy, load_policy, load_stage_ceilings
from agentd.policy.stages import CLAMPED
from tests.conftest import CONFIG, REPO, daemon_base, execute, start_daemon, stop_daemon

STAGES = REPO / "policies" / "stages.yaml"
GREEDY = textwrap.dedent("""\
    apiVersion: agentd/v1
    kind: Policy
    name: greedy
    stages:
      prototype:
        exec: {allow: [/bin/, /usr/bin/]}
        filesystem: {read_only: [/usr, /bin, /lib, /lib64]}
        user_namespace: true
        env:
          set: {LD_PRELOAD: /tmp/evil.so, LANG: C.UTF-8, BASH_ENV: /tmp/rc}
          allow: [PYTHONSTARTUP, FOO]
          log: [LD_PRELOAD, LANG]
        limits: {memory: 8GiB}
      pilot:
        user_namespace: true
    """)


def _leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= _leaves(kind, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


@pytest.fixture
def greedy(tmp_path: Path) -> Path:
    shutil.copy(STAGES, tmp_path / "stages.yaml")
    path = tmp_path / "greedy.yaml"
    path.write_text(GREEDY)
    return path


def _line_of(text: str, path: Path) -> int:
    """The 1-based line of the first line of `path` that contains `text`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


class TestCoverage:
    def test_every_policy_field_is_clamped(self) -> None:
        """Each leaf field a stage section can hold is decided by the clamp: a new policy
        field without a ceiling fails here."""
        assert _leaves(StageRules) == set(CLAMPED)


class TestClamps:
    def test_each_clamp_is_a_note_naming_the_ceiling_line(self, greedy: Path) -> None:
        """user_namespace, dangerous env names and an 8 GiB memory limit are clamped at
        prototype, each with a note pointing at the stages file's line."""
        ceilings = load_stage_ceilings(greedy.parent / "stages.yaml")
        eff = effective_policy(load_policy(greedy), "prototype", ceilings)
        stages = greedy.parent / "stages.yaml"
        assert eff.user_namespace is False
        assert eff.memory_bytes == 1 << 30
        assert dict(eff.env_set) == {"LANG": "C.UTF-8"}
        assert eff.env_allow == ("FOO",)
        assert eff.env_log == ("LANG",)
        notes = "\n".join(eff.notes)
        memory_line = _line_of("memory: 1GiB", stages)
        assert "limits.memory: 8GiB lowered to 1GiB" in notes
        assert f"{stages}:{memory_line})" in notes
        assert "user_namespace: true lowered to false" in notes
        for name in ("LD_PRELOAD", "BASH_ENV", "PYTHONSTARTUP"):
            assert f"{name} dropped" in notes, notes
        assert eff.rule("limits.memory").startswith(f"{stages}:{memory_line} ")

    def test_a_ceiling_adds_the_approvals_its_stage_requires(self, greedy: Path) -> None:
        """At pilot the shipped ceiling requires approval for a user namespace: an agent
        that has one gets the trigger, with a note; one that has none gets no noise."""
        ceilings = load_stage_ceilings(greedy.parent / "stages.yaml")
        eff = effective_policy(load_policy(greedy), "pilot", ceilings)
        assert eff.user_namespace is True
        assert "user_namespace" in eff.approval_required_for
        assert any("user_namespace added" in n for n in eff.notes)
        plain = effective_policy(load_policy(REPO / "policies" / "cve-triage.yaml"), "pilot",
                                 ceilings)
        assert plain.approval_required_for == ()
        assert plain.notes == ()


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60,
                          check=False)


AGENTCTL = (sys.executable, "-m", "agentd.cli.main")


class TestCommands:
    def test_policy_check_shows_each_clamp(self, greedy: Path) -> None:
        """`agentctl policy check` prints ok, then each clamp with its ceiling line."""
        done = _run(*AGENTCTL, "policy", "check", str(greedy))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"{greedy}: ok"
        assert any("prototype: clamped: limits.memory: 8GiB lowered to 1GiB" in line
                   for line in lines), done.stdout
        assert any("LD_PRELOAD dropped" in line for line in lines)

    def test_agentd_check_shows_each_clamp(self, greedy: Path) -> None:
        """`agentd --check` names the agent and each clamp of its effective policy."""
        config = greedy.parent / "agentd.toml"
        config.write_text(f'[daemon]\npolicy_dir = "{greedy.parent}"\n'
                          '[agents.greedy]\npolicy = "greedy.yaml"\nstage = "prototype"\n')
        done = _run(sys.executable, "-m", "agentd.daemon", "--check", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "greedy (prototype): clamped: user_namespace: true lowered to false" in \
            done.stdout

    @pytest.mark.parametrize("agent", ["shell-helper", "cve-triage"])
    def test_policy_effective_names_the_origin_of_every_field(self, agent: str) -> None:
        """`agentctl policy effective` prints every field with the line it came from."""
        done = _run(*AGENTCTL, "policy", "effective", agent, "--config",
                    str(REPO / "agentd.dev.toml"))
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert f"agent {agent}: policy {agent} at stage prototype" in text
        assert f"policies/{agent}.yaml:" in text
        assert "limits.memory: " in text
        assert "(default)" in text  # limits.writes is not written in either policy

    def test_policy_effective_shows_inheritance_and_clamps(self, greedy: Path) -> None:
        """At pilot the values inherited from prototype point at prototype's lines."""
        config = greedy.parent / "agentd.toml"
        config.write_text(f'[daemon]\npolicy_dir = "{greedy.parent}"\n'
                          '[agents.greedy]\npolicy = "greedy.yaml"\nstage = "prototype"\n')
        done = _run(*AGENTCTL, "policy", "effective", "greedy", "--stage", "pilot",
                    "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "stages.prototype.exec.allow" in done.stdout
        assert "stages.pilot.user_namespace" in done.stdout
        assert "clamped: limits.memory: 8GiB lowered to 4GiB" in done.stdout


@pytest.fixture(scope="module")
def greedy_daemon() -> Iterator[Any]:
    base = daemon_base()
    (base / "policies").mkdir()
    (base / "policies" / "greedy.yaml").write_text(GREEDY)
    handle = start_daemon(base, CONFIG + '\n[agents.greedy]\npolicy = "greedy.yaml"\n'
                                         'stage = "prototype"\n')
    try:
        yield handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.privileged
class TestInsideTheWorker:
    def test_clamped_env_and_user_namespace_are_really_absent(self, greedy_daemon: Any) -> None:
        """A worker of the clamped agent has neither LD_PRELOAD nor BASH_ENV set, and is in
        the host's user namespace (not a new one), as the clamp said."""
        stub = greedy_daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="greedy")).run_id
        try:
            result = execute(stub, run_id, ["/bin/sh", "-c",
                                            "env; echo UIDMAP; cat /proc/self/uid_map"])
            env, _, uid_map = result.text.partition("UIDMAP\n")
            assert "LD_PRELOAD" not in env
            assert "BASH_ENV" not in env
            assert "LANG=C.UTF-8" in env
            assert uid_map.split() == ["0", "0", "4294967295"], uid_map
            with pytest.raises(grpc.RpcError) as refused:
                execute(stub, run_id, ["/bin/true"], env={"PYTHONSTARTUP": "/tmp/x"})
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))

    def test_the_start_logs_every_clamp(self, greedy_daemon: Any) -> None:
        """The daemon's start-up log warns of each clamp of each agent."""
        log = greedy_daemon.log()
        assert "policy.clamped" in log
        assert "LD_PRELOAD dropped" in log
