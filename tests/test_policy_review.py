"""The security reviewer's offline tools: `agentctl policy explain`, `diff` and `lint`, on the
shipped policies and on deliberately risky ones, through the real command line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("shell-helper.yaml", "cve-triage.yaml", "advisory-fetcher.yaml")
AGENTCTL = (sys.executable, "-m", "agentd.cli.main")

BASE = textwrap.dedent("""\
    apiVersion: agentd/v1
    kind: Policy
    name: reviewed
    stages:
      prototype:
        exec:
          allow: [/usr/bin/cat, /usr/bin/ls]
        filesystem:
          read_only: [/usr, /lib, /lib64]
          workspace: read_write
        limits:
          memory: 64MiB
          pids: 16
          cpu: 0.5
          wall_time: 10s
          output: 1MiB
          tmp: 8MiB
          open_files: 64
          file_size: 8MiB
          writes: 1MiB
          workspace: 64MiB
          inodes: 1000
          channel_state: 1MiB
      pilot:
        limits:
          memory: 128MiB
    """)


def agentctl(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENTCTL, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """A policy directory with the shipped stage ceilings."""
    shutil.copy(REPO / "policies" / "stages.yaml", tmp_path)
    return tmp_path


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


class TestExplain:
    @pytest.mark.parametrize("name", SHIPPED)
    def test_every_stage_of_a_shipped_policy_is_explained(self, name: str) -> None:
        done = agentctl("policy", "explain", f"policies/{name}", "--no-reach")
        assert done.returncode == 0, done.stderr
        for stage in ("prototype", "sandbox", "pilot", "production"):
            assert f"at stage {stage} " in done.stdout
        for heading in ("Programs it may run:", "Needs a person's approval", "Files:",
                        "Network:", "Environment:", "Limits, per task:",
                        "Clamped by the stage ceiling:"):
            assert heading in done.stdout
        assert f"policies/{name}:" in done.stdout  # every fact names its line

    def test_an_agent_is_explained_at_its_stage_with_the_clamps_and_reach(self) -> None:
        done = agentctl("policy", "explain", "shell-helper")  # agentd.dev.toml in the checkout
        assert done.returncode == 0, done.stderr
        assert "shell-helper at stage prototype" in done.stdout
        assert "/bin/sh  (runs code it is given)" in done.stdout
        assert "ELF programs inside the library directories" in done.stdout

    def test_a_clamp_and_an_approval_are_said_in_words(self, policies: Path) -> None:
        greedy = BASE.replace("  pilot:\n    limits:\n      memory: 128MiB\n",
                              "  pilot:\n    limits:\n      memory: 64GiB\n"
                              "    approval:\n      required_for: [exec:/usr/bin/ls]\n")
        assert greedy != BASE
        path = write(policies, "greedy.yaml", greedy)
        done = agentctl("policy", "explain", str(path), "--stage", "pilot", "--no-reach")
        assert done.returncode == 0, done.stderr
        clamped = done.stdout.split("Clamped by the stage ceiling:")[1]
        assert "limits.memory" in clamped
        assert "stages.yaml" in clamped
        assert "a step that runs /usr/bin/ls; in a step nobody approved it cannot be executed" \
            in done.stdout

    def test_an_unknown_target_is_a_clear_error(self) -> None:
        done = agentctl("policy", "explain", "no-such-agent")
        assert done.returncode == 2
        assert "neither a file nor an agent" in done.stderr
        assert "Traceback" not in done.stderr


class TestDiff:
    def test_the_same_capabilities_written_differently_are_no_change(
            self, policies: Path) -> None:
        old = write(policies, "old.yaml", BASE)
        reordered = BASE.replace("allow: [/usr/bin/cat, /usr/bin/ls]",
                                 "# reordered, with a comment\n      allow: [/usr/bin/ls, "
                                 "/usr/bin/cat]")
        new = write(policies, "new.yaml", reordered)
        done = agentctl("policy", "diff", str(old), str(new))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "stage prototype: no change in what the agent may do" in done.stdout

    def test_each_capability_that_moves_is_shown_with_its_direction(
            self, policies: Path) -> None:
        old = write(policies, "old.yaml", BASE)
        changed = (BASE.replace("allow: [/usr/bin/cat, /usr/bin/ls]",
                                "allow: [/usr/bin/cat, /usr/bin/python3]")
                   .replace("memory: 64MiB", "memory: 32MiB")
                   .replace("  pilot:\n", "  pilot:\n    approval:\n"
                            "      required_for: [exec:/usr/bin/python3]\n"))
        assert "approval" in changed
        new = write(policies, "new.yaml", changed)
        done = agentctl("policy", "diff", str(old), str(new))
        assert done.returncode == 1, done.stderr
        prototype = done.stdout.split("stage sandbox")[0]
        assert "+ exec.allow: may run /usr/bin/python3" in prototype
        assert "- exec.allow: no longer may run /usr/bin/ls" in prototype
        assert "- limits.memory: 64MiB -> 32MiB" in prototype
        pilot = done.stdout.split("stage pilot")[1].split("stage production")[0]
        assert "- approval.required_for: needs approval for exec:/usr/bin/python3" in pilot
        assert "limits.memory" not in pilot  # pilot's own 128MiB did not move

    def test_shipped_policies_against_themselves(self) -> None:
        for name in SHIPPED:
            done = agentctl("policy", "diff", f"policies/{name}", f"policies/{name}")
            assert done.returncode == 0, done.stdout
            assert "looser" not in done.stdout


class TestLint:
    def test_the_shipped_policies_pass_with_their_waivers_shown(self) -> None:
        done = agentctl("policy", "lint", *(f"policies/{name}" for name in SHIPPED))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "interpreter-unapproved" in done.stdout  # still shown...
        assert "(waived: " in done.stdout  # ...with the reason it is accepted

    def test_each_risky_grant_is_flagged_at_its_line(self, policies: Path) -> None:
        risky = textwrap.dedent("""\
            apiVersion: agentd/v1
            kind: Policy
            name: risky
            stages:
              prototype:
                exec:
                  allow:
                    - /usr/bin/cat
                    - /usr/bin/
                    - /workspace/tool
                    - /usr/bin/python3
                filesystem:
                  read_only: [/usr]
                approval:
                  required_for: [exec:/usr/bin/rm]
                limits:
                  memory: 64MiB
              pilot:
                limits:
                  memory: 64MiB
            """)
        path = write(policies, "risky.yaml", risky)
        # A host whose prototype ceiling lets /workspace execute (the shipped one does not: a
        # grant the ceiling removes is not the policy's risk, and lint does not report it).
        stages = policies / "stages.yaml"
        shipped = "      allow:\n        - /usr/bin/\n"
        assert shipped in stages.read_text()
        stages.write_text(stages.read_text().replace(
            shipped, shipped + "        - /workspace/\n", 1))
        done = agentctl("policy", "lint", str(path))
        assert done.returncode == 1, done.stdout + done.stderr
        out = done.stdout
        assert (f"{path}:9: prototype, sandbox, pilot, production: exec.allow: /usr/bin/ grants"
                " every program") in out
        assert (f"{path}:10: prototype: exec.allow: /workspace/tool is writable by the agent"
                in out)
        assert f"{path}:11: pilot, production: exec.allow: /usr/bin/python3 runs any code" in out
        assert "[trigger-bypassable]" in out
        assert "exec:/usr/bin/rm: an allowed interpreter" in out
        assert "limits.pids: not set in the file" in out
        assert "[missing-limit]" in out

    def test_a_waiver_names_its_rule_and_reason(self, policies: Path) -> None:
        text = BASE.replace("allow: [/usr/bin/cat, /usr/bin/ls]",
                            "allow:\n        - /usr/bin/cat\n        - /usr/bin/python3"
                            "  # lint: allow interpreter-unapproved (its job is Python)")
        path = write(policies, "waived.yaml", text)
        done = agentctl("policy", "lint", str(path))
        assert done.returncode == 0, done.stdout
        assert "(waived: its job is Python)" in done.stdout
        # A waiver for another rule waives nothing.
        other = write(policies, "other.yaml", text.replace("interpreter-unapproved",
                                                           "tree-grant"))
        done = agentctl("policy", "lint", str(other))
        assert done.returncode == 1, done.stdout

    def test_an_invalid_file_is_exit_2_with_file_and_line(self) -> None:
        done = agentctl("policy", "lint", "tests/policy_cases/bad/unknown-field.yaml")
        assert done.returncode == 2
        assert "unknown-field.yaml:" in done.stderr
        assert "Traceback" not in done.stderr


class TestPolicyTest:
    def test_the_shipped_cases_pass_and_report_coverage(self) -> None:
        done = agentctl("policy", "test", "policies/tests/shell-helper.test.yaml",
                        "policies/tests/cve-triage.test.yaml",
                        "policies/tests/advisory-fetcher.test.yaml")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "shell-helper.test.yaml: 10 of 10 cases pass (policies/shell-helper.yaml)" \
            in done.stdout
        assert "prototype: exec.allow: 3 of 45 entries exercised; none for:" in done.stdout
        assert "refusals exercised by: env.allow, exec.allow, limits.wall_time" in done.stdout
        assert ("advisory-fetcher.test.yaml: 10 of 10 cases pass"
                " (policies/advisory-fetcher.yaml)") in done.stdout
        assert "prototype: exec.allow: 1 of 1 entries exercised" in done.stdout

    def test_a_wrong_expectation_fails_with_what_was_decided(self, policies: Path) -> None:
        write(policies, "reviewed.yaml", BASE)
        cases = write(policies, "reviewed.test.yaml", textwrap.dedent("""\
            apiVersion: agentd/v1
            kind: PolicyTest
            policy: reviewed.yaml
            cases:
              - name: cat is allowed
                request: {argv: [/usr/bin/cat, x]}
                expect: allow
              - name: "ls is refused (wrong: it is allowed)"
                request: {argv: [/usr/bin/ls]}
                expect: refuse
              - name: python is refused by the wrong rule
                request: {argv: [/usr/bin/python3]}
                expect: refuse
                rule: env.allow
            """))
        done = agentctl("policy", "test", str(cases))
        assert done.returncode == 1, done.stdout + done.stderr
        assert ("FAIL " + str(cases) + ": ls is refused (wrong: it is allowed) (prototype): "
                "expected refuse, got allow: /usr/bin/ls may run") in done.stdout
        assert "python is refused by the wrong rule (prototype): expected refuse by env.allow," \
            " got refuse" in done.stdout
        assert "1 of 3 cases pass" in done.stdout

    def test_a_bad_case_file_names_file_line_and_field(self, policies: Path) -> None:
        write(policies, "reviewed.yaml", BASE)
        cases = write(policies, "bad.test.yaml", textwrap.dedent("""\
            apiVersion: agentd/v1
            kind: PolicyTest
            policy: reviewed.yaml
            cases:
              - name: a typo
                request: {argv: [/usr/bin/cat]}
                expect: allowed
            """))
        done = agentctl("policy", "test", str(cases))
        assert done.returncode == 2
        assert f"{cases}:7: cases[0].expect:" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.privileged
class TestPolicyTestAgreesWithTheDaemon:
    """`policy test` claims to decide as the daemon does: every shipped prototype case, sent to
    a real daemon as a step, gets the same decision there."""

    def test_every_shipped_case_is_decided_the_same_by_the_daemon(self, stub: Any) -> None:
        import grpc

        from agentd.api.gen.v1 import agentd_pb2 as pb
        from agentd.policy.loader import load_policy_tests

        tests = load_policy_tests(REPO / "policies" / "tests" / "shell-helper.test.yaml")
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        checked = 0
        try:
            for case in tests.cases:
                if (case.stage or tests.stage) != "prototype":
                    continue  # the test daemon runs shell-helper at prototype
                r = case.request
                task = pb.TaskSpec(name="t", argv=r.argv, env=r.env, cwd=r.cwd,
                                   timeout_seconds=r.timeout)
                try:
                    stub.Step(pb.StepRequest(run_id=run_id, tasks=[task]), timeout=60)
                    got = "allow"
                except grpc.RpcError as exc:
                    got = {grpc.StatusCode.PERMISSION_DENIED: "refuse",
                           grpc.StatusCode.INVALID_ARGUMENT: "invalid",
                           grpc.StatusCode.FAILED_PRECONDITION: "approval"}.get(
                               exc.code(), str(exc.code()))
                assert got == case.expect, (case.name, got)
                checked += 1
        finally:
            stub.CloseRun(pb.CloseRunRequest(run_id=run_id))
        assert checked >= 8


class TestFmt:
    MESSY = textwrap.dedent("""\
        # a reviewer's note on top
        apiVersion: agentd/v1
        kind: Policy
        name: messy
        stages:
          prototype:
            exec:
              allow: [/usr/bin/cat,   /usr/bin/ls]   # two tools
            filesystem: {read_only: [/usr, /lib, /lib64], workspace: read_write}
            env:
              allow: []  # nothing from the caller
            limits: {memory: 64MiB, pids: 16}
        """)

    def test_the_shipped_files_are_in_the_canonical_layout(self) -> None:
        done = agentctl("policy", "fmt", "--check", "policies/shell-helper.yaml",
                        "policies/cve-triage.yaml", "policies/advisory-fetcher.yaml",
                        "policies/stages.yaml")
        assert done.returncode == 0, done.stdout + done.stderr

    def test_fmt_keeps_comments_and_meaning_and_is_idempotent(self, policies: Path) -> None:
        from agentd.policy import effective_policy, load_policy, load_stage_ceilings

        path = write(policies, "messy.yaml", self.MESSY)
        ceilings = load_stage_ceilings(policies / "stages.yaml")
        before = effective_policy(load_policy(path), "prototype", ceilings).content_hash
        check = agentctl("policy", "fmt", "--check", str(path))
        assert check.returncode == 1, check.stdout
        assert path.read_text() == self.MESSY  # --check changes nothing
        done = agentctl("policy", "fmt", str(path))
        assert done.returncode == 0, done.stderr
        text = path.read_text()
        for comment in ("# a reviewer's note on top", "# two tools", "# nothing from the caller"):
            assert comment in text
        assert "\n        - /usr/bin/cat\n        - /usr/bin/ls\n" in text
        assert "allow: []" in text  # an empty list has no block form
        assert effective_policy(load_policy(path), "prototype", ceilings).content_hash == before
        again = agentctl("policy", "fmt", "--check", str(path))
        assert again.returncode == 0, again.stdout
        assert f"{path}: unchanged" in again.stdout

    def test_an_invalid_file_is_left_alone(self, policies: Path) -> None:
        broken = self.MESSY.replace("pids: 16", "pids: 16, colour: blue")
        path = write(policies, "broken.yaml", broken)
        done = agentctl("policy", "fmt", str(path))
        assert done.returncode == 2
        assert f"{path}:12: stages.prototype.limits.colour:" in done.stderr
        assert path.read_text() == broken
