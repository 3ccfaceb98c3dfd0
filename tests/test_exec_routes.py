"""exec.allow holds by every route, inside real workers of the shipped policies.

A program the effective policy does not grant must not run: not by execve, not through the
dynamic loader run as a program, not as a copy in /workspace or /tmp, a symlink, a hard link,
a memfd, execveat, an interpreter's exec function or a shebang line. Each attempt would print
a marker if the program ran; the test asserts the marker is absent (and, where the shell
reports it, that the kernel refused). The mechanism is in agentd/policy/execset.py.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentd.api.gen.v1 import agentd_pb2 as pb
from agentd.cli import output
from agentd.client import StepReply
from agentd.policy import EffectivePolicy, effective_policy, load_policy, load_stage_ceilings
from agentd.policy.execset import exec_mounts, reach
from tests import test_steps as steps_tests
from tests.conftest import REPO, DaemonHandle, Result, execute, sh

pytestmark = pytest.mark.privileged

LOADER = "/lib64/ld-linux-x86-64.so.2"
MARK = "RAN-" + "NOT-GRANTED"
# Not granted by shell-helper nor cve-triage, and each prints MARK if it runs.
FOREIGN = {
    "perl": ["/usr/bin/perl", "-e", f'print "{MARK}\\n"'],
    "python3": ["/usr/bin/python3", "-c", f"print('{MARK}')"],
    "ln": ["/usr/bin/ln", "--version"],  # prints "ln (GNU coreutils)": MARK is its output
}


def _ran(result: Result, name: str) -> bool:
    marker = "GNU coreutils" if name == "ln" else MARK
    return marker in result.stdout.decode(errors="replace")


def _denied(handle: DaemonHandle, run_id: str) -> list[dict[str, object]]:
    """The exec.denied records of a run (agentd/sandbox/execwatch.py)."""
    return [r["details"] for r in steps_tests.audit_records(handle)
            if r.get("run_id") == run_id and r["event"] == "exec.denied"]


def _recorded(handle: DaemonHandle, run_id: str, path: str, *, refused: bool = True) -> bool:
    return any(d["path"] == path and d["refused"] is refused for d in _denied(handle, run_id))


def _quoted(argv: list[str]) -> str:
    return " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)


@pytest.fixture(params=["shell-helper", "cve-triage"])
def agent_run(request: pytest.FixtureRequest, daemon: DaemonHandle) -> Iterator[tuple[str, str]]:
    stub = daemon.stub()
    run = stub.CreateRun(pb.CreateRunRequest(agent=request.param))
    yield request.param, run.run_id
    with contextlib.suppress(grpc.RpcError):
        stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))


def _foreign(agent: str) -> list[str]:
    # cve-triage grants python3, so python3 is not foreign there.
    return [n for n in FOREIGN if not (agent == "cve-triage" and n == "python3")]


class TestShellRoutes:
    """Routes a shell alone can take; every shipped policy grants /bin/sh."""

    def test_granted_programs_still_run(self, daemon: DaemonHandle,
                                        agent_run: tuple[str, str]) -> None:
        _, run_id = agent_run
        result = sh(daemon.stub(), run_id, "echo ok | cat; id -u; ls / >/dev/null && echo ls")
        assert result.outcome is not None
        assert result.outcome.exit_code == 0, result.stderr
        assert result.text.split() == ["ok", "65534", "ls"]

    def test_direct_execve_is_refused(self, daemon: DaemonHandle,
                                      agent_run: tuple[str, str]) -> None:
        agent, run_id = agent_run
        for name in _foreign(agent):
            result = sh(daemon.stub(), run_id, _quoted(FOREIGN[name]) + "; echo rc=$?")
            assert not _ran(result, name), (agent, name, result.stdout)
            assert "rc=126" in result.text, (agent, name, result.stdout, result.stderr)
            assert _recorded(daemon, run_id, FOREIGN[name][0]), _denied(daemon, run_id)

    def test_loader_as_a_program_cannot_map_it(self, daemon: DaemonHandle,
                                               agent_run: tuple[str, str]) -> None:
        agent, run_id = agent_run
        for name in _foreign(agent):
            result = sh(daemon.stub(), run_id, f"{LOADER} {_quoted(FOREIGN[name])}")
            assert not _ran(result, name), (agent, name, result.stdout)
            assert result.outcome is not None
            assert result.outcome.exit_code != 0
        # The loader itself runs (it is every program's interpreter) but is on record.
        assert _recorded(daemon, run_id, LOADER, refused=False), _denied(daemon, run_id)

    def test_copies_in_workspace_and_tmp_do_not_run(self, daemon: DaemonHandle,
                                                     agent_run: tuple[str, str]) -> None:
        agent, run_id = agent_run
        for where in ("/workspace", "/tmp"):
            script = (f"cp /usr/bin/perl {where}/p && {where}/p -e 'print \"{MARK}\\n\"';"
                      f" {LOADER} {where}/p -e 'print \"{MARK}\\n\"'; echo done")
            result = sh(daemon.stub(), run_id, script)
            assert "done" in result.text, (agent, where, result.stderr)
            assert MARK not in result.text, (agent, where, result.stdout)
            assert _recorded(daemon, run_id, f"{where}/p"), _denied(daemon, run_id)

    def test_symlinks_and_hard_links_do_not_run(self, daemon: DaemonHandle,
                                                agent_run: tuple[str, str]) -> None:
        agent, run_id = agent_run
        script = (f"cp -s /usr/bin/perl /tmp/s; /tmp/s -e 'print \"{MARK}\\n\"';"
                  f" cp -l /usr/bin/perl /tmp/h 2>&1 || echo link-refused;"
                  f" /tmp/h -e 'print \"{MARK}\\n\"'; echo done")
        result = sh(daemon.stub(), run_id, script)
        assert "done" in result.text, result.stderr
        assert "link-refused" in result.text, result.stderr
        assert MARK not in result.text, (agent, result.stdout)
        assert _recorded(daemon, run_id, "/tmp/s"), _denied(daemon, run_id)


PYTHON_ROUTES = r'''
import ctypes, os, subprocess, sys
MARK = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "returned"
    except OSError as e:
        out[name] = e.errno
def child(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        return e.errno
    return r.stdout + r.stderr
def fork_exec(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except OSError as e:
            os._exit(e.errno)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
perl = ["/usr/bin/perl", "-e", 'print "%s\n"' % MARK]
# an interpreter's exec functions
out["execv"] = fork_exec(lambda: os.execv(perl[0], perl))
out["subprocess"] = child(perl)
out["loader"] = child(["/lib64/ld-linux-x86-64.so.2", *perl])
# a memfd holding the program, run with fexecve and execveat(AT_EMPTY_PATH)
def memfd():
    fd = os.memfd_create("p", 0)
    with open("/usr/bin/perl", "rb") as f:
        os.write(fd, f.read())
    return fd
def run_memfd():
    os.execve(memfd(), perl, {})
out["fexecve"] = fork_exec(run_memfd)
# execveat with a directory fd
def run_execveat():
    d = os.open("/usr/bin", os.O_PATH | os.O_DIRECTORY)
    argv = (ctypes.c_char_p * 4)(*[a.encode() for a in perl], None)
    envp = (ctypes.c_char_p * 1)(None)
    if libc.syscall(322, d, b"perl", argv, envp, 0) < 0:
        raise OSError(ctypes.get_errno(), "execveat")
out["execveat"] = fork_exec(run_execveat)
# a shebang script pointing at perl, in /tmp (noexec) and run through the granted shell
with open("/tmp/s.pl", "w") as f:
    f.write("#!/usr/bin/perl\nprint \"%s\\n\";\n" % MARK)
os.chmod("/tmp/s.pl", 0o755)
out["shebang"] = child(["/tmp/s.pl"])
# hard link of perl into /tmp
try:
    os.link("/usr/bin/perl", "/tmp/h")
    out["link"] = child(["/tmp/h", "-e", 'print "%s\n"' % MARK])
except OSError as e:
    out["link"] = e.errno
print(repr(out))
'''


class TestInterpreterRoutes:
    """cve-triage grants python3: what Python can do to start perl, it cannot."""

    @pytest.fixture
    def triage(self, daemon: DaemonHandle) -> Iterator[str]:
        stub = daemon.stub()
        run = stub.CreateRun(pb.CreateRunRequest(agent="cve-triage"))
        yield run.run_id
        with contextlib.suppress(grpc.RpcError):
            stub.CloseRun(pb.CloseRunRequest(run_id=run.run_id))

    def test_python_cannot_start_a_program_that_is_not_granted(
            self, daemon: DaemonHandle, triage: str) -> None:
        result = execute(daemon.stub(), triage,
                         ["/usr/bin/python3", "-c", textwrap.dedent(PYTHON_ROUTES), MARK])
        assert result.outcome is not None
        assert result.outcome.exit_code == 0, result.stderr
        assert MARK not in result.stdout.decode(), result.stdout
        out = ast.literal_eval(result.text.strip().splitlines()[-1])
        # execv, fexecve and execveat fail in the child with EACCES (13) or EPERM (1).
        assert out["execv"] == 13, out
        assert out["execveat"] == 13, out
        assert out["fexecve"] in (1, 13), out
        assert out["subprocess"] == 13, out
        assert out["shebang"] == 13, out
        assert out["link"] == 18, out  # EXDEV: /usr/bin and /tmp are different mounts
        denied = _denied(daemon, triage)
        for path in ("/usr/bin/perl", "/tmp/s.pl", LOADER):
            assert any(d["path"] == path for d in denied), (path, denied)
        assert any(d["path"] == "perl" for d in denied), denied  # execveat with a dirfd

    def test_python_still_has_its_extension_modules(self, daemon: DaemonHandle,
                                                    triage: str) -> None:
        """lib-dynload is declared in exec.libraries: json's C accelerator and hashlib load."""
        script = "import _json, hashlib, ssl; print(hashlib.sha256(b'x').hexdigest()[:8])"
        result = execute(daemon.stub(), triage, ["/usr/bin/python3", "-c", script])
        assert result.outcome is not None
        assert result.outcome.exit_code == 0, result.stderr
        assert result.text.strip() == "2d711642"


