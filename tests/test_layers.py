"""The layer store (agentd.store.layers) against real overlay mounts.

The oracle for every commit: what the task saw in its live mount at the end of its step (the
stack under its upper) must be exactly what a fresh read-only mount of `stack + [new layer]`
shows: types, modes, owners, contents, link targets, file mtimes. Rollback, squash and
export are checked against mounted views the same way.
"""

from __future__ import annotations

import io
import itertools
import os
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from agentd.errors import FailedPrecondition, InvalidArgument, NotFound
from agentd.sandbox.overlay import OPAQUE_XATTR
from agentd.store.layers import Change, LayerStore, conflicts
from tests.test_overlay import WORKER, Tree, mounted, tree
from tests.test_overlay import base as base  # noqa: PLC0414 - the fixture, shared

pytestmark = pytest.mark.privileged

# The workspace every scenario starts from (committed as the first step, by the worker).
SEED = """
mkdir -p src/pkg docs empty keep/sub
echo a > src/a.txt; echo b > src/pkg/b.py; echo readme > docs/README; echo x > keep/sub/x
ln -s src/a.txt link-a
chmod 640 src/a.txt
"""

_tasks = itertools.count()


@pytest.fixture
def store(base: Path) -> LayerStore:
    return LayerStore(base / "store")


def lower_paths(store: LayerStore, stack: Sequence[str]) -> list[Path]:
    return [store.path(layer_id) for layer_id in stack]


def view(store: LayerStore, base: Path, stack: Sequence[str], **kw: bool) -> Tree:
    """The merged view of a stack, from a read-only overlay mount."""
    with mounted(base, lower_paths(store, stack)) as m:
        return tree(m.path, **kw)


def run_task(store: LayerStore, base: Path, stack: Sequence[str], script: str, *,
             uid: int = WORKER, userns: bool = False) -> tuple[Path, Tree]:
    """Runs `script` in a task's mount above `stack`; returns its upper and its live view."""
    upper = store.new_upper(f"t{next(_tasks)}", WORKER, WORKER)
    with mounted(base, lower_paths(store, stack), upper.upper, upper.work,
                 userns=userns) as m:
        m.sh(script, uid=uid)
        return upper.upper, tree(m.path)


def step(store: LayerStore, base: Path, stack: list[str], script: str, *,
         uid: int = WORKER, userns: bool = False) -> tuple[list[str], Tree]:
    """One single-task step: run, commit; returns the new stack and the task's live view."""
    upper, live = run_task(store, base, stack, script, uid=uid, userns=userns)
    new = store.commit([upper], lowers=stack)
    store.remove_upper(upper.parent.name)
    return ([*stack, new] if new else stack), live


@pytest.fixture
def seeded(store: LayerStore, base: Path) -> list[str]:
    """[base, seed layer]."""
    stack, _ = step(store, base, [store.create_base(WORKER, WORKER)], SEED)
    assert len(stack) == 2
    return stack


def private_xattrs(layer: Path) -> dict[str, list[str]]:
    found = {}
    for directory, dirnames, filenames in os.walk(layer):
        for name in [".", *dirnames, *filenames]:
            path = Path(directory, name)
            names = [x for x in os.listxattr(path, follow_symlinks=False)
                     if ".overlay." in x]
            if names:
                found[str(path.relative_to(layer))] = names
    return found


