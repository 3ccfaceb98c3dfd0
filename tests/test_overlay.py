"""The workspace overlay mount (agentd.sandbox.overlay), on the real kernel.

Each mount lives in a child process that unshares a mount namespace (and, when asked, a user
namespace mapping 65534 onto itself, as a user-namespace worker's is), mounts, and then runs
shell scripts in the mount as the worker's uid on request. The test reads the mounted view
from outside through /proc/<child>/root, so nothing is mounted in the test's own namespace
and everything vanishes when the child exits. The helpers here serve tests/test_layers.py
too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agentd.sandbox import overlay

pytestmark = pytest.mark.privileged

WORKER = 65534

CHILD = r"""
import json, os, subprocess, sys
from agentd.sandbox import libc, overlay
req = json.loads(sys.argv[1])
if req.get("legacy"):
    overlay._LOWERDIR_PLUS = False  # as on a kernel before 6.8
libc.unshare(libc.CLONE_NEWNS | (libc.CLONE_NEWUSER if req["userns"] else 0))
if req["userns"]:
    print(json.dumps({"map": os.getpid()}), flush=True)
    sys.stdin.readline()
    libc.set_filesystem_ids(65534, 65534)  # as contain.py does before building the root
libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
try:
    if req["upper"] is None:
        overlay.mount_readonly(req["target"], req["lowers"])
    else:
        overlay.mount_workspace(req["target"], req["lowers"], req["upper"], req["work"])
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": str(exc)}), flush=True)
    sys.exit(0)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    done = subprocess.run(["/bin/sh", "-ec", cmd["sh"]], cwd=req["target"], text=True,
                          capture_output=True, user=cmd["uid"], group=cmd["uid"],
                          extra_groups=[])
    print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr}),
          flush=True)