class TestReach:
    """What stays reachable (ELF programs inside the executable library directories) is
    computed from the files and shown to reviewers."""

    @pytest.mark.parametrize("name", ["shell-helper", "cve-triage"])
    def test_reach_lists_real_programs_and_no_grant(self, name: str) -> None:
        ceilings = load_stage_ceilings(REPO / "policies" / "stages.yaml")
        policy = effective_policy(load_policy(REPO / "policies" / f"{name}.yaml"), "prototype",
                                  ceilings)
        found = reach(policy)
        listed = [p for programs in found.values() for p in programs]
        assert listed, found
        assert len(listed) == len(set(listed))
        granted = set(exec_mounts(policy).executable)
        assert not granted & set(listed)
        assert "/usr/bin/perl" not in listed
        assert "/usr/bin/python3.11" not in listed
        for path in listed:
            with open(path, "rb") as f:
                assert f.read(4) == b"\x7fELF"


# --- approval triggers hold inside the worker ---------------------------------------------


@pytest.fixture(scope="module")
def approvals() -> Iterator[DaemonHandle]:
    """A daemon with the `approvals` agent: exec:/usr/bin/rm needs an approver."""
    with steps_tests.own_daemon(steps_tests.APPROVALS_CONFIG) as handle:
        yield handle