SCENARIOS = {
    "write": "echo new > src/new.txt; echo changed > src/a.txt; mkdir -p out/deep; "
             "echo o > out/deep/o",
    "delete": "rm src/a.txt docs/README",
    "rename": "mv src/a.txt src/renamed.txt; mv docs documentation; mv keep/sub keep/sub2",
    "dir_replaced_by_file": "rm -rf docs; echo now-a-file > docs",
    "file_replaced_by_dir": "rm src/a.txt; mkdir src/a.txt; echo inner > src/a.txt/inner",
    "tree_removed_and_recreated": "rm -rf src; mkdir -p src/pkg; echo fresh > src/pkg/fresh.py",
    "symlinks": "ln -s ../docs/README src/readme-link; ln -s nowhere dangling; rm -f link-a; "
                "ln -s src/pkg link-a; rm -f docs/README; ln -s ../src/a.txt docs/README",
    "hard_links": "ln src/a.txt src/a-hard; echo z > fresh; ln fresh fresh-hard",
    "empty_dirs": "mkdir newempty; rm keep/sub/x; mkdir -p deep/er/est",
    "fifo": "mkfifo pipe",
    "file_modes": "chmod 600 src/pkg/b.py; chmod 700 keep; chmod 1777 empty; chmod 755 src/a.txt",
}


class TestCommit:
    @pytest.mark.parametrize("name", sorted(SCENARIOS))
    def test_scenario_survives_commit(self, store: LayerStore, base: Path,
                                      seeded: list[str], name: str) -> None:
        """What the task saw is exactly what the new stack shows."""
        stack, live = step(store, base, seeded, SCENARIOS[name])
        assert len(stack) == 3
        assert view(store, base, stack) == live
        assert view(store, base, seeded) != live  # the step did change something

    def test_ownership_changes_by_root_survive(self, store: LayerStore, base: Path,
                                               seeded: list[str]) -> None:
        """chown to other ids (root in the plain case) and setgid bits are committed."""
        stack, live = step(store, base, seeded, "chown 1000:1001 src/a.txt; chown 1000 keep/sub;"
                           " chmod 2775 keep; chown -h 1002:1002 link-a", uid=0)
        shown = view(store, base, stack)
        assert shown == live
        assert shown["src/a.txt"][2:4] == (1000, 1001)
        assert shown["keep"][1] == 0o2775
        assert shown["link-a"][2:4] == (1002, 1002)

    def test_deleted_file_is_gone_where_it_existed_below(self, store: LayerStore, base: Path,
                                                         seeded: list[str]) -> None:
        """A delete is a whiteout in the new layer, hiding the seed's file."""
        stack, _ = step(store, base, seeded, "rm src/a.txt")
        assert "src/a.txt" not in view(store, base, stack)
        assert "src/a.txt" in view(store, base, seeded)
        whiteout = os.lstat(store.path(stack[-1]) / "src" / "a.txt")
        assert stat.S_ISCHR(whiteout.st_mode)
        assert whiteout.st_rdev == 0

    def test_recreated_tree_is_an_opaque_directory(self, store: LayerStore, base: Path,
                                                   seeded: list[str]) -> None:
        """rm -rf + mkdir: the layer marks the directory opaque (user.overlay.opaque)."""
        stack, _ = step(store, base, seeded, SCENARIOS["tree_removed_and_recreated"])
        assert os.getxattr(store.path(stack[-1]) / "src", OPAQUE_XATTR) == b"y"
        shown = view(store, base, stack)
        assert "src/a.txt" not in shown
        assert "src/pkg/b.py" not in shown

    def test_layers_carry_no_other_private_xattrs(self, store: LayerStore, base: Path,
                                                  seeded: list[str]) -> None:
        """Overlay's origin/impure/uuid xattrs are stripped; only opaque markers remain."""
        stack, _ = step(store, base, seeded, "chmod 600 src/a.txt; rm -rf docs; mkdir docs; "
                        "echo 1 > keep/sub/new")
        assert private_xattrs(store.path(stack[-1])) == {"docs": [OPAQUE_XATTR]}

    def test_hard_links_stay_links_within_a_layer(self, store: LayerStore, base: Path,
                                                  seeded: list[str]) -> None:
        """Links made in one step share an inode in the committed layer."""
        stack, _ = step(store, base, seeded, SCENARIOS["hard_links"])
        layer = store.path(stack[-1])
        assert os.lstat(layer / "fresh").st_ino == os.lstat(layer / "fresh-hard").st_ino

    def test_nothing_changed_commits_nothing(self, store: LayerStore, base: Path,
                                             seeded: list[str]) -> None:
        """A task that undid its own change (a parent was copied up) yields no layer."""
        upper, _ = run_task(store, base, seeded, "echo t > src/pkg/tmp; rm src/pkg/tmp")
        assert (upper / "src" / "pkg").is_dir()  # overlay copied the parents up
        assert store.changes(upper, lowers=seeded) == []
        assert store.commit([upper], lowers=seeded) is None

    def test_user_namespace_worker(self, store: LayerStore, base: Path,
                                   seeded: list[str]) -> None:
        """A worker in a user namespace (65534 mapped onto itself) writes, deletes, replaces
        a tree and makes links through an upper from new_upper; all of it is committed."""
        script = "; ".join(SCENARIOS[n] for n in ("write", "symlinks", "fifo", "file_modes"))
        script += "; rm -rf docs; mkdir docs; echo again > docs/new; rm keep/sub/x"
        stack, live = step(store, base, seeded, script, userns=True)
        assert view(store, base, stack) == live

    def test_failed_commit_publishes_nothing(self, store: LayerStore, base: Path,
                                             seeded: list[str]) -> None:
        """A commit that fails midway (an entry the kernel refuses to move) leaves no layer
        and no temporary directory."""
        upper, _ = run_task(store, base, seeded, "echo 1 > a; echo 2 > b; echo 3 > c")
        subprocess.run(["chattr", "+i", upper / "b"], check=True)
        try:
            before = store.layers()
            with pytest.raises(PermissionError):
                store.commit([upper], lowers=seeded)
            assert store.layers() == before
            assert [n for n in os.listdir(store.layers_dir) if n.startswith(".")] == []
        finally:
            subprocess.run(["chattr", "-i", upper / "b"], check=True)


