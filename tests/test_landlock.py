"""The Landlock wall, tried for real: tiny Python programs restrict themselves, then try to
write, execute, connect and signal, and report the errno the kernel answered."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentd.sandbox import landlock, libc

ABI = landlock.abi_version()
pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(ABI == 0, reason="kernel without Landlock"),
]
needs_abi = {n: pytest.mark.skipif(n > ABI, reason=f"needs Landlock ABI {n}") for n in (4, 6)}

REPO = Path(__file__).resolve().parents[1]
LD_SO = landlock.interpreter_of("/bin/true")

HEADER = '''
import ctypes, errno, json, os, socket, subprocess, sys, time
from agentd.sandbox import landlock, libc
D = json.loads(sys.stdin.read())
LD_SO = landlock.interpreter_of("/bin/true")

def wall(read=("/",), write=(), execute=(), **kw):
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    return landlock.enter(read=read, write=write, execute=execute, **kw)

def attempt(fn, *args, **kwargs):
    """0 if fn returned, else the errno of the OSError it raised."""
    try:
        fn(*args, **kwargs)
        return 0
    except OSError as exc:
        return exc.errno

def write(path):
    with open(path, "w") as f:
        f.write("x")

def run(*argv):
    return subprocess.run(argv, capture_output=True).returncode

def report(**values):
    sys.stdout.write(json.dumps(values))
    sys.stdout.flush()
'''


def run(code: str, **data: str) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", HEADER + textwrap.dedent(code)],
                          input=json.dumps(data), capture_output=True, text=True, timeout=30,
                          cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, int] = json.loads(proc.stdout)
    return result


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    """A writable directory, a directory outside every rule, and a directory of programs."""
    paths = {name: tmp_path / name for name in ("work", "outside", "bin")}
    for path in paths.values():
        path.mkdir()
    (paths["outside"] / "file").write_text("outside")
    shutil.copy("/bin/true", paths["bin"] / "true")
    shutil.copy("/bin/true", paths["work"] / "true")
    script = paths["bin"] / "script"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    return {name: str(path) for name, path in paths.items()}


class TestAbiVersion:
    def test_matches_the_kernel(self) -> None:
        """abi_version is the kernel's own answer to LANDLOCK_CREATE_RULESET_VERSION."""
        assert ABI == libc.syscall("landlock_create_ruleset", None, 0, 1) >= 1