class TestApprovalInsideWorker:
    """With approval.required_for [exec:/usr/bin/rm], a step nobody approved cannot run rm by
    any route (shell, Python's subprocess, the loader, the /bin spelling); an approved step
    can, through a shell too."""

    def test_unapproved_step_cannot_start_the_trigger(self, approvals: DaemonHandle) -> None:
        stub = approvals.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        setup = steps_tests.step(stub, run_id, steps_tests.task(
            "setup", "echo v > victim; echo w > other"))
        assert setup.state == steps_tests.COMMITTED
        py = ("import subprocess\ntry:\n subprocess.run(['/usr/bin/rm', 'victim'])\n"
              "except OSError as e:\n print('py', e.errno)")
        reply = steps_tests.step(
            stub, run_id,
            steps_tests.task("sh", "rm victim; echo sh=$?; /bin/rm victim; echo bin=$?; "
                             f"{LOADER} /usr/bin/rm victim; echo ld=$?"),
            pb.TaskSpec(name="py", argv=["/usr/bin/python3", "-c", py]))
        assert reply.state == steps_tests.COMMITTED, reply
        out = {t.name: t.stdout.decode() for t in reply.tasks}
        assert "sh=126" in out["sh"], out
        assert "bin=126" in out["sh"], out
        assert "ld=0" not in out["sh"], out
        assert out["py"].strip() == "py 13", out
        # Nothing was removed, so the step changed nothing: committed read-only, no checkpoint.
        assert (reply.read_only, reply.step) == (True, 1)
        tree = steps_tests.files(steps_tests.export_tree(stub, run_id, 1))
        assert tree == {"victim": "v\n", "other": "w\n"}
        assert _recorded(approvals, run_id, "/usr/bin/rm"), _denied(approvals, run_id)
        assert _recorded(approvals, run_id, "/bin/rm"), _denied(approvals, run_id)
        # In the step's reply and in the stored timeline, per task.
        assert "/bin/rm" in {t.name: list(t.exec_denied) for t in reply.tasks}["sh"]
        stored = stub.ListSteps(pb.ListStepsRequest(run_id=run_id)).steps[-1]
        assert "/usr/bin/rm" in {t.name: list(t.exec_denied) for t in stored.tasks}["py"]

    def test_approved_step_gets_the_trigger(self, approvals: DaemonHandle) -> None:
        stub = approvals.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        steps_tests.step(stub, run_id, steps_tests.task("setup", "echo v > victim; echo w > o"))
        pending = steps_tests.step(
            stub, run_id, pb.TaskSpec(name="rm", argv=["/usr/bin/rm", "victim"]),
            steps_tests.task("sh", "rm o; echo sh=$?"))
        assert pending.state == steps_tests.PENDING
        approved = approvals.stub("approver").Approve(pb.ApproveRequest(
            run_id=run_id, step=2, approve=True, reason="ok"), timeout=60)
        assert approved.state == steps_tests.COMMITTED, approved
        assert steps_tests.files(steps_tests.export_tree(stub, run_id, 2)) == {}

    def test_step_asking_for_approval_runs_the_trigger_through_a_shell(
            self, approvals: DaemonHandle) -> None:
        """A caller whose shell script runs rm asks for approval up front (request_approval):
        the step waits, and once approved the same `sh -c 'rm x'` deletes x."""
        stub = approvals.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="approvals")).run_id
        steps_tests.step(stub, run_id, steps_tests.task("setup", "echo v > x"))
        pending = stub.Step(pb.StepRequest(run_id=run_id, request_approval=True, tasks=[
            steps_tests.task("sh", "rm x; echo sh=$?")]), timeout=120)
        assert pending.state == steps_tests.PENDING, pending
        assert "requested by the caller" in pending.reason
        approved = approvals.stub("approver").Approve(pb.ApproveRequest(
            run_id=run_id, step=2, approve=True, reason="ok"), timeout=60)
        assert approved.state == steps_tests.COMMITTED, approved
        assert approved.tasks[0].stdout == b"sh=0\n"
        assert steps_tests.files(steps_tests.export_tree(stub, run_id, 2)) == {}