class TestChanges:
    def test_kinds(self, store: LayerStore, base: Path, seeded: list[str]) -> None:
        """Each kind of change is named; parents that were only copied up are not."""
        upper, _ = run_task(store, base, seeded, "echo > new; rm src/a.txt; rm -rf docs; "
                            "mkdir docs; mkdir brand; chmod 700 keep; echo y > keep/sub/y; "
                            "ln -s x sym; mkfifo fifo")
        kinds = {c.path: c.kind for c in store.changes(upper, lowers=seeded)}
        assert kinds == {"new": "file", "src/a.txt": "delete", "docs": "opaque",
                         "brand": "dir", "keep": "meta", "keep/sub/y": "file",
                         "sym": "symlink", "fifo": "special"}

    def test_contents_of_a_replaced_directory_are_listed(self, store: LayerStore, base: Path,
                                                         seeded: list[str]) -> None:
        """An opaque or new directory is followed by its contents, parents first."""
        upper, _ = run_task(store, base, seeded, SCENARIOS["tree_removed_and_recreated"])
        assert [(c.path, c.kind) for c in store.changes(upper, lowers=seeded)] == [
            ("src", "opaque"), ("src/pkg", "dir"), ("src/pkg/fresh.py", "file")]


def change(path: str, kind: str = "file", mode: int = 0o644) -> Change:
    return Change(path, kind, mode, WORKER, WORKER)  # type: ignore[arg-type]


