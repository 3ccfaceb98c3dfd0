"""Loading policy and stages files: the shipped files, and every kind of error with its line.

Each file in tests/policy_cases/bad/ states the errors it must produce in `# expect:` lines
(`# expect: <line> <field or -> | <part of the message>`), so a case and its expectation are
read together.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from agentd.errors import InvalidArgument, PolicyError
from agentd.policy import (
    STAGES,
    Policy,
    PolicyFileError,
    StageCeilings,
    check_policy_file,
    load_policy,
    load_stage_ceilings,
)

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests" / "policy_cases"
BAD = sorted((CASES / "bad").glob("*.yaml"))
GOOD = sorted((CASES / "good").glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (?P<line>\d+) (?P<field>\S+) \| (?P<text>.+)$")


def expectations(path: Path) -> list[tuple[int, str | None, str]]:
    """The (line, field, message part) triples a bad case declares."""
    found = []
    for text in path.read_text().splitlines():
        match = _EXPECT.match(text)
        if match:
            field = None if match["field"] == "-" else match["field"]
            found.append((int(match["line"]), field, match["text"]))
    return found


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestShippedFiles:
    def test_stage_ceilings_load(self) -> None:
        """policies/stages.yaml loads and gives a ceiling for all four stages."""
        ceilings = load_stage_ceilings(REPO / "policies" / "stages.yaml")
        for stage in STAGES:
            assert ceilings.ceiling(stage).network == "none"
        assert ceilings.ceiling("prototype").limits.memory == 1 << 30

    def test_stage_ceilings_widen_with_each_stage(self) -> None:
        """Each stage's ceiling is at least the one before it, so promotion never removes."""
        ceilings = load_stage_ceilings(REPO / "policies" / "stages.yaml")
        for lower, higher in itertools.pairwise(STAGES):
            low, high = ceilings.ceiling(lower), ceilings.ceiling(higher)
            for name in type(low.limits).model_fields:
                assert getattr(high.limits, name) >= getattr(low.limits, name), (higher, name)
            assert set(low.exec.allow) <= set(high.exec.allow)
            assert set(low.filesystem.read_only) <= set(high.filesystem.read_only)

    @pytest.mark.parametrize("name", ["cve-triage", "shell-helper"])
    def test_example_policies_load(self, name: str) -> None:
        """The two reviewed example policies load and declare prototype."""
        policy = load_policy(REPO / "policies" / f"{name}.yaml")
        assert policy.name == name
        assert "prototype" in policy.declared_stages()
        assert policy.resolve("prototype") is not None

    def test_example_executables_exist(self) -> None:
        """Every file the example policies allow to run exists on this Debian 12 host."""
        for name in ("cve-triage", "shell-helper"):
            policy = load_policy(REPO / "policies" / f"{name}.yaml")
            for stage in policy.declared_stages():
                resolved = policy.resolve(stage)
                assert resolved is not None
                for entry in resolved.rules.exec.allow:
                    assert Path(entry).exists(), f"{name}: {entry} does not exist"

    def test_integration_policy(self) -> None:
        """tests/policy_cases/integration.yaml has exactly the values the daemon tests rely on."""
        policy = load_policy(CASES / "integration.yaml")
        assert policy.name == "integration"
        assert policy.declared_stages() == ("prototype", "production")
        resolved = policy.resolve("prototype")
        assert resolved is not None
        rules = resolved.rules
        assert rules.exec.allow == (
            "/bin/", "/usr/bin/", "/usr/sbin/", "/sbin/", "/usr/local/bin/", "/usr/lib/"
        )
        assert rules.filesystem.read_only == (
            "/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc/ssl", "/etc/alternatives"
        )
        assert rules.filesystem.workspace == "read_write"
        assert rules.env.allow == ("GREETING", "FOO")
        assert rules.env.set == {"LANG": "C.UTF-8"}
        assert rules.env.log == ("LANG",)
        limits = rules.limits
        assert (limits.memory, limits.pids, limits.cpu, limits.wall_time) == (128 << 20, 32, 1, 30)
        assert (limits.output, limits.tmp, limits.open_files, limits.file_size) == (
            1 << 20, 16 << 20, 128, 64 << 20
        )
        production = policy.resolve("production")
        assert production is not None
        assert production.rules.user_namespace is True
        assert production.rules.exec.allow == rules.exec.allow

    @pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
    def test_good_cases_load(self, path: Path) -> None:
        """Every file in tests/policy_cases/good/ is valid."""
        assert isinstance(check_policy_file(path), Policy | StageCeilings)


