"""Fuzzing the policy loader: whatever a file holds, the loader answers with PolicyFileError
naming the file (and the line where it has one), or a valid policy. Never another exception.

Inputs are random YAML trees (written as YAML flow text, which is also how JSON looks), random
text, and mutations of the shipped policies and stage ceilings (a line dropped, doubled,
re-indented, cut short, a value replaced). A policy that loads is then clamped to every stage
with the shipped ceilings: only the documented AgentdErrors may come out of that.

Bounded: AGENTD_FUZZ_EXAMPLES examples per test (default 100), derandomized, so `make test`
stays fast and repeatable; raise the variable to search longer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.errors import AgentdError
from agentd.policy import (
    STAGES,
    PolicyFileError,
    check_policy_file,
    effective_policy,
    load_stage_ceilings,
)
from agentd.policy.model import Policy

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "policies").glob("*.yaml"))
CEILINGS = load_stage_ceilings(REPO / "policies" / "stages.yaml")
# AGENTD_FUZZ_RANDOM=1 searches new inputs instead of the fixed, repeatable ones.
RANDOM = os.environ.get("AGENTD_FUZZ_RANDOM")
FUZZ = settings(max_examples=int(os.environ.get("AGENTD_FUZZ_EXAMPLES", "100")),
                derandomize=RANDOM is None, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["apiVersion", "kind", "name", "description", "stages", "prototype", "sandbox", "pilot",
        "production", "exec", "allow", "filesystem", "read_only", "workspace", "network",
        "user_namespace", "env", "set", "log", "limits", "memory", "pids", "cpu", "wall_time",
        "output", "tmp", "open_files", "file_size", "writes", "channel_state", "approval",
        "required_for"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(["agentd/v1", "Policy", "StageCeilings", "none", "read_write", "1MiB",
                     "60s", "/usr/bin/", "/bin/sh", "exec:/usr/bin/rm", "-1", "1e309",
                     "12 parsecs", "~", "..", "/", "", "\0", "\ud800"]),
    st.text(max_size=20))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children,
                        max_size=5)),
    max_leaves=30)


def check(path: Path) -> None:
    """The property: PolicyFileError naming the file, or a document that clamps cleanly."""
    failed: PolicyFileError | None = None
    try:
        document = check_policy_file(path)
    except PolicyFileError as error:
        failed = error
    if failed is not None:
        assert failed.issues
        lines = path.read_bytes().count(b"\n") + 2
        for issue in failed.issues:
            assert issue.file == str(path), issue
            assert issue.line is None or 1 <= issue.line <= lines, issue
            assert issue.message, issue
        return
    if isinstance(document, Policy):
        for stage in STAGES:
            refused: AgentdError | None = None
            try:
                effective_policy(document, stage, CEILINGS)
            except AgentdError as error:
                refused = error
            assert refused is None or refused.message


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "fuzzed.yaml"
    path.write_bytes(data)
    return path


def _json_safe(tree: Any) -> str:
    return json.dumps(tree, ensure_ascii=False, allow_nan=True)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A shipped policy or stages file with a few line-level mutations."""
    lines = draw(st.sampled_from(SHIPPED)).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["drop", "double", "indent", "dedent", "cut", "value",
                                    "key", "insert"]))
        line = lines[i]
        if how == "drop":
            del lines[i]
        elif how == "double":
            lines.insert(i, line)
        elif how == "indent":
            lines[i] = "  " + line
        elif how == "dedent":
            lines[i] = line[2:]
        elif how == "cut":
            lines[i] = line[:draw(st.integers(0, len(line)))]
        elif how == "value" and ":" in line:
            head = line.split(":", 1)[0]
            lines[i] = f"{head}: {_json_safe(draw(trees))}"
        elif how == "key":
            indent = len(line) - len(line.lstrip())
            lines[i] = " " * indent + f"{draw(st.sampled_from(KEYS))}: {line.strip()}"
        else:
            indent = len(line) - len(line.lstrip())
            lines.insert(i, " " * indent + f"{draw(st.sampled_from(KEYS))}: "
                         f"{_json_safe(draw(trees))}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


class TestFuzzPolicyLoader:
    @FUZZ
    @given(tree=trees)
    def test_random_trees(self, tmp_path: Path, tree: Any) -> None:
        """Any YAML tree loads or fails with PolicyFileError naming file and line."""
        check(write(tmp_path, _json_safe(tree).encode("utf-8", "surrogatepass")))

    @FUZZ
    @given(base=st.fixed_dictionaries({"apiVersion": st.just("agentd/v1"),
                                       "kind": st.sampled_from(["Policy", "StageCeilings"]),
                                       "name": st.just("fuzz"),
                                       "stages": st.dictionaries(st.sampled_from(STAGES),
                                                                 trees, max_size=4)}))
    def test_random_stage_sections(self, tmp_path: Path, base: dict[str, Any]) -> None:
        """Well-formed headers with random stage sections: the validation layer's turn."""
        check(write(tmp_path, _json_safe(base).encode("utf-8", "surrogatepass")))

    @FUZZ
    @given(data=mutated())
    def test_mutations_of_the_shipped_files(self, tmp_path: Path, data: bytes) -> None:
        """The shipped files, damaged line by line, still get a located error or load."""
        check(write(tmp_path, data))

    @FUZZ
    @given(data=st.binary(max_size=300))
    def test_random_bytes(self, tmp_path: Path, data: bytes) -> None:
        """Bytes that may not even be UTF-8."""
        check(write(tmp_path, data))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_files_load(path: Path) -> None:
    """The seeds of the mutations are themselves valid."""
    check_policy_file(path)
