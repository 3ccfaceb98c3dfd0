"""README.md's console examples, run for real against a real daemon.

Every ```console block of README.md is a session: each `$ ` line (with `\\`-continued lines)
is run with bash in a directory laid out like a checkout in development mode (`.venv`,
`policies/`, `var/run/agentd.sock`, `var/state/`), and what it prints (stdout and stderr
together) must be what README shows below it. Blocks run in order, against one daemon.

Placeholders: README shows real output, and these parts of it stand for whatever the real
run prints in their place (a line of README is turned into a pattern by these rules):

    r-0123456789ab          a run id. The first real id printed where README shows an id is
                            bound to it: later commands have README's id replaced by the real
                            one, and later output must show that same real id.
    sha256:<64 hex digits>  a policy version (its whole hash), bound the same way
    record 12, records 3, 4 audit record indexes (any number of them)
    2026-11-25 13:51:53Z    a timestamp (any date and time in that shape; also with .123
                            milliseconds)
    Nov 25 13:51            a time as `ls -l` prints it
    512.0 KiB, 6 B          a size: any number of any unit (B, KiB, MiB, GiB, TiB)
    1.00, 0.53              a number with a decimal point: any such number
    records: 9, heads: 3    counts of audit records, segments and tree heads
    pid=4242                a caller's pid (as SO_PEERCRED reported it)
    /path/to/agentd         the checkout directory
    ...                     a line of its own: any number of lines (also none)

Runs of spaces compare as one space (table columns widen with their values).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, DaemonHandle, daemon_base, start_daemon, stop_daemon

pytestmark = pytest.mark.privileged

README = REPO / "README.md"
CHECKOUT = "/path/to/agentd"
RUN_ID = r"r-[0-9a-f]{12}"
SOURCE = r"sha256:[0-9a-f]{64}"
# The bindable ids: (group name, how README writes one, how it looks after re.escape).
IDS = [("id", RUN_ID, r"r\\-[0-9a-f]{12}"), ("src", SOURCE, SOURCE)]
# (pattern in README's text, regex it stands for); applied after re.escape of the line.
PLACEHOLDERS = [
    (re.escape(CHECKOUT), "{checkout}"),
    (r"\d{4}\\-\d{2}\\-\d{2}\\ \d{2}:\d{2}:\d{2}(\\.\d{3})?Z",
     r"\\d{4}-\\d{2}-\\d{2} \\d{2}:\\d{2}:\\d{2}(\\.\\d{3})?Z"),
    (r"[A-Z][a-z]{2}\\ [ \d]?\d\\ \d{2}:\d{2}", r"[A-Z][a-z]{2} +\\d+ \\d{2}:\\d{2}"),
    (r"\d+(\\\.\d+)?\\ (B|KiB|MiB|GiB|TiB)\b", r"\\d+(\\.\\d+)? (B|KiB|MiB|GiB|TiB)"),
    (r"\d+\\\.\d+", r"\\d+\\.\\d+"),
    (r"(records|segment\\\(s\\\)|heads):\\ \d+", r"\1: \\d+"),
    (r"\d+\\ (in\\ )", r"\\d+ \1"),
    (r"pid=\d+", r"pid=\\d+"),
    (r"(records?)\\ \d+((,\\ |\\\.\\\.)\d+)*", r"\1 \\d+((, |\\.\\.)\\d+)*"),
]
CONFIG = """
[daemon]
state_dir = "var/state"
runtime_dir = "var/run"
policy_dir = "policies"
log_format = "json"
cgroup_parent = "agentd-test-{instance}"

[agents.shell-helper]
policy = "shell-helper.yaml"
stage = "prototype"