class TestConflictRules:
    def test_same_path_written_by_two_tasks(self) -> None:
        """Two writes of one path conflict, named with both tasks in task order."""
        found = conflicts([("a", [change("f")]), ("b", [change("g")]), ("c", [change("f")])])
        assert [(c.key, *c.tasks) for c in found] == [("f", "a", "c")]

    def test_files_side_by_side_in_one_directory(self) -> None:
        """Creating different files in one (new or existing) directory is no conflict."""
        assert conflicts([("a", [change("d", "dir", 0o755), change("d/x")]),
                          ("b", [change("d", "dir", 0o755), change("d/y")])]) == []
        assert conflicts([("a", [change("d/x")]), ("b", [change("d/y")])]) == []

    def test_same_new_directory_with_different_modes(self) -> None:
        """The same directory made with different modes is a conflict."""
        found = conflicts([("a", [change("d", "dir", 0o755)]), ("b", [change("d", "dir", 0o700)])])
        assert [c.key for c in found] == ["d"]

    @pytest.mark.parametrize("kind", ["delete", "opaque", "file", "symlink"])
    def test_write_under_a_replaced_directory(self, kind: str) -> None:
        """Writing under a path another task deleted, made opaque or turned into a file
        conflicts, whichever task comes first."""
        for tasks in ([("a", [change("d", kind)]), ("b", [change("d/e/f")])],
                      [("b", [change("d/e/f")]), ("a", [change("d", kind)])]):
            found = conflicts(tasks)
            assert len(found) == 1
            assert found[0].key == "d/e/f"
            assert set(found[0].tasks) == {"a", "b"}
            assert "replaced" in found[0].reason

    def test_a_task_may_write_under_what_it_replaced(self) -> None:
        assert conflicts([("a", [change("d", "opaque"), change("d/x")])]) == []


class TestConflictsOnRealUppers:
    def _two(self, store: LayerStore, base: Path, stack: list[str], first: str,
             second: str) -> list[tuple[str, list[Change]]]:
        uppers = [run_task(store, base, stack, s)[0] for s in (first, second)]
        return [(u.parent.name, store.changes(u, lowers=stack)) for u in uppers]

    @pytest.mark.parametrize(("first", "second", "path"), [
        ("echo a > src/a.txt", "echo b > src/a.txt", "src/a.txt"),
        ("rm -rf src", "echo b > src/pkg/new", "src/pkg/new"),
        ("rm -rf src; mkdir src; echo a > src/x", "echo b > src/y", "src/y"),
        ("rm -rf docs; echo f > docs", "echo b > docs/other", "docs/other"),
        ("rm keep/sub/x", "rm keep/sub/x", "keep/sub/x"),
    ])
    def test_conflict_is_found(self, store: LayerStore, base: Path, seeded: list[str],
                               first: str, second: str, path: str) -> None:
        """Real uppers: the conflicting path is named, and commit refuses them."""
        tasks = self._two(store, base, seeded, first, second)
        assert path in {c.key for c in conflicts(tasks)}
        uppers = [store.uppers_dir / name / "upper" for name, _ in tasks]
        with pytest.raises(FailedPrecondition, match=path):
            store.commit(uppers, lowers=seeded)
        assert len(store.layers()) == 2

    @pytest.mark.parametrize(("first", "second", "together"), [
        ("echo a > src/fromA", "echo b > src/fromB", ""),
        ("mkdir -p out; echo a > out/a", "mkdir -p out; echo b > out/b", ""),
        ("chmod 700 keep", "echo new > keep/new", ""),
        # The second task copies keep/sub up and changes nothing in it.
        ("rm -rf keep/sub", "echo t > keep/sub/tmp; rm keep/sub/tmp", "rm -rf keep/sub"),
        ("rm docs/README", "echo c > docs/CHANGES", ""),
    ])
    def test_no_conflict_merges_both_in_either_order(self, store: LayerStore, base: Path,
                                                     seeded: list[str], first: str,
                                                     second: str, together: str) -> None:
        """Non-conflicting tasks merge into one layer equal to running both scripts in one
        task, whatever the task order."""
        _, expected = run_task(store, base, seeded, together or f"{first}; {second}")
        for order in ((first, second), (second, first)):
            tasks = self._two(store, base, seeded, *order)
            assert conflicts(tasks) == []
            new = store.commit([store.uppers_dir / n / "upper" for n, _ in tasks],
                               lowers=seeded)
            assert new is not None
            assert view(store, base, [*seeded, new], mtimes=False) == {
                k: (*v[:5], None) for k, v in expected.items()}