class TestFilesystem:
    def test_write_inside_write_paths(self, dirs: dict[str, str]) -> None:
        """Creating, overwriting (O_TRUNC), renaming and removing inside a write path works."""
        result = run('''
            w = D["work"]
            wall(write=[w])
            report(create=attempt(write, w + "/new"), trunc=attempt(write, w + "/new"),
                   mkdir=attempt(os.mkdir, w + "/sub"),
                   rename=attempt(os.rename, w + "/new", w + "/sub/moved"),
                   remove=attempt(os.unlink, w + "/sub/moved"))
        ''', **dirs)
        assert result == {"create": 0, "trunc": 0, "mkdir": 0, "rename": 0, "remove": 0}

    def test_write_outside_write_paths_is_refused(self, dirs: dict[str, str]) -> None:
        """Writing, creating or removing outside the write paths fails with EACCES."""
        result = run('''
            wall(write=[D["work"]])
            o = D["outside"]
            report(overwrite=attempt(write, o + "/file"), create=attempt(write, o + "/new"),
                   remove=attempt(os.unlink, o + "/file"), mkdir=attempt(os.mkdir, o + "/d"))
        ''', **dirs)
        assert result == dict.fromkeys(("overwrite", "create", "remove", "mkdir"), errno.EACCES)

    def test_moving_out_of_a_write_path_is_refused(self, dirs: dict[str, str]) -> None:
        """A file cannot be renamed from a write path into a read-only place."""
        result = run('''
            write(D["work"] + "/f")
            wall(write=[D["work"]])
            report(r=attempt(os.rename, D["work"] + "/f", D["outside"] + "/f"))
        ''', **dirs)
        assert result["r"] in (errno.EACCES, errno.EXDEV)

    def test_read_outside_read_paths_is_refused(self, dirs: dict[str, str]) -> None:
        """Reading a file or listing a directory outside every rule fails with EACCES."""
        result = run('''
            wall(read=[D["work"]])
            report(read=attempt(open, D["outside"] + "/file"),
                   list=attempt(os.listdir, D["outside"]), inside=attempt(os.listdir, D["work"]))
        ''', **dirs)
        assert result == {"read": errno.EACCES, "list": errno.EACCES, "inside": 0}

    def test_missing_paths_are_skipped(self) -> None:
        """A path that does not exist grants nothing and does not fail the call."""
        result = run('''
            report(r=wall(read=["/", "/no/such/dir"], write=["/no/such/file"]))
        ''')
        assert result == {"r": True}

    def test_devices(self) -> None:
        """The default device list allows writing /dev/null (O_TRUNC too) and reading /dev/zero."""
        result = run('''
            wall(read=["/usr", "/etc"])
            report(null=attempt(write, "/dev/null"), zero=len(open("/dev/zero", "rb").read(4)))
        ''')
        assert result == {"null": 0, "zero": 4}

    def test_restriction_survives_exec(self, dirs: dict[str, str]) -> None:
        """A program executed afterwards, here /bin/sh, is bound by the same rules."""
        result = run('''
            wall(write=[D["work"]], execute=["/bin/sh", LD_SO])
            inside = run("/bin/sh", "-c", "echo x > " + D["work"] + "/f")
            outside = run("/bin/sh", "-c", "echo x > " + D["outside"] + "/f")
            report(inside=inside, outside=outside)
        ''', **dirs)
        assert result["inside"] == 0
        assert result["outside"] != 0

    def test_needs_no_new_privs(self) -> None:
        """Without no_new_privs an unprivileged process cannot restrict itself (EPERM)."""
        result = run('''
            os.setresuid(65534, 65534, 65534)
            report(r=attempt(landlock.enter, read=["/"], write=[], execute=[]))
        ''')
        assert result == {"r": errno.EPERM}

    def test_is_fast(self) -> None:
        """Building and applying a typical ruleset takes a few milliseconds at most."""
        result = run('''
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
            start = time.perf_counter_ns()
            landlock.enter(read=["/usr", "/etc", "/lib", "/lib64", "/proc"], write=["/tmp"],
                           execute=["/usr/bin", LD_SO])
            report(ns=time.perf_counter_ns() - start)
        ''')
        assert result["ns"] < 20_000_000


class TestExecute:
    def test_listed_program_runs(self, dirs: dict[str, str]) -> None:
        """A program in `execute` runs when its ELF interpreter is listed too."""
        result = run('''
            wall(execute=[D["bin"] + "/true", LD_SO])
            report(rc=run(D["bin"] + "/true"))
        ''', **dirs)
        assert result == {"rc": 0}

    def test_directory_entry_allows_programs_beneath(self, dirs: dict[str, str]) -> None:
        """A directory in `execute` allows every program beneath it."""
        result = run('''
            wall(execute=[D["bin"], LD_SO])
            report(rc=run(D["bin"] + "/true"))
        ''', **dirs)
        assert result == {"rc": 0}

    def test_unlisted_program_is_refused(self, dirs: dict[str, str]) -> None:
        """Executing a program not in `execute` fails with EACCES."""
        result = run('''
            wall(execute=[D["bin"] + "/true", LD_SO])
            report(r=attempt(run, "/usr/bin/ls"))
        ''', **dirs)
        assert result == {"r": errno.EACCES}

    def test_interpreter_is_required(self, dirs: dict[str, str]) -> None:
        """Without its ELF interpreter in `execute`, a listed dynamic program fails with EACCES."""
        result = run('''
            wall(execute=[D["bin"] + "/true"])
            report(r=attempt(run, D["bin"] + "/true"))
        ''', **dirs)
        assert result == {"r": errno.EACCES}

    def test_write_paths_are_not_executable(self, dirs: dict[str, str]) -> None:
        """A program dropped into a write path cannot be executed (EACCES)."""
        result = run('''
            wall(write=[D["work"]], execute=[LD_SO])
            report(r=attempt(run, D["work"] + "/true"))
        ''', **dirs)
        assert result == {"r": errno.EACCES}

    def test_script_needs_its_interpreter_chain(self, dirs: dict[str, str]) -> None:
        """A #! script runs only when its interpreter (and that one's ELF interpreter) is listed."""
        result = run('''
            script = D["bin"] + "/script"
            shell = landlock.interpreter_of(script)
            chain = [script, shell, landlock.interpreter_of(shell)]
            pid = os.fork()
            if pid == 0:
                wall(execute=chain[:1] + chain[2:])
                os._exit(attempt(run, script))
            without = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            wall(execute=chain)
            report(without=without, rc=run(script))
        ''', **dirs)
        assert result == {"without": errno.EACCES, "rc": 3}