[agents.cve-triage]
policy = "cve-triage.yaml"
stage = "prototype"
"""


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)


def console_blocks(markdown: str) -> list[list[Command]]:
    """The ```console blocks of `markdown`, each a list of commands with their output."""
    blocks: list[list[Command]] = []
    for body in re.findall(r"^```console\n(.*?)^```", markdown, flags=re.S | re.M):
        commands: list[Command] = []
        continued = False
        for line in body.splitlines():
            if continued:
                commands[-1].text += "\n" + line
            elif line.startswith("$ "):
                commands.append(Command(line[2:]))
            else:
                assert commands, f"output before any command in a console block: {line!r}"
                commands[-1].expected.append(line)
            continued = line.endswith("\\") and not commands[-1].expected
        blocks.append(commands)
    return blocks


def line_pattern(line: str, ids: dict[str, str], checkout: str) -> str:
    """The regex README's output line stands for (see the placeholders above)."""
    escaped = re.escape(re.sub(r" +", " ", line.strip()))
    for pattern, replacement in PLACEHOLDERS:
        escaped = re.sub(pattern, replacement, escaped)
    escaped = escaped.replace("{checkout}", re.escape(checkout))
    for readme_hex, real_hex in ids.items():  # a bound version named by its digits alone
        if re.fullmatch(r"[0-9a-f]{12}", readme_hex):
            escaped = re.sub(rf"(?<![:0-9a-f]){readme_hex}\b", real_hex, escaped)
    for group, shape, escaped_shape in IDS:
        unbound = [False]

        def bind(found: re.Match[str], group: str = group, shape: str = shape,
                 unbound: list[bool] = unbound) -> str:
            readme_id = found.group(0).replace("\\", "")
            if readme_id in ids:
                return re.escape(ids[readme_id])
            if unbound[0]:
                return shape
            unbound[0] = True
            return f"(?P<{group}>{shape})"

        escaped = re.sub(escaped_shape, bind, escaped)
    return escaped


def match_output(expected: list[str], actual: list[str], ids: dict[str, str],
                 checkout: str) -> str | None:
    """Why `actual` is not what README shows, or None; binds new run ids in `ids`."""
    actual = [re.sub(r" +", " ", a.strip()) for a in actual]

    def go(e: int, a: int) -> bool:
        if e == len(expected):
            return a == len(actual)
        if expected[e].strip() == "...":
            return any(go(e + 1, k) for k in range(a, len(actual) + 1))
        if a == len(actual):
            return False
        found = re.fullmatch(line_pattern(expected[e], ids, checkout), actual[a])
        if found is None:
            return False
        for group, shape, _ in IDS:
            new = [i for i in re.findall(shape, expected[e]) if i not in ids]
            real = found.groupdict().get(group)
            if new and real:
                ids[new[0]] = real
        return go(e + 1, a + 1)

    if go(0, 0):
        return None
    return "README shows:\n" + "\n".join(expected) + "\nreal output:\n" + "\n".join(actual)


@pytest.fixture(scope="module")
def checkout() -> Iterator[tuple[Path, DaemonHandle]]:
    """A directory laid out like a checkout in development mode, with its daemon running."""
    base = daemon_base()
    (base / "var").mkdir()
    (base / "run").symlink_to("var/run")  # where tests.conftest looks for the sockets
    (base / ".venv").symlink_to(REPO / ".venv")
    (base / "tests").symlink_to(REPO / "tests")
    handle = start_daemon(base, CONFIG)  # copies stages.yaml and the shipped policies
    (base / "policies" / "integration.yaml").unlink()  # not part of a checkout's policies/
    shutil.copytree(REPO / "policies" / "schema", base / "policies" / "schema")
    shutil.copytree(REPO / "policies" / "tests", base / "policies" / "tests")
    try:
        yield base, handle
    finally:
        stop_daemon(handle)
        shutil.rmtree(base, ignore_errors=True)


def run(command: str, ids: dict[str, str], cwd: Path) -> list[str]:
    for readme_id, real in ids.items():
        command = command.replace(readme_id, real)
    env = {k: v for k, v in os.environ.items() if k != "AGENTD_SOCKET"}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=120, check=False)
    return result.stdout.decode(errors="replace").splitlines()


class TestReadme:
    def test_console_examples_are_what_really_happens(
            self, checkout: tuple[Path, DaemonHandle]) -> None:
        """Every command of every console block prints what README shows."""
        base, _ = checkout
        ids: dict[str, str] = {}
        blocks = console_blocks(README.read_text())
        assert blocks, "README.md has no console blocks"
        problems = []
        for block in blocks:
            for command in block:
                actual = run(command.text, ids, base)
                why = match_output(command.expected, actual, ids, str(base))
                if why is not None:
                    problems.append(f"$ {command.text}\n{why}")
        assert not problems, "\n\n".join(problems)

    def test_readme_links_stay_in_the_repository(self) -> None:
        """Every relative link of README points at a file of the repository."""
        text = README.read_text()
        assert "../shared" not in text
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (REPO / target).exists(), target


class TestPlaceholders:
    def test_ids_bind_and_must_stay_the_same(self) -> None:
        """A README id binds to the real one, and then only that one matches."""
        ids: dict[str, str] = {}
        assert match_output(["r-000000000001"], ["r-abcdefabcdef"], ids, "/c") is None
        assert ids == {"r-000000000001": "r-abcdefabcdef"}
        assert match_output(["closed r-000000000001"], ["closed r-111111111111"], ids,
                            "/c") is not None

    def test_varying_parts_and_ellipsis(self) -> None:
        """Times, decimals and counts vary; words do not; `...` spans lines."""
        expected = ["step 1 committed (2 tasks, 0.05 s)", "...", "end /path/to/agentd/x"]
        assert match_output(expected, ["step 1 committed (2 tasks, 1.75 s)", "a", "b",
                                       "end /c/x"], {}, "/c") is None
        assert match_output(expected, ["step 2 committed (2 tasks, 1.75 s)", "end /c/x"],
                            {}, "/c") is not None
        assert match_output(["peak memory 512.0 KiB"], ["peak memory 2 MiB"], {}, "/c") is None