class TestStacks:
    def test_rollback_and_fork(self, store: LayerStore, base: Path, seeded: list[str]) -> None:
        """Every prefix of a stack shows what its step left; two forks of one checkpoint
        diverge without touching each other or the shared layers."""
        stack, lives = seeded, []
        for script in ("echo 1 > one", "rm -rf src; echo 2 > two", "mv docs d2; chmod 700 d2"):
            stack, live = step(store, base, stack, script)
            lives.append(live)
        for k, live in enumerate(lives):
            assert view(store, base, stack[:3 + k]) == live
        fork_a, live_a = step(store, base, stack[:3], "echo a > a")
        fork_b, live_b = step(store, base, stack[:3], "rm one")
        assert view(store, base, fork_a) == live_a
        assert view(store, base, fork_b) == live_b
        assert view(store, base, stack[:3]) == lives[0]

    def test_hundred_and_twenty_layer_stack(self, store: LayerStore, base: Path) -> None:
        """A deep stack mounts with its upper; the view is what the layers say."""
        stack = deep_stack(store, 120)
        upper = store.new_upper("deep", WORKER, WORKER)
        with mounted(base, lower_paths(store, stack), upper.upper, upper.work) as m:
            m.sh("echo top > top")
            shown = tree(m.path, mtimes=False)
        assert shown["top"][4] == b"top\n"
        assert expected_deep(119) == {k for k in shown if k not in (".", "top")}

    def test_five_hundred_layers_squash_to_one(self, store: LayerStore, base: Path) -> None:
        """At the kernel's limit a stack still mounts; squashed, it is one layer with the same
        view, and the stack above it grows again (the lead squashes at a threshold; a
        501-layer stack is refused: see test_overlay)."""
        stack = deep_stack(store, 500)
        before = view(store, base, stack)
        squashed = store.squash(stack)
        assert view(store, base, [squashed]) == before
        stack, live = step(store, base, [squashed], "echo again > again; rm f3")
        assert view(store, base, stack) == live
        with pytest.raises(InvalidArgument):
            store.changes(store.uppers_dir, lowers=[squashed] * 501)


def deep_stack(store: LayerStore, depth: int) -> list[str]:
    """[base] + depth-1 layers committed from hand-written uppers: layer i adds f<i> and
    overwrites 'shared'; every 10th deletes f<i-5>; every 7th replaces dir d by a new one."""
    stack = [store.create_base(WORKER, WORKER)]
    for i in range(1, depth):
        upper = store.new_upper(f"deep{i}", WORKER, WORKER).upper
        (upper / f"f{i}").write_text(str(i))
        (upper / "shared").write_text(str(i))
        if i % 10 == 0:
            os.mknod(upper / f"f{i - 5}", stat.S_IFCHR, 0)
        if i % 7 == 0:
            (upper / "d").mkdir()
            os.setxattr(upper / "d", OPAQUE_XATTR, b"y")
            (upper / "d" / f"g{i}").write_text(str(i))
        new = store.commit([upper], lowers=stack)
        assert new is not None
        stack.append(new)
        store.remove_upper(f"deep{i}")
    return stack


def expected_deep(top: int) -> set[str]:
    names = {f"f{i}" for i in range(1, top + 1)} - {f"f{i - 5}" for i in range(10, top + 1, 10)}
    names |= {"shared", "d", f"d/g{top - top % 7}"}
    return names


class TestSquash:
    def test_squash_equals_the_stack(self, store: LayerStore, base: Path,
                                     seeded: list[str]) -> None:
        """Squashing any prefix from the base keeps every view: [squash] + rest == stack."""
        stack = seeded
        for name in ("write", "hard_links", "file_modes", "symlinks", "tree_removed_and_recreated",
                     "empty_dirs", "fifo", "dir_replaced_by_file"):
            stack, _ = step(store, base, stack, SCENARIOS[name])
        whole = view(store, base, stack)
        assert view(store, base, [store.squash(stack)]) == whole
        assert view(store, base, [store.squash(stack[:4]), *stack[4:]]) == whole

    def test_squash_shares_file_data(self, store: LayerStore, base: Path,
                                     seeded: list[str]) -> None:
        """Files are hard links into the source layers, directories are new, and no
        overlay marker survives."""
        stack, _ = step(store, base, seeded, SCENARIOS["tree_removed_and_recreated"])
        squashed = store.path(store.squash(stack))
        fresh = store.path(stack[-1]) / "src" / "pkg" / "fresh.py"
        assert os.lstat(squashed / "src/pkg/fresh.py").st_ino == os.lstat(fresh).st_ino
        assert private_xattrs(squashed) == {}