"""

_targets = itertools.count()


class Mounted:
    """An overlay mounted in a child's private mount namespace."""

    def __init__(self, proc: subprocess.Popen[str], target: str) -> None:
        self.proc = proc
        self.target = target

    @property
    def path(self) -> Path:
        """The mounted view, as seen from the test's namespace."""
        return Path(f"/proc/{self.proc.pid}/root{self.target}")

    def sh(self, script: str, *, uid: int = WORKER, check: bool = True) -> dict[str, Any]:
        """Runs `/bin/sh -ec script` in the mount (cwd) as `uid`."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"sh": script, "uid": uid}) + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        if check:
            assert result["rc"] == 0, result
        return result

    def mountinfo(self) -> str:
        line = [x for x in Path(f"/proc/{self.proc.pid}/mountinfo").read_text().splitlines()
                if f" {self.target} " in x]
        return line[-1]


@contextlib.contextmanager
def mounted(base: Path, lowers: Sequence[Path | str], upper: Path | None = None,
            work: Path | None = None, *, userns: bool = False, legacy: bool = False
            ) -> Iterator[Mounted]:
    """Mounts `lowers` (lowest first) [under `upper`] in a child; OSError if it fails."""
    target = base / f"mnt-{next(_targets)}"
    target.mkdir()
    request = {"target": str(target), "lowers": [str(p) for p in lowers],
               "upper": None if upper is None else str(upper),
               "work": None if work is None else str(work), "userns": userns,
               "legacy": legacy}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(request)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        if "map" in first:
            Path(f"/proc/{proc.pid}/uid_map").write_text(f"{WORKER} {WORKER} 1\n")
            Path(f"/proc/{proc.pid}/gid_map").write_text(f"{WORKER} {WORKER} 1\n")
            proc.stdin.write("\n")
            proc.stdin.flush()
            first = json.loads(proc.stdout.readline() or "{}")
        if "errno" in first:
            raise OSError(first["errno"], first["error"])
        assert first.get("ready"), first
        handle = Mounted(proc, str(target))
        yield handle
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
        target.rmdir()


Tree = dict[str, tuple[Any, ...]]


def tree(root: Path, *, mtimes: bool = True) -> Tree:
    """A directory tree as comparable data: per path, type, mode, owner, content or link
    target (and, for non-directories, the mtime in ns)."""
    out: Tree = {}

    def add(path: Path, rel: str) -> None:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        payload: Any = None
        if stat.S_ISREG(st.st_mode):
            payload = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            payload = os.readlink(path)
        stamp = st.st_mtime_ns if mtimes and not stat.S_ISDIR(st.st_mode) else None
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, payload, stamp)

    add(root, ".")
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            add(path, str(path.relative_to(root)))
    return out


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory a worker's uid can cross (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="agentd-overlay-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_dir(path: Path, files: dict[str, str] | None = None, *, owner: int = WORKER) -> Path:
    path.mkdir(parents=True)
    os.chown(path, owner, owner)
    for name, text in (files or {}).items():
        (path / name).write_text(text)
        os.chown(path / name, owner, owner)
    return path


def upper_and_work(base: Path, name: str = "u", owner: int = WORKER) -> tuple[Path, Path]:
    return make_dir(base / name / "upper", owner=owner), make_dir(base / name / "work",
                                                                  owner=owner)


class TestMountWorkspace:
    def test_lowers_are_lowest_first(self, base: Path) -> None:
        """The last layer of the list is the top-most: its file hides the same name below."""
        low = make_dir(base / "low", {"f": "low", "only-low": "x"})
        high = make_dir(base / "high", {"f": "high"})
        upper, work = upper_and_work(base)
        with mounted(base, [low, high], upper, work) as m:
            assert (m.path / "f").read_text() == "high"
            assert (m.path / "only-low").read_text() == "x"

    def test_writes_go_to_the_upper_only(self, base: Path) -> None:
        """A worker's write and delete land in the upper; the lower is untouched."""
        low = make_dir(base / "low", {"f": "low"})
        upper, work = upper_and_work(base)
        with mounted(base, [low], upper, work) as m:
            m.sh("echo new > g; rm f")
            assert sorted(os.listdir(m.path)) == ["g"]
        assert (low / "f").read_text() == "low"
        assert (upper / "g").read_text() == "new\n"
        assert stat.S_ISCHR(os.lstat(upper / "f").st_mode)  # the whiteout

    def test_safe_options_are_in_force(self, base: Path) -> None:
        """userxattr, redirect_dir=nofollow, nosuid and nodev are on the mount."""
        low = make_dir(base / "low")
        upper, work = upper_and_work(base)
        with mounted(base, [low], upper, work) as m:
            info = m.mountinfo()
        for option in ("userxattr", "redirect_dir=nofollow", "nosuid", "nodev"):
            assert option in info

    def test_a_directory_of_a_lower_cannot_be_renamed(self, base: Path) -> None:
        """With redirect_dir=nofollow, rename(2) of a lower directory is EXDEV (mv copies)."""
        low = make_dir(base / "low")
        make_dir(low / "d", {"x": "1"})
        upper, work = upper_and_work(base)
        with mounted(base, [low], upper, work) as m:
            result = m.sh("python3 -c 'import os; os.rename(\"d\", \"e\")'", check=False)
            assert "Invalid cross-device link" in result["err"]
            m.sh("mv d e")
            assert (m.path / "e" / "x").read_text() == "1"

    def test_one_hundred_and_twenty_layers_mount(self, base: Path) -> None:
        """A deep stack mounts; every layer contributes and the top-most wins."""
        layers = [make_dir(base / f"l{i}", {f"f{i}": str(i), "top": str(i)}) for i in range(120)]
        upper, work = upper_and_work(base)
        with mounted(base, layers, upper, work) as m:
            assert (m.path / "top").read_text() == "119"
            assert len(os.listdir(m.path)) == 121

    def test_five_hundred_lowers_mount_and_five_hundred_and_one_are_refused(
            self, base: Path) -> None:
        """500 lowers (OVL_MAX_STACK) mount under an upper; 501 is E2BIG, naming lowerdir+."""
        layers = [make_dir(base / f"l{i}") for i in range(501)]
        upper, work = upper_and_work(base)
        with mounted(base, layers[:500], upper, work) as m:
            m.sh("echo x > f")
        with pytest.raises(OSError) as info, mounted(base, layers, upper, work):
            pass
        assert info.value.errno == errno.E2BIG
        assert "lowerdir+" in str(info.value)
        assert "squash" in str(info.value)

    def test_a_missing_lower_names_the_key(self, base: Path) -> None:
        """A failed fsconfig says which key and value failed, with the errno."""
        upper, work = upper_and_work(base)
        with pytest.raises(OSError) as info, mounted(base, [base / "nope"], upper, work):
            pass
        assert info.value.errno == errno.ENOENT
        assert f"lowerdir+={base}/nope" in str(info.value)

    def test_worker_uid_writes_in_the_plain_case(self, base: Path) -> None:
        """Mounted by root, the worker (65534) creates, deletes and replaces entries."""
        low = make_dir(base / "low", {"f": "x"})
        make_dir(low / "d", {"y": "1"})
        upper, work = upper_and_work(base)
        with mounted(base, [low], upper, work) as m:
            m.sh("echo 1 > new; rm f; rm -rf d; mkdir d; echo 2 > d/z; id -u > who")
            assert (m.path / "who").read_text() == "65534\n"
            assert os.listdir(m.path / "d") == ["z"]