class TestExecMounts:
    """The pure computation behind the binds (agentd/policy/execset.py)."""

    def test_withheld_program_is_withheld_under_every_name(self, tmp_path: Path) -> None:
        """A withheld program stays out by real path and by inode (a hard link), while the
        other grants and the libraries they link against stay executable."""
        tool = tmp_path / "tool"
        shutil.copy("/usr/bin/true", tool)
        os.link(tool, tmp_path / "alias")
        (tmp_path / "link").symlink_to("tool")
        policy = EffectivePolicy(
            agent_policy="t", stage="prototype",
            exec_allow=(str(tmp_path / "alias"), str(tmp_path / "link"), "/usr/bin/cat"),
            read_only=(str(tmp_path), "/usr"))
        free = exec_mounts(policy)
        assert {str(tool), str(tmp_path / "alias"), "/usr/bin/cat"} <= set(free.executable)
        held = exec_mounts(policy, (str(tmp_path / "tool"),))
        assert str(tool) not in held.executable
        assert str(tmp_path / "alias") not in held.executable
        assert "/usr/bin/cat" in held.executable
        assert any(d.startswith("/usr/lib") for d in held.executable), held


class TestDeniedRecords:
    def test_a_flood_of_denied_execs_is_bounded_and_counted(self, daemon: DaemonHandle) -> None:
        """200 refused execs: 64 exec.denied records, the count of all in exec.exited, and the
        worker finishes normally (the watcher never holds it)."""
        stub = daemon.stub()
        run_id = stub.CreateRun(pb.CreateRunRequest(agent="shell-helper")).run_id
        result = sh(stub, run_id, "i=0; while [ $i -lt 200 ]; do /usr/bin/perl 2>/dev/null;"
                    " i=$((i+1)); done; echo end")
        assert result.text == "end\n", result.stderr
        assert len(_denied(daemon, run_id)) == 64
        exited = [r["details"] for r in steps_tests.audit_records(daemon)
                  if r.get("run_id") == run_id and r["event"] == "exec.exited"]
        assert exited[-1]["exec_denied"] == 200

    def test_timeline_shows_denied_execs(self) -> None:
        reply = StepReply.from_proto(pb.StepReply(run_id="r-1", step=1, tasks=[pb.TaskReport(
            name="t", outcome=pb.Outcome(exited=True), exec_denied=["/usr/bin/perl"])]))
        assert "exec denied: /usr/bin/perl" in output.timeline([reply])