class TestCheckPolicyFile:
    def test_detects_stage_ceilings(self) -> None:
        """A file with kind StageCeilings is validated as stage ceilings."""
        assert isinstance(check_policy_file(REPO / "policies" / "stages.yaml"), StageCeilings)

    def test_detects_policy(self) -> None:
        """A file with kind Policy is validated as a policy."""
        assert isinstance(check_policy_file(REPO / "policies" / "cve-triage.yaml"), Policy)

    def test_load_policy_refuses_stages_file(self) -> None:
        """load_policy on a stages file says the kind is wrong, at the kind line."""
        path = REPO / "policies" / "stages.yaml"
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        kind_line = path.read_text().splitlines().index("kind: StageCeilings") + 1
        kind = [issue for issue in info.value.issues if issue.field == "kind"]
        assert len(kind) == 1
        assert kind[0].line == kind_line
        assert "kind 'StageCeilings' is not 'Policy'" in kind[0].message

    def test_load_stage_ceilings_refuses_policy(self) -> None:
        """load_stage_ceilings on a policy reports the kind, the name and the missing stages."""
        with pytest.raises(PolicyFileError) as info:
            load_stage_ceilings(CASES / "good" / "minimal.yaml")
        fields = {issue.field for issue in info.value.issues}
        assert fields == {
            "kind", "name", "stages.sandbox", "stages.pilot", "stages.production"
        }


class TestBadCases:
    @pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
    def test_reports_every_error_at_its_line(self, path: Path) -> None:
        """Each bad case yields exactly its expected errors: line, field and message."""
        expected = expectations(path)
        assert expected, f"{path.name} declares no '# expect:' lines"
        with pytest.raises(PolicyFileError) as info:
            check_policy_file(path)
        got = [(issue.line, issue.field, issue.message) for issue in info.value.issues]
        assert sorted((line, field) for line, field, _ in got) == sorted(
            (line, field) for line, field, _ in expected
        ), "\n".join(str(issue) for issue in info.value.issues)
        for line, field, text in expected:
            messages = [m for g_line, g_field, m in got if (g_line, g_field) == (line, field)]
            assert any(text in m for m in messages), (line, field, text, messages)

    @pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
    def test_message_names_file_line_and_field(self, path: Path) -> None:
        """The message has one line per error, each starting with file:line and the field."""
        with pytest.raises(PolicyFileError) as info:
            check_policy_file(path)
        error = info.value
        lines = str(error).splitlines()
        assert len(lines) == len(error.issues)
        for text, issue in zip(lines, error.issues, strict=True):
            assert text.startswith(f"{path}:{issue.line}: ")
            if issue.field:
                assert text.startswith(f"{path}:{issue.line}: {issue.field}: ")
        first = error.issues[0]
        assert (error.file, error.line, error.field) == (first.file, first.line, first.field)

    def test_errors_are_invalid_argument(self) -> None:
        """A bad file is a PolicyError, hence INVALID_ARGUMENT at the API."""
        with pytest.raises(PolicyError) as info:
            load_policy(CASES / "bad" / "bad-size.yaml")
        assert isinstance(info.value, InvalidArgument)
        assert info.value.code == "INVALID_ARGUMENT"


