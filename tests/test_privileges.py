"""Dropping privileges, tried for real: tiny Python programs start as root, drop to an
unprivileged uid and report /proc/self/status and what the kernel answers afterwards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.sandbox import privileges

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to have privileges to drop"),
]

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534

HEADER = '''
import ctypes, errno, json, os, resource, subprocess, sys
from agentd.sandbox import libc, privileges
D = json.loads(sys.stdin.read())

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields

def attempt(fn, *args, **kwargs):
    """0 if fn returned, else the errno of the OSError it raised."""
    try:
        fn(*args, **kwargs)
        return 0
    except OSError as exc:
        return exc.errno

def report(**values):
    sys.stdout.write(json.dumps(values))
    sys.stdout.flush()
'''


def run(code: str, **data: object) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", HEADER + textwrap.dedent(code)],
                          input=json.dumps(data), capture_output=True, text=True, timeout=30,
                          cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.fixture
def setuid_id() -> Iterator[str]:
    """A root-owned setuid copy of `id` in a directory the unprivileged uid can reach."""
    base = tempfile.mkdtemp(prefix="agentd-priv-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        target = os.path.join(base, "id")
        shutil.copy("/usr/bin/id", target)
        os.chmod(target, 0o4755)
        yield target
    finally:
        shutil.rmtree(base)


class TestDrop:
    def test_status_shows_nothing_left(self) -> None:
        """Afterwards uid/gid are as asked, no groups, every capability set zero, NoNewPrivs 1."""
        result = run('''
            privileges.drop(D["uid"], D["gid"])
            s = status()
            report(**{k: s[k] for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                        "CapBnd", "CapAmb", "NoNewPrivs")})
        ''', uid=NOBODY, gid=NOBODY - 1)
        zero = "0" * 16
        assert result == {
            "Uid": "\t".join([str(NOBODY)] * 4), "Gid": "\t".join([str(NOBODY - 1)] * 4),
            "Groups": "", "CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": zero,
            "CapAmb": zero, "NoNewPrivs": "1"}

    def test_root_cannot_be_regained(self) -> None:
        """setuid(0), setgid(0) and setgroups fail with EPERM afterwards."""
        result = run('''
            privileges.drop(D["uid"], D["uid"])
            report(setuid=attempt(os.setuid, 0), setgid=attempt(os.setgid, 0),
                   setgroups=attempt(os.setgroups, [0]))
        ''', uid=NOBODY)
        assert result == {"setuid": errno.EPERM, "setgid": errno.EPERM, "setgroups": errno.EPERM}

    def test_ambient_and_inheritable_caps_are_cleared(self) -> None:
        """Capabilities raised into the inheritable and ambient sets beforehand are gone after."""
        result = run('''
            class Header(ctypes.Structure):
                _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
            class Data(ctypes.Structure):
                _fields_ = [("eff", ctypes.c_uint32), ("prm", ctypes.c_uint32),
                            ("inh", ctypes.c_uint32)]
            header, data = Header(0x20080522, 0), (Data * 2)()
            raw = ctypes.CDLL(None, use_errno=True)
            capset = libc.SYSCALL["capset"]
            assert raw.syscall(capset - 1, ctypes.byref(header), ctypes.byref(data)) == 0  # capget
            data[0].inh |= 1 << 10  # CAP_NET_BIND_SERVICE
            assert raw.syscall(capset, ctypes.byref(header), ctypes.byref(data)) == 0
            libc.prctl(libc.PR_CAP_AMBIENT, 2, 10)  # PR_CAP_AMBIENT_RAISE
            before = status()
            privileges.drop(D["uid"], D["uid"])
            after = status()
            report(before=[before["CapInh"], before["CapAmb"]],
                   after=[after["CapInh"], after["CapAmb"]])
        ''', uid=NOBODY)
        assert result == {"before": ["0000000000000400"] * 2, "after": ["0000000000000000"] * 2}

    def test_securebits_are_locked(self) -> None:
        """Securebits keep uid 0 from ever gaining caps, and cannot be changed afterwards."""
        result = run('''
            privileges.drop(D["uid"], D["uid"])
            report(bits=libc.prctl(27), keep_caps=attempt(libc.prctl, libc.PR_SET_SECUREBITS, 0x10))
        ''', uid=NOBODY)
        assert result == {"bits": 0xEB, "keep_caps": errno.EPERM}

    def test_setuid_binary_gains_nothing(self, setuid_id: str) -> None:
        """Executing a setuid-root program afterwards still runs as the unprivileged uid."""
        result = run('''
            privileges.drop(D["uid"], D["uid"])
            out = subprocess.run([D["id"], "-u"], capture_output=True, text=True).stdout
            report(euid=int(out))
        ''', uid=NOBODY, id=setuid_id)
        assert result == {"euid": NOBODY}

    def test_setuid_binary_control(self, setuid_id: str) -> None:
        """Control: after only setresuid (no drop), the same setuid program runs as root."""
        result = run('''
            os.setresuid(D["uid"], D["uid"], D["uid"])
            out = subprocess.run([D["id"], "-u"], capture_output=True, text=True).stdout
            report(euid=int(out))
        ''', uid=NOBODY, id=setuid_id)
        assert result == {"euid": 0}

    def test_refuses_root(self) -> None:
        """Asking for uid or gid 0 is refused with EINVAL before anything changes."""
        for uid, gid in ((0, NOBODY), (NOBODY, 0)):
            with pytest.raises(OSError) as info:
                privileges.drop(uid, gid)
            assert info.value.errno == errno.EINVAL
        assert os.geteuid() == 0


class TestSetRlimits:
    def test_limits_apply_and_stay(self) -> None:
        """Limits are set hard and soft, are enforced, and cannot be raised after drop."""
        result = run('''
            before_fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
            privileges.set_rlimits(nofile=16, fsize=None, nproc=1)
            unchanged = resource.getrlimit(resource.RLIMIT_FSIZE) == before_fsize
            privileges.set_rlimits(nofile=16, fsize=1024, nproc=1)
            privileges.drop(D["uid"], D["uid"])
            limits = [resource.getrlimit(r) for r in (resource.RLIMIT_CORE, resource.RLIMIT_NOFILE,
                                                      resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC)]
            files = []
            try:
                while True:
                    files.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                emfile = exc.errno
            for fd in files:
                os.close(fd)
            big = os.memfd_create("big")
            os.write(big, b"x" * 1024)
            fsize = attempt(os.write, big, b"x")

            def fork():
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)

            fork = attempt(fork)
            raise_ = attempt(privileges.set_rlimits, nofile=1024, fsize=None)
            report(limits=limits, emfile=emfile, fsize=fsize, fork=fork, raise_=raise_,
                   unchanged=unchanged)
        ''', uid=NOBODY)
        assert result == {"limits": [[0, 0], [16, 16], [1024, 1024], [1, 1]],
                          "emfile": errno.EMFILE, "fsize": errno.EFBIG, "fork": errno.EAGAIN,
                          "raise_": errno.EPERM, "unchanged": True}