@needs_abi[4]
class TestNetwork:
    def test_tcp_connect_and_bind_are_refused(self) -> None:
        """TCP connect (even to loopback) and bind fail with EACCES; UDP is unaffected."""
        result = run('''
            server = socket.create_server(("127.0.0.1", 0))
            wall()
            client = socket.socket()
            bound = socket.socket()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            report(connect=attempt(client.connect, server.getsockname()),
                   bind=attempt(bound.bind, ("127.0.0.1", 0)),
                   udp=attempt(udp.bind, ("127.0.0.1", 0)))
        ''')
        assert result == {"connect": errno.EACCES, "bind": errno.EACCES, "udp": 0}


@needs_abi[6]
class TestScopes:
    def test_signals_outside_the_domain_are_refused(self) -> None:
        """Signalling a process outside the worker's Landlock domain fails with EPERM."""
        result = run('''
            wall()
            report(parent=attempt(os.kill, os.getppid(), 0), self=attempt(os.kill, os.getpid(), 0))
        ''')
        assert result == {"parent": errno.EPERM, "self": 0}

    def test_abstract_unix_sockets_outside_the_domain_are_refused(self) -> None:
        """Connecting to an abstract unix socket created outside the domain fails with EPERM."""
        result = run('''
            name = "\\0agentd-test-%d" % os.getpid()
            server = socket.socket(socket.AF_UNIX)
            server.bind(name)
            server.listen()
            wall()
            report(r=attempt(socket.socket(socket.AF_UNIX).connect, name))
        ''')
        assert result == {"r": errno.EPERM}


def elf32_with_interp(interp: bytes) -> bytes:
    """A minimal little-endian ELF32 header with one PT_INTERP program header."""
    ehdr = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, 3, 1, 0, 52, 0, 0,
                       52, 32, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 3, 84, 0, 0, len(interp) + 1, len(interp) + 1, 4, 1)
    return ehdr + phdr + interp + b"\0"


class TestInterpreterOf:
    def test_dynamic_elf(self) -> None:
        """A dynamically linked program names the ELF interpreter from its PT_INTERP."""
        assert LD_SO == "/lib64/ld-linux-x86-64.so.2"

    def test_static_elf(self) -> None:
        """A static program (Debian's ldconfig is static-pie) has no interpreter."""
        if not os.path.exists("/sbin/ldconfig"):
            pytest.skip("no /sbin/ldconfig")
        assert landlock.interpreter_of("/sbin/ldconfig") is None

    def test_elf32(self, tmp_path: Path) -> None:
        """A 32-bit ELF's PT_INTERP is read too."""
        (tmp_path / "prog").write_bytes(elf32_with_interp(b"/lib/ld-linux.so.2"))
        assert landlock.interpreter_of(str(tmp_path / "prog")) == "/lib/ld-linux.so.2"

    @pytest.mark.parametrize(("first_line", "expected"), [
        (b"#!/bin/sh -e", "/bin/sh"),
        (b"#! /usr/bin/env python3", "/usr/bin/env"),
        (b"#!\t/bin/bash\t-x", "/bin/bash"),
        (b"#!", None),
    ])
    def test_script(self, tmp_path: Path, first_line: bytes, expected: str | None) -> None:
        """A #! script names the interpreter the kernel executes, without its arguments."""
        (tmp_path / "script").write_bytes(first_line + b"\necho hi\n")
        assert landlock.interpreter_of(str(tmp_path / "script")) == expected

    def test_other_files(self, tmp_path: Path) -> None:
        """Text, empty and truncated ELF files have no interpreter."""
        (tmp_path / "text").write_text("hello\n")
        (tmp_path / "empty").write_bytes(b"")
        (tmp_path / "cut").write_bytes(Path("/bin/true").read_bytes()[:100])
        assert [landlock.interpreter_of(str(tmp_path / n)) for n in ("text", "empty", "cut")] \
            == [None, None, None]

    def test_missing_file(self) -> None:
        """A path that cannot be read raises OSError."""
        with pytest.raises(FileNotFoundError):
            landlock.interpreter_of("/no/such/program")