class TestFileProblems:
    def test_zero_byte_file(self, tmp_path: Path) -> None:
        """A zero-byte file is reported as empty, at line 1."""
        path = write(tmp_path, "")
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert info.value.line == 1
        assert "the file is empty" in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that does not exist is a PolicyError naming it, not an OSError."""
        path = tmp_path / "nope.yaml"
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert str(info.value) == f"{path}: cannot read the file: No such file or directory"

    def test_not_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are reported with the line they are on."""
        path = tmp_path / "latin1.yaml"
        path.write_bytes(b"apiVersion: agentd/v1\nkind: Policy\nname: caf\xe9\n")
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert info.value.line == 3
        assert "not valid UTF-8" in str(info.value)

    def test_too_large(self, tmp_path: Path) -> None:
        """A file over 1MiB is refused before it is parsed."""
        path = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
        with pytest.raises(PolicyFileError, match="larger than 1MiB"):
            load_policy(path)

    def test_two_documents(self, tmp_path: Path) -> None:
        """A file with two YAML documents is a syntax error at the second one."""
        path = write(tmp_path, "apiVersion: agentd/v1\n---\nkind: Policy\n")
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert info.value.line == 2
        assert "expected a single document" in str(info.value)

    def test_non_string_key(self, tmp_path: Path) -> None:
        """A mapping key that is a number is refused at its line."""
        path = write(tmp_path, "apiVersion: agentd/v1\nkind: Policy\n1: x\n")
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert any(i.line == 3 and "is not a name" in i.message for i in info.value.issues)


class TestYamlValues:
    BASE = "apiVersion: agentd/v1\nkind: Policy\nname: values\nstages:\n  prototype:\n"

    def test_yes_is_not_true(self, tmp_path: Path) -> None:
        """YAML 1.2: `yes` is a string, so user_namespace: yes is refused, not read as true."""
        path = write(tmp_path, self.BASE + "    user_namespace: yes\n")
        with pytest.raises(PolicyFileError) as info:
            load_policy(path)
        assert (info.value.line, info.value.field) == (6, "stages.prototype.user_namespace")

    def test_hex_and_underscore_integers(self, tmp_path: Path) -> None:
        """Integers in YAML 1.2 forms (hex, octal, underscores) read as numbers."""
        text = self.BASE + "    limits: {pids: 0x20, open_files: 0o400, memory: 1_048_576}\n"
        resolved = load_policy(write(tmp_path, text)).resolve("prototype")
        assert resolved is not None
        limits = resolved.rules.limits
        assert (limits.pids, limits.open_files, limits.memory) == (32, 256, 1 << 20)

    def test_quoted_values_are_strings(self, tmp_path: Path) -> None:
        """Quoted env values stay text, including ones that look like numbers."""
        text = self.BASE + '    env: {set: {A: "1", B: "true"}}\n'
        resolved = load_policy(write(tmp_path, text)).resolve("prototype")
        assert resolved is not None
        assert resolved.rules.env.set == {"A": "1", "B": "true"}


class TestPositions:
    def test_lines_of_fields(self) -> None:
        """A loaded policy knows the line of each key and list item."""
        path = REPO / "policies" / "cve-triage.yaml"
        policy = load_policy(path)
        lines = path.read_text().splitlines()
        allow = policy.line("stages.prototype.exec.allow")
        assert allow is not None
        assert lines[allow - 1].strip() == "allow:"
        first = policy.line("stages.prototype.exec.allow[0]")
        assert first is not None
        assert lines[first - 1].split("#")[0].strip() == "- /usr/bin/python3"

    def test_source_is_path_as_given(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The source is the path exactly as the caller gave it (relative stays relative)."""
        monkeypatch.chdir(CASES)
        assert load_policy("good/minimal.yaml").source == "good/minimal.yaml"
        assert load_policy(Path("good/minimal.yaml")).source == "good/minimal.yaml"

    def test_where_marks_defaults(self) -> None:
        """where() gives file:line of a written field, and marks a default as such."""
        policy = load_policy(CASES / "good" / "minimal.yaml")
        source = policy.source
        assert policy.where("stages.prototype") == f"{source}:6 stages.prototype"
        assert (
            policy.where("stages.prototype.exec.allow", fallback="stages.prototype")
            == f"{source}:6 stages.prototype.exec.allow (default)"
        )
