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
    sha256:0a0b0c0d0e0f     a short policy hash (as `policy reload` prints it)
    192.0.2.80              an IPv4 address (where a name resolved: the walk-through below
                            runs against a fake internet, not the host's)
    /path/to/agentd         the checkout directory
    ...                     a line of its own: any number of lines (also none)

Runs of spaces compare as one space (table columns widen with their values).

The section "Letting an agent reach one host" is run by its own test, against a daemon made
from agentd.dev.toml with README's `[daemon]` lines for it, whose egress goes to a fake
internet (tests/fake_internet.py): a network namespace where security-tracker.debian.org
resolves to a test HTTPS server, with a certificate the daemon's workers trust (the daemon
runs in a mount namespace of its own whose CA bundle is the test CA; the host's is untouched).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentd_client import Client
from tests.conftest import REPO, DaemonHandle, daemon_base, start_daemon, stop_daemon
from tests.fake_internet import Internet, TestCA, trusting

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
    (r"sha256:[0-9a-f]{12}(?![0-9a-f])", r"sha256:[0-9a-f]{12}"),
    (r"\b\d{1,3}(\\\.\d{1,3}){3}\b", r"\\d{1,3}(\\.\\d{1,3}){3}"),
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

[agents.advisory-fetcher]
policy = "advisory-fetcher.yaml"
stage = "prototype"

[agents.cve-triage]
policy = "cve-triage.yaml"
stage = "prototype"
"""
# The walk-through run by TestEgressWalkThrough (and left out of TestReadme's daemon, which has
# no egress): its heading, and the fake internet's tracker at a benchmarking address.
EGRESS_SECTION = "### Letting an agent reach one host"
TRACKER, TRACKER_DNS = "198.18.2.10", "198.18.2.53"
TRACKER_NAME = "security-tracker.debian.org"
ADVISORY_PATH = "/tracker/CVE-2024-3094"
ADVISORY = b"<!DOCTYPE html>\n<title>CVE-2024-3094</title>\n<p>xz-utils: backdoor</p>\n"


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


def section(markdown: str, heading: str) -> tuple[str, str]:
    """(`markdown` without the section under `heading`, that section): from the heading to
    the next heading of its level or above."""
    start = markdown.index(f"\n{heading}\n") + 1
    level = len(heading) - len(heading.lstrip("#"))
    after = re.search(rf"^#{{1,{level}}} ", markdown[start + len(heading):], flags=re.M)
    end = start + len(heading) + after.start() if after else len(markdown)
    return markdown[:start] + markdown[end:], markdown[start:end]


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
    (base / "policies").mkdir()
    shutil.copy(REPO / "policies" / "advisory-fetcher.yaml", base / "policies")
    handle = start_daemon(base, CONFIG)  # copies stages.yaml and the other shipped policies
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


def run_blocks(blocks: list[list[Command]], ids: dict[str, str], cwd: Path) -> list[str]:
    """Every command of `blocks` run in order in `cwd`; what differs from README, per
    command."""
    problems = []
    for block in blocks:
        for command in block:
            actual = run(command.text, ids, cwd)
            why = match_output(command.expected, actual, ids, str(cwd))
            if why is not None:
                problems.append(f"$ {command.text}\n{why}")
    return problems


class TestReadme:
    def test_console_examples_are_what_really_happens(
            self, checkout: tuple[Path, DaemonHandle]) -> None:
        """Every command of every console block prints what README shows (the egress
        walk-through's blocks: TestEgressWalkThrough)."""
        base, _ = checkout
        blocks = console_blocks(section(README.read_text(), EGRESS_SECTION)[0])
        assert blocks, "README.md has no console blocks"
        problems = run_blocks(blocks, {}, base)
        assert not problems, "\n\n".join(problems)

    def test_the_checkout_registers_the_agents_of_agentd_dev_toml(self) -> None:
        """This test's daemon config has the agents `make run` has, at the same stages."""
        dev = tomllib.loads((REPO / "agentd.dev.toml").read_text())["agents"]
        assert tomllib.loads(CONFIG)["agents"] == dev

    def test_readme_links_stay_in_the_repository(self) -> None:
        """Every relative link of README points at a file of the repository."""
        text = README.read_text()
        assert "../shared" not in text
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (REPO / target).exists(), target


def _daemon_lines(settings: dict[str, object]) -> str:
    """TOML lines for `[daemon]` (booleans and strings: JSON spells them as TOML does)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


@pytest.fixture(scope="module")
def egress_checkout() -> Iterator[tuple[Path, DaemonHandle, Internet]]:
    """A checkout as the walk-through starts from: `make run`'s config (agentd.dev.toml) with
    the `[daemon]` lines README's section says to add, the repository's policies/, and the
    daemon started on it (as `make run` is, after that edit). Its egress goes to a fake
    internet where the tracker's name resolves to a test HTTPS server, whose certificate the
    workers trust."""
    base = daemon_base()
    internet = Internet(f"agentd-readme-{os.getpid()}", addresses=[TRACKER], dns=TRACKER_DNS,
                        zone={TRACKER_NAME: (TRACKER, 300)})
    handle = None
    try:
        ca = TestCA(base / "ca", [TRACKER_NAME])
        internet.serve_https(TRACKER, 443, ca.certificate, ca.key, {ADVISORY_PATH: ADVISORY})
        (base / "var").mkdir()
        (base / "run").symlink_to("var/run")  # where tests.conftest looks for the sockets
        (base / ".venv").symlink_to(REPO / ".venv")
        shutil.copytree(REPO / "policies", base / "policies")
        told = re.search(r"^```toml\n(.*?)^```", section(README.read_text(), EGRESS_SECTION)[1],
                         flags=re.S | re.M)
        assert told is not None, "the walk-through shows no ```toml block"
        settings = tomllib.loads(told.group(1))["daemon"]
        assert settings.get("egress") is True, settings
        config = (REPO / "agentd.dev.toml").read_text()
        extra = _daemon_lines({**settings, "cgroup_parent": f"agentd-test-{base.name}"})
        config = config.replace("[daemon]\n", "[daemon]\n" + extra + internet.daemon_settings(),
                                1)
        (base / "agentd.toml").write_text(config)
        (base / "agentd.dev.toml").symlink_to("agentd.toml")  # agentctl finds it in a checkout
        handle = start_daemon(base, keep_files=True, prefix=trusting(ca.ca))
        yield base, handle, internet
    finally:
        if handle is not None:
            stop_daemon(handle)
        internet.close()
        shutil.rmtree(base, ignore_errors=True)


class TestEgressWalkThrough:
    def test_the_walk_through_is_what_really_happens(
            self, egress_checkout: tuple[Path, DaemonHandle, Internet]) -> None:
        """README's "Letting an agent reach one host", command by command, with the shipped
        advisory-fetcher policy: the fetch succeeds and only it reached the (fake) internet;
        another name and another address are refused, each on record; the timeline shows
        them."""
        base, handle, internet = egress_checkout
        ids: dict[str, str] = {}
        blocks = console_blocks(section(README.read_text(), EGRESS_SECTION)[1])
        assert len(blocks) >= 3, "the walk-through has fewer console blocks than it should"
        problems = run_blocks(blocks, ids, base)
        assert not problems, "\n\n".join(problems)
        runs = [real for real in ids.values() if re.fullmatch(RUN_ID, real)]
        assert len(runs) == 1, ids
        with Client(str(handle.socket())) as client:
            assert client.read_file(runs[0], "CVE-2024-3094.html") == ADVISORY
        assert internet.seen == [f"{TRACKER}:443 {TRACKER_NAME} {ADVISORY_PATH}"]
        assert set(internet.queries) == {TRACKER_NAME}  # no other name left the daemon
        records = []
        for segment in sorted((base / "var" / "state" / "audit").glob("audit-*.jsonl")):
            records += [json.loads(line) for line in segment.read_text().splitlines() if line]
        mine = [r for r in records if r.get("run_id") == runs[0]]
        connections = [r["details"] for r in mine if r["event"] == "net.connection"]
        assert [(c["name"], c["destination"], c["port"]) for c in connections] == [
            (TRACKER_NAME, TRACKER, 443)]
        # Both refused at the daemon, before any packet or query left for the internet.
        refused = [r["details"] for r in mine if r["event"] == "net.refused"]
        assert [(d["destination"], d["port"]) for d in refused] == [
            ("deb.debian.org", 443), ("203.0.113.7", 443)]


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

    def test_short_hashes_and_addresses_vary(self) -> None:
        """A short policy hash and an IPv4 address stand for any; the words around them do
        not vary, and a full hash is not a short one."""
        expected = ["a (p, /path/to/agentd/a.yaml): sha256:0ee5a3702638 -> sha256:5d4c3b2a1f0e",
                    "net allowed  tracker.example 192.0.2.80:443  out 755 B"]
        actual = ["a (p, /c/a.yaml): sha256:111111111111 -> sha256:abcdefabcdef",
                  "net allowed tracker.example 198.18.2.10:443 out 1.2 KiB"]
        assert match_output(expected, actual, {}, "/c") is None
        assert match_output(expected[1:], ["net allowed other.example 198.18.2.10:443 out 1 B"],
                            {}, "/c") is not None
        assert match_output(["sha256:0ee5a3702638"], ["sha256:" + "a" * 64], {}, "/c") \
            is not None