class TestExport:
    def test_tarball_equals_the_view(self, store: LayerStore, base: Path,
                                     seeded: list[str]) -> None:
        """Modes, owners, contents, symlinks, empty dirs, fifos; no whiteouts."""
        stack = seeded
        for name in ("hard_links", "delete", "symlinks", "tree_removed_and_recreated",
                     "empty_dirs", "fifo"):
            stack, _ = step(store, base, stack, SCENARIOS[name])
        buffer = io.BytesIO()
        store.export_tar(stack, buffer)
        shown = {k: (*v[:5], None if v[5] is None else v[5] // 10**9)
                 for k, v in view(store, base, stack).items()}
        assert tar_tree(buffer.getvalue()) == shown


def tar_tree(data: bytes) -> Tree:
    out: Tree = {}
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            payload: object = None
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                payload = contents[member.name] = extracted.read()
            elif member.islnk():
                payload = contents[member.linkname]
            elif member.issym():
                payload = member.linkname
            kind = {tarfile.REGTYPE: stat.S_IFREG, tarfile.LNKTYPE: stat.S_IFREG,
                    tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                    tarfile.FIFOTYPE: stat.S_IFIFO}[member.type]
            out[member.name] = (kind, member.mode, member.uid, member.gid, payload,
                                None if member.isdir() else int(member.mtime))
    return out


class TestHousekeeping:
    def test_leftovers_are_never_layers_and_gc_removes_them(self, store: LayerStore,
                                                           seeded: list[str]) -> None:
        """A `.tmp-*` (a crash mid-commit) or `.del-*` is garbage: not listed, not
        addressable, removed by gc with unreferenced layers and stale uppers."""
        for name in (".tmp-0123456789abcdef01234567", ".del-0123456789abcdef01234567"):
            (store.layers_dir / name / "half").mkdir(parents=True)
        orphan = store.create_base(WORKER, WORKER)
        store.new_upper("stale", WORKER, WORKER)
        store.new_upper("running", WORKER, WORKER)
        assert store.layers() == sorted([*seeded, orphan])
        with pytest.raises(InvalidArgument):
            store.path(".tmp-0123456789abcdef01234567")
        removed = store.gc(set(seeded), keep_uppers={"running"})
        assert sorted(removed) == sorted([".del-0123456789abcdef01234567",
                                          ".tmp-0123456789abcdef01234567", orphan,
                                          "uppers/stale"])
        assert store.layers() == sorted(seeded)
        assert os.listdir(store.uppers_dir) == ["running"]

    def test_delete(self, store: LayerStore, seeded: list[str]) -> None:
        store.delete(seeded[1])
        with pytest.raises(NotFound):
            store.path(seeded[1])
        assert store.layers() == [seeded[0]]

    def test_base_and_upper_ownership(self, store: LayerStore) -> None:
        """The base root and the upper are the worker's (0755); work is the worker's 0700."""
        root = os.stat(store.path(store.create_base(WORKER, WORKER)))
        assert (root.st_uid, root.st_gid, stat.S_IMODE(root.st_mode)) == (WORKER, WORKER, 0o755)
        upper = store.new_upper("t", WORKER, WORKER)
        for path, mode in ((upper.upper, 0o755), (upper.work, 0o700)):
            st = os.stat(path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (WORKER, WORKER, mode)
        with pytest.raises(FileExistsError):
            store.new_upper("t", WORKER, WORKER)
        with pytest.raises(InvalidArgument):
            store.new_upper("../escape", WORKER, WORKER)