class TestLegacyMount:
    """Kernels before 6.8 (Debian 12's 6.1) have no `lowerdir+`: one option string instead."""

    def test_stack_mounts_with_relative_layer_names(self, base: Path) -> None:
        """Forty layers of one parent mount through mount(2), top-most last, writes go up."""
        layers = base / "layers"
        lowers = [make_dir(layers / f"l-{i:024x}", {"f": str(i), f"only-{i}": "x"})
                  for i in range(40)]
        upper, work = upper_and_work(base)
        with mounted(base, lowers, upper, work, legacy=True) as m:
            assert (m.path / "f").read_text() == "39"
            assert (m.path / "only-0").read_text() == "x"
            m.sh("echo new > g")
            assert "lowerdir=" in m.mountinfo()
        assert (upper / "g").read_text() == "new\n"

    def test_too_many_layers_for_one_page_are_refused(self, base: Path) -> None:
        """Past one page of options the mount is refused with E2BIG, asking for a squash."""
        layers = base / "layers"
        lowers = [make_dir(layers / f"l-{i:024x}") for i in range(200)]
        upper, work = upper_and_work(base)
        with pytest.raises(OSError) as caught, mounted(base, lowers, upper, work, legacy=True):
            pass
        assert caught.value.errno == errno.E2BIG


class TestUserNamespace:
    def test_upper_owned_by_the_mapped_uid_is_writable(self, base: Path) -> None:
        """In a user namespace mapping 65534, an upper owned by 65534 mounts read-write and
        a directory can be replaced (the opaque marker needs userxattr there)."""
        low = make_dir(base / "low", {"f": "x"})
        make_dir(low / "d", {"y": "1"})
        upper, work = upper_and_work(base)
        with mounted(base, [low], upper, work, userns=True) as m:
            m.sh("echo 1 > new; rm f; rm -rf d; mkdir d; echo 2 > d/z")
            assert sorted(os.listdir(m.path)) == ["d", "new"]
        assert os.getxattr(upper / "d", overlay.OPAQUE_XATTR) == b"y"

    def test_root_owned_upper_is_refused_not_read_only(self, base: Path) -> None:
        """Overlay would silently mount read-only; mount_workspace raises EROFS instead."""
        low = make_dir(base / "low")
        upper, work = upper_and_work(base, owner=0)
        with pytest.raises(OSError) as info, mounted(base, [low], upper, work, userns=True):
            pass
        assert info.value.errno == errno.EROFS
        assert "owned by the mapped uid" in str(info.value)


class TestMountReadonly:
    def test_merged_view_is_read_only(self, base: Path) -> None:
        """Two layers merge, whiteouts hide, and nothing can be written."""
        low = make_dir(base / "low", {"f": "low", "gone": "x"})
        high = make_dir(base / "high", {"g": "high"})
        os.mknod(high / "gone", stat.S_IFCHR, 0)
        with mounted(base, [low, high]) as m:
            assert sorted(os.listdir(m.path)) == ["f", "g"]
            assert "Read-only" in m.sh("echo > h", check=False)["err"]

    @pytest.mark.parametrize("userns", [False, True])
    def test_single_layer_is_bound_read_only(self, base: Path, userns: bool) -> None:
        """One layer (overlay needs two lowers without an upper) is a read-only bind."""
        low = make_dir(base / "low", {"f": "low"})
        with mounted(base, [low], userns=userns) as m:
            assert (m.path / "f").read_text() == "low"
            assert "Read-only" in m.sh("echo > h", check=False)["err"]

    def test_user_namespace(self, base: Path) -> None:
        """The read-only overlay mounts in a user-namespace worker too."""
        low = make_dir(base / "low", {"f": "low"})
        high = make_dir(base / "high", {"g": "high"})
        with mounted(base, [low, high], userns=True) as m:
            assert m.sh("cat f g")["out"] == "lowhigh"
