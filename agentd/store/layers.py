"""A run's workspace as a stack of immutable overlay layers, and the tasks' uppers above them.

Glossary (containerd's words where they fit): a *layer* is committed and immutable, named
`l-<hex>`, and is a plain directory in overlayfs's lower-layer format; a *stack* is a list of
layer ids, lowest (the base) first, and is what a checkpoint records; an *upper* is one task's
private writable directory (with its overlay work dir) for one step.

    root/layers/l-<hex>/        published layers: renamed into place complete and fsynced
    root/layers/.tmp-<hex>/     a layer being built; after a crash, garbage (gc removes it)
    root/layers/.del-<hex>/     a layer being deleted
    root/uppers/<run>.<task>/upper  a task's upper (owner: the worker's uid, 0755)
    root/uppers/<run>.<task>/work   its overlay work dir (owner: the worker's uid, 0700)

uppers/<run>.<task>/ is a tmpfs sized to the run's remaining quota where the kernel allows it
(agentd.store.quota), mounted in the daemon's own mount namespace so it dies with the daemon.
root, layers/, uppers/ and uppers/<run>.<task>/ are 0711: a user-namespace worker's overlay
crosses them with the worker's ids (so must every directory above root), nobody else lists
them.

Lifecycle of a step: `new_upper` per task → the worker mounts the stack under it
(`agentd.sandbox.overlay.mount_workspace`) → at the barrier, with every task's processes dead,
`changes` per upper → `conflicts` → `commit(uppers, lowers=stack, changes=...)` → the
checkpoint records `stack + [new id]` (or `stack` when commit returns None) → `remove_upper`
per task. Rollback and fork are list operations on stacks; `gc` removes what no checkpoint
references.

Layer format. A whiteout is a character device 0/0; a directory that replaces what is below
(`rm -rf d; mkdir d`, or a file replaced by a directory) carries `user.overlay.opaque=y`.
Every mount uses `userxattr` (see agentd/sandbox/overlay.py), and the kernel then reads the
`user.overlay.*` namespace on every layer, so layers carry only that one; commit strips every
other private xattr overlay leaves in an upper (origin, impure, uuid). A layer root is
never a change: its owner and mode are those of the stack's top layer (fixed by
`create_base`); a chmod of /workspace itself is not kept.

Design choices, with the alternatives:

- Overlay layers vs reflinks (a copy-on-write clone of the workspace per step, as on btrfs or
  xfs): reflinks make rollback and fork a clone, O(files) in metadata, and need a filesystem
  the ext4 root here does not offer; layers make them list operations, O(1), on any
  filesystem overlay accepts, at the price of a bounded stack depth (500) and so of squashing.
- Rename vs copy at commit: uppers live on the layers' filesystem so commit renames each
  changed entry (a whole new directory tree in one rename) into a new layer: O(changed
  entries), never O(bytes), and no data is written twice. An upper on a quota tmpfs is on
  another filesystem, so its entries are copied instead (EXDEV): O(bytes), bounded by the
  quota. The uppers are spent by a commit, successful or not: commit again means running the
  step again.
- Changes are read from the uppers only, plus lookups in the stack for directories: a
  directory present in an upper is either a parent of a change (overlay copied it up; not a
  change itself), a new directory, or an existing one whose mode, owner or xattrs changed.
  Telling those apart needs the stack below, so `changes` and `commit` take `lowers`.
- Squash walks the layers top-down in Python, with no mount, and *hard-links* every file of
  the merged view into the new layer: layers are immutable, so sharing inodes is safe, costs
  O(entries) metadata and no data (a copy through a read-only mount costs O(bytes) and twice
  the disk). Measured on 100,000 small files over 21 layers: 3.1 s by links vs 8.2 s for
  `cp -a` out of a read-only mount plus syncfs (tests/bench/layers_bench.py); the gap grows
  with file sizes. A file linked past the filesystem's link limit is copied. The same walker
  feeds `export_tar`.
- Hard links made by a task survive commit (rename keeps the inode); overlay with index=off
  breaks a link when one of its names is later copied up (as under docker's overlay2), so
  across steps links degrade to independent copies. Nothing here relies on link counts.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from agentd import durable
from agentd.conflicts import Conflict
from agentd.errors import FailedPrecondition, InvalidArgument, NotFound
from agentd.sandbox.overlay import MAX_LOWERS, OPAQUE_XATTR, PRIVATE_XATTR_PREFIXES
from agentd.store import quota
from agentd.store.tarball import write_tar
from agentd.store.trees import check_path, quarantine, remove_tree

__all__ = ["MAX_LOWERS", "Change", "Conflict", "LayerStore", "MergedEntry", "Upper",
           "conflicts", "walk_merged"]

ChangeKind = Literal["file", "symlink", "special", "delete", "opaque", "dir", "meta"]
# Kinds that replace whatever the stack had at the path, subtree included: another task
# writing under such a path conflicts with it.
REPLACING: frozenset[str] = frozenset({"file", "symlink", "special", "delete", "opaque"})

_LAYER_ID = re.compile(r"l-[0-9a-f]{24}")
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Upper:
    """One task's writable layer: mount `upper` and `work` above the stack."""

    task_id: str
    upper: Path
    work: Path


@dataclass(frozen=True)
class Change:
    """What one upper did to one path (relative to the workspace root, '/'-separated).

    kind: "file" | "symlink" | "special" (fifo, socket, device): the path now holds this
    entry, content and metadata (metacopy is off, so a chmod is a "file" too); "delete": a
    whiteout, the path and everything under it are gone; "opaque": a directory that replaces
    whatever was there (its contents follow as further changes); "dir": a new directory where
    the stack had nothing; "meta": an existing directory whose mode, owner or xattrs changed
    (it merges with the stack's). Directories that are only parents of changes are not
    changes. mode/uid/gid are the entry's (0 for "delete").
    """

    path: str
    kind: ChangeKind
    mode: int = 0
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class MergedEntry:
    """One entry of a stack's merged view: where it is relative to the root, and the real
    file of the layer that provides it."""

    rel: str
    source: Path
    stat: os.stat_result


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _ancestors(rel: str) -> Iterator[str]:
    """'a/b/c' → 'a', 'a/b'."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _user_xattrs(path: Path) -> dict[str, bytes]:
    """An entry's xattrs that are not overlay's own."""
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names
            if not n.startswith(PRIVATE_XATTR_PREFIXES)}


def _fsync(path: Path, *, directory: bool) -> None:
    durable.fsync_path(path, directory=directory)


def _copy_attrs(src: Path, dst: Path, st: os.stat_result | None = None) -> None:
    """Owner, mode and non-overlay xattrs of directory `src` onto directory `dst`."""
    st = st or os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name, value in _user_xattrs(src).items():
        os.setxattr(dst, name, value)


def _lookup(tops: Sequence[Path], rel: str) -> tuple[Path, os.stat_result] | None:
    """The stack's entry at `rel` as overlay resolves it (`tops`: layer roots, top-most
    first); None when no layer has it or a whiteout, opaque directory or file hides it."""
    parts = rel.split("/")
    for top in tops:
        current = top
        hidden_below = False
        for i, part in enumerate(parts):
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                if hidden_below:
                    return None
                break
            if _is_whiteout(st):
                return None
            if i == len(parts) - 1:
                return current, st
            if not stat.S_ISDIR(st.st_mode):
                return None
            hidden_below = hidden_below or _is_opaque(current)
    return None


def walk_merged(layers: Sequence[Path]) -> Iterator[MergedEntry]:
    """The merged view of `layers` (lowest first) as overlay shows it, parents before
    children, names sorted; the root first, as rel "". No mount is needed."""
    tops = list(reversed(layers))
    if not tops:
        return
    yield MergedEntry("", tops[0], os.lstat(tops[0]))
    yield from _walk_dirs(tops, "")


def _walk_dirs(sources: list[Path], rel: str) -> Iterator[MergedEntry]:
    """`sources`: the directories merged at `rel`, top-most first. Depth-first, parents
    before children, names sorted; iterative (an explicit stack), so depth costs no
    recursion."""
    stack = [iter(_merged_children(sources, rel))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        child, found = item
        (path, st), *_ = found
        yield MergedEntry(child, path, st)
        if stat.S_ISDIR(st.st_mode):
            check_path(child)
            stack.append(iter(_merged_children([p for p, _ in found], child)))


def _merged_children(sources: list[Path], rel: str
                     ) -> list[tuple[str, list[tuple[Path, os.stat_result]]]]:
    """The entries of one merged directory, sorted by name: each with the real entries that
    provide it, top-most first (several only for directories that merge)."""
    found: dict[str, list[tuple[Path, os.stat_result]]] = {}
    closed: set[str] = set()  # names no lower layer may add to
    for source in sources:
        with os.scandir(source) as it:
            for entry in it:
                name = entry.name
                if name in closed:
                    continue
                path = Path(entry.path)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    found.setdefault(name, []).append((path, st))
                    if _is_opaque(path):
                        closed.add(name)
                else:
                    closed.add(name)
                    if name not in found and not _is_whiteout(st):
                        found[name] = [(path, st)]
    return [(_join(rel, name), found[name]) for name in sorted(found)]


def conflicts(changes_by_task: Sequence[tuple[str, Sequence[Change]]]) -> list[Conflict]:
    """Every conflict between the tasks of one step (pure; tasks in task order).

    Two tasks conflict on a path both changed, unless both made it the same directory (same
    kind, mode and owner: creating files side by side in one directory is fine), and on a
    path one changed under a path the other replaced (deleted, made opaque, or turned into a
    file or symlink). Deleting the same path twice is a conflict too: every change counts.
    """
    by_path: dict[str, list[tuple[int, Change]]] = {}
    for index, (_, changes) in enumerate(changes_by_task):
        for change in changes:
            by_path.setdefault(change.path, []).append((index, change))
    found: dict[tuple[str, int, int], str] = {}
    for path, owners in by_path.items():
        for i, (first, a) in enumerate(owners):
            for second, b in owners[i + 1:]:
                same_dir = (a.kind == b.kind and a.kind in ("dir", "meta")
                            and (a.mode, a.uid, a.gid) == (b.mode, b.uid, b.gid))
                if not same_dir:
                    found.setdefault((path, first, second), f"changed by both ({a.kind}, "
                                                            f"{b.kind})")
    for path, owners in by_path.items():
        for ancestor in _ancestors(path):
            for replacer, replaced in by_path.get(ancestor, ()):
                if replaced.kind not in REPLACING:
                    continue
                for writer, _ in owners:
                    if writer != replacer:
                        key = (path, min(writer, replacer), max(writer, replacer))
                        found.setdefault(key, f"written under {ancestor}, which task "
                                              f"{changes_by_task[replacer][0]!r} replaced "
                                              f"({replaced.kind})")
    return [Conflict("path", path, (changes_by_task[a][0], changes_by_task[b][0]), reason)
            for (path, a, b), reason in sorted(found.items())]


class LayerStore:
    """Layers and uppers under one root; every method is safe to call from several threads
    (the state is the directory; a lock guards only the set of layers being built)."""

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        """`reserve_bytes`: room on the state filesystem that commits never use (kept for the
        audit log and the state database)."""
        self.root = root
        self.reserve_bytes = reserve_bytes
        self.layers_dir = root / "layers"
        self.uppers_dir = root / "uppers"
        for path in (root, self.layers_dir, self.uppers_dir):
            path.mkdir(mode=0o711, exist_ok=True)
            # Search, not list: a user-namespace worker's overlay reaches its layers and upper
            # with the worker's ids; other host users cannot enumerate layer ids.
            os.chmod(path, 0o711)  # noqa: S103 - see above
        self.quarantine_dir = root / "quarantine"
        self.usage_dir = root / "usage"  # bytes and inodes of each layer (agentd.store.quota)
        # Each task's upper on a tmpfs sized to the run's remaining quota, where overlay can
        # use one (agentd.store.quota says why this mechanism).
        self.tmpfs_uppers = quota.tmpfs_uppers_supported(self.uppers_dir)
        self._commit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._building: set[str] = set()
        self._quarantined: list[str] = []

    # -- naming ---------------------------------------------------------------------------

    def path(self, layer_id: str) -> Path:
        """The directory of a published layer (what overlay takes as a lower)."""
        if not _LAYER_ID.fullmatch(layer_id):
            raise InvalidArgument(f"{layer_id!r} is not a layer id")
        path = self.layers_dir / layer_id
        if not path.is_dir():
            raise NotFound(f"layer {layer_id} does not exist (deleted, or never committed)")
        return path

    def layers(self) -> list[str]:
        """Every published layer id, sorted."""
        return sorted(n for n in os.listdir(self.layers_dir) if _LAYER_ID.fullmatch(n))

    def _tops(self, lowers: Sequence[str]) -> list[Path]:
        if len(lowers) > MAX_LOWERS:
            raise InvalidArgument(f"a stack has at most {MAX_LOWERS} layers, got {len(lowers)}")
        return [self.path(layer_id) for layer_id in reversed(lowers)]

    # -- building layers ------------------------------------------------------------------

    def _begin(self) -> tuple[str, Path]:
        layer_id = "l-" + secrets.token_hex(12)
        tmp = self.layers_dir / f".tmp-{layer_id[2:]}"
        with self._lock:
            self._building.add(tmp.name)
        tmp.mkdir(mode=0o755)
        return layer_id, tmp

    def _publish(self, layer_id: str, tmp: Path) -> str:
        os.rename(tmp, self.layers_dir / layer_id)
        _fsync(self.layers_dir, directory=True)
        return layer_id

    def _abandon(self, tmp: Path) -> None:
        try:
            remove_tree(tmp)
        except OSError:
            self._quarantine(tmp)

    def _quarantine(self, path: Path) -> Path | None:
        """Moves what could not be removed aside (the daemon keeps serving), and remembers it
        for the next `take_quarantined`."""
        try:
            moved = quarantine(path, self.quarantine_dir)
        except OSError:
            return None
        with self._lock:
            self._quarantined.append(str(moved))
        return moved

    def quarantined_for(self, run_id: str) -> list[str]:
        """What of `run_id`'s uppers sits in quarantine (uppers are named `<run>.<task>`)."""
        try:
            names = os.listdir(self.quarantine_dir)
        except FileNotFoundError:
            return []
        return sorted(str(self.quarantine_dir / n) for n in names if n.startswith(run_id + "."))

    def take_quarantined(self) -> list[str]:
        """What was moved into quarantine since the last call (for the audit log)."""
        with self._lock:
            taken, self._quarantined = self._quarantined, []
        return taken

    def _end(self, tmp: Path) -> None:
        with self._lock:
            self._building.discard(tmp.name)

    def create_base(self, owner_uid: int, owner_gid: int) -> str:
        """A new empty layer whose root is owned by the worker's ids, mode 0755."""
        layer_id, tmp = self._begin()
        try:
            os.chown(tmp, owner_uid, owner_gid)
            os.chmod(tmp, 0o755)  # noqa: S103 - /workspace as the worker sees it
            _fsync(tmp, directory=True)
            return self._publish(layer_id, tmp)
        except BaseException:
            self._abandon(tmp)
            raise
        finally:
            self._end(tmp)

    # -- uppers ---------------------------------------------------------------------------

    def new_upper(self, task_id: str, owner_uid: int, owner_gid: int, *,
                  remaining: quota.Quota | None = None) -> Upper:
        """A fresh upper and work dir for `task_id`, owned by the worker's ids; with
        `remaining`, on a tmpfs that holds no more than that (see agentd.store.quota).

        Ownership by the worker is what a user-namespace mount needs (the mounter's ids are
        the worker's); a plain mount, made as root, works with it too.
        """
        if not _TASK_ID.fullmatch(task_id):
            raise InvalidArgument(f"{task_id!r} cannot name an upper (letters, digits, '._-')")
        base = self.uppers_dir / task_id
        base.mkdir(mode=0o711)  # FileExistsError: the task already has one
        if remaining is not None and self.tmpfs_uppers:
            quota.mount_upper(base, remaining)
        upper, work = base / "upper", base / "work"
        for path, mode in ((upper, 0o755), (work, 0o700)):
            path.mkdir()
            os.chown(path, owner_uid, owner_gid)
            os.chmod(path, mode)
        return Upper(task_id, upper, work)

    def remove_upper(self, task_id: str) -> None:
        """Removes a task's upper and work dir (no process may still use them); what cannot
        be removed is quarantined, never raised: one run's leftovers block nobody."""
        path = self.uppers_dir / task_id
        quota.unmount_if_mounted(path)
        try:
            remove_tree(path)
        except OSError:
            self._quarantine(path)

    def changes(self, upper: Path, *, lowers: Sequence[str]) -> list[Change]:
        """What `upper` changed above the stack `lowers` (lowest first), parents first."""
        return _changes(upper, self._tops(lowers))

    def conflicts(self, changes_by_task: Sequence[tuple[str, Sequence[Change]]]
                  ) -> list[Conflict]:
        """See `conflicts` (module level): the same, for callers holding a store."""
        return conflicts(changes_by_task)

    # -- commit ---------------------------------------------------------------------------

    def usage(self, stack: Sequence[str]) -> quota.Usage:
        """What the layers of `stack` take on disk (each counted once, shared or not)."""
        total = quota.Usage()
        for layer_id in stack:
            found = quota.read_usage(self.usage_dir, layer_id)
            if found is None:  # a layer older than usage files: count it once, keep it
                found = quota.measure(self.path(layer_id))
                quota.write_usage(self.usage_dir, layer_id, found)
            total += found
        return total

    def commit(self, uppers: Sequence[Path], *, lowers: Sequence[str],
               changes: Sequence[Sequence[Change]] | None = None,
               limit: quota.Quota | None = None) -> str | None:
        """Merges `uppers` (in task order) above the stack `lowers` into one new layer.

        `changes`, one list per upper, are what `changes` found for them: a step computed them
        already (to report and to check conflicts) and they are not computed again; without
        them, commit computes them. Returns the new layer's id once it is complete, fsynced
        and published, or None when the uppers changed nothing. Raises FailedPrecondition if
        the uppers conflict (check `conflicts` first and fail the step with them). The uppers
        are spent either way. Every process that wrote to them must be dead: their entries
        move into the layer.
        """
        tops = self._tops(lowers)
        if changes is None:
            changes = [_changes(u, tops) for u in uppers]
        per_upper = [(u.parent.name, list(c)) for u, c in zip(uppers, changes, strict=True)]
        found = conflicts(per_upper)
        if found:
            raise FailedPrecondition("the step's changes conflict: "
                                     + "; ".join(str(c) for c in found))
        if not any(changes for _, changes in per_upper):
            return None
        # One commit at a time past the reserve check, so two cannot both pass it.
        with self._commit_lock:
            needed = sum(quota.used(u).bytes for u in uppers if os.path.ismount(u.parent))
            quota.check_reserve(self.layers_dir, needed, self.reserve_bytes)
            return self._build_commit(uppers, per_upper, tops, lowers, limit)

    def _build_commit(self, uppers: Sequence[Path], per_upper: list[tuple[str, list[Change]]],
                      tops: list[Path], lowers: Sequence[str], limit: quota.Quota | None
                      ) -> str:
        layer_id, tmp = self._begin()
        try:
            root_st = os.lstat(tops[0] if tops else uppers[0])
            os.chown(tmp, root_st.st_uid, root_st.st_gid)
            os.chmod(tmp, stat.S_IMODE(root_st.st_mode))
            times: dict[Path, os.stat_result] = {}
            for upper, (_, changes) in zip(uppers, per_upper, strict=True):
                by_path = {c.path: c for c in changes}
                needed = set(by_path)
                for change in changes:
                    needed.update(_ancestors(change.path))
                _merge(upper, tmp, needed, by_path, times)
            for path, st in times.items():
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            _normalise_and_sync(tmp)
            usage = quota.measure(tmp)
            if limit is not None:
                quota.check_limit(self.usage(lowers) + usage, limit)
            quota.write_usage(self.usage_dir, layer_id, usage)
            return self._publish(layer_id, tmp)
        except BaseException:
            self._abandon(tmp)
            raise
        finally:
            self._end(tmp)

    # -- squash and export ----------------------------------------------------------------

    def squash(self, layers: Sequence[str]) -> str:
        """One new layer with the merged view of `layers` (lowest first, from the base).

        The result holds no whiteouts or opaque markers: it is a bottom layer, and the stack
        `[squashed] + later layers` shows what `layers + later layers` shows. Files are hard
        links to the source layers' (copied past the link limit); directories are new.
        """
        tops = self._tops(layers)
        layer_id, tmp = self._begin()
        try:
            dirs: list[tuple[Path, os.stat_result]] = []
            for entry in walk_merged(list(reversed(tops))):
                target = tmp / entry.rel if entry.rel else tmp
                if stat.S_ISDIR(entry.stat.st_mode):
                    if entry.rel:
                        target.mkdir()
                    _copy_attrs(entry.source, target, entry.stat)
                    dirs.append((target, entry.stat))
                else:
                    _link_or_copy(entry.source, target, entry.stat)
            for path, st in reversed(dirs):
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                _fsync(path, directory=True)
            return self._publish(layer_id, tmp)
        except BaseException:
            self._abandon(tmp)
            raise
        finally:
            self._end(tmp)

    def export_tar(self, layers: Sequence[str], fileobj: BinaryIO, *,
                   max_bytes: int | None = None) -> None:
        """Streams a tarball (PAX, sparse files as sparse) of the merged view of `layers` to
        `fileobj`; ResourceExhausted past `max_bytes`."""
        write_tar(walk_merged(list(reversed(self._tops(layers)))), fileobj, max_bytes=max_bytes)

    # -- single files, without a worker ---------------------------------------------------

    def read_file(self, layers: Sequence[str], rel: str, max_bytes: int) -> tuple[bytes, int]:
        """The regular file at `rel` in the merged view of `layers`, and its permission bits.
        Nothing on the way is followed: a symlink, in the path or at its end, is refused (a
        link an agent made could point anywhere on the host)."""
        where = _lookup(self._tops(layers), rel)
        if where is None:
            raise NotFound(f"{rel} does not exist in the workspace at this checkpoint")
        path, st = where
        if stat.S_ISLNK(st.st_mode):
            raise FailedPrecondition(f"{rel} is a symbolic link; read the file it points to "
                                     "by its own path (links are never followed here)")
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{rel} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if os.fstat(fd).st_size > max_bytes:
                raise FailedPrecondition(
                    f"{rel} holds {os.fstat(fd).st_size} bytes, more than a reply carries "
                    f"({max_bytes}); export the checkpoint, or read it in a step")
            chunks, size = [], 0
            while size <= max_bytes and (chunk := os.read(fd, 1 << 20)):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks)[:max_bytes], stat.S_IMODE(st.st_mode)

    def stage_file(self, upper: Path, lowers: Sequence[str], rel: str, data: bytes,
                   mode: int, owner_uid: int, owner_gid: int) -> None:
        """Writes `rel` into an empty `upper` as a task of the worker's ids would have, so
        that `commit` takes it like any task's: parents the stack lacks are made (owned by
        the worker), parents it has keep their owner and mode. A parent that is not a
        directory in the merged view, or a directory at `rel`, is refused."""
        tops = self._tops(lowers)
        current = upper
        for ancestor in _ancestors(rel):
            current = upper / ancestor
            found = _lookup(tops, ancestor)
            if found is not None and not stat.S_ISDIR(found[1].st_mode):
                raise FailedPrecondition(f"{ancestor} is not a directory in the workspace, so "
                                         f"{rel} cannot be written")
            current.mkdir()
            if found is None:
                os.chown(current, owner_uid, owner_gid)
                os.chmod(current, 0o755)  # noqa: S103 - a directory as a worker's umask makes it
            else:
                _copy_attrs(found[0], current, found[1])
        existing = _lookup(tops, rel)
        if existing is not None and stat.S_ISDIR(existing[1].st_mode):
            raise FailedPrecondition(f"{rel} is a directory in the workspace")
        fd = os.open(upper / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, owner_uid, owner_gid)
            os.fchmod(fd, mode & 0o777)
        finally:
            os.close(fd)

    # -- removal --------------------------------------------------------------------------

    def delete(self, layer_id: str) -> None:
        """Removes a layer that no checkpoint and no running task uses (overlay forbids
        changing a mounted lower). A crash midway leaves a `.del-*` that gc removes."""
        doomed = self.layers_dir / f".del-{self.path(layer_id).name[2:]}"
        os.rename(self.layers_dir / layer_id, doomed)
        quota.usage_path(self.usage_dir, layer_id).unlink(missing_ok=True)
        try:
            remove_tree(doomed)
        except OSError:
            self._quarantine(doomed)

    def gc(self, referenced: Collection[str], *, keep_uppers: Collection[str] = ()
           ) -> list[str]:
        """Removes layers not in `referenced`, leftovers of interrupted builds and deletes,
        and the uppers of tasks not in `keep_uppers` (default: all of them, right at start-up
        when no task runs; pass the running tasks' ids otherwise); returns what it removed
        (`l-…`, `.tmp-…`, `.del-…`, `uppers/<task>`). A layer that commit or squash has
        returned but no checkpoint records yet is unreferenced, as are a running squash's
        inputs: run gc at start-up, or pass those in `referenced`."""
        removed = []
        with self._lock:
            building = set(self._building)
        for name in sorted(os.listdir(self.layers_dir)):
            if _LAYER_ID.fullmatch(name):
                if name in referenced:
                    continue
                quota.usage_path(self.usage_dir, name).unlink(missing_ok=True)
            elif not name.startswith((".tmp-", ".del-")) or name in building:
                continue
            self._remove_or_quarantine(self.layers_dir / name)
            removed.append(name)
        for name in sorted(os.listdir(self.uppers_dir)):
            if name not in keep_uppers:
                quota.unmount_if_mounted(self.uppers_dir / name)
                self._remove_or_quarantine(self.uppers_dir / name)
                removed.append(f"uppers/{name}")
        return removed

    def _remove_or_quarantine(self, path: Path) -> None:
        try:
            remove_tree(path)
        except OSError:
            self._quarantine(path)


def _changes(upper: Path, tops: Sequence[Path]) -> list[Change]:
    """The changes under `upper`, parents first, names sorted. Iterative; a path longer than
    a layer may hold raises PathTooLong before the walk goes deeper."""
    out: list[Change] = []
    # Frames: (sorted entries of a directory, its rel, inside a directory the stack does not
    # have (or hides), where every entry is new and no lookup is needed).
    stack = [(iter(_sorted_entries(upper)), "", False)]
    while stack:
        entries, rel, below_new = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path, child = Path(entry.path), _join(rel, entry.name)
        check_path(child)
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if _is_whiteout(st):
            out.append(Change(child, "delete"))
            continue
        ids = (stat.S_IMODE(mode), st.st_uid, st.st_gid)
        if stat.S_ISDIR(mode):
            if _is_opaque(path):
                out.append(Change(child, "opaque", *ids))
                stack.append((iter(_sorted_entries(path)), child, True))
                continue
            found = None if below_new else _lookup(tops, child)
            if found is None or not stat.S_ISDIR(found[1].st_mode):
                out.append(Change(child, "dir", *ids))
                stack.append((iter(_sorted_entries(path)), child, True))
                continue
            lower_path, lower = found
            if (ids != (stat.S_IMODE(lower.st_mode), lower.st_uid, lower.st_gid)
                    or _user_xattrs(path) != _user_xattrs(lower_path)):
                out.append(Change(child, "meta", *ids))
            stack.append((iter(_sorted_entries(path)), child, False))
        elif stat.S_ISREG(mode):
            out.append(Change(child, "file", *ids))
        elif stat.S_ISLNK(mode):
            out.append(Change(child, "symlink", *ids))
        else:
            out.append(Change(child, "special", *ids))
    return out


def _sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


def _merge(src: Path, dst: Path, needed: set[str], by_path: dict[str, Change],
           times: dict[Path, os.stat_result]) -> None:
    """Moves one upper's changes under `src` into the layer being built at `dst`.
    Iterative: frames of (source dir, target dir, rel, remaining names)."""
    stack: list[tuple[Path, Path, str, Iterator[str]]] = []

    def enter(s: Path, d: Path, rel: str) -> None:
        times[d] = os.lstat(s)  # adding entries below changes its mtime: restore it after
        stack.append((s, d, rel, iter(sorted(os.listdir(s)))))

    enter(src, dst, "")
    while stack:
        src_dir, dst_dir, rel, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = _join(rel, name)
        if child not in needed:
            continue  # a parent copied up for nothing (its change was undone)
        s, d = src_dir / name, dst_dir / name
        change = by_path.get(child)
        exists = os.path.lexists(d)
        if change is None or change.kind == "meta":
            # An existing directory of the stack, kept as a merging (non-opaque) directory.
            if not exists:
                d.mkdir()
                _copy_attrs(s, d)
            elif not (d.is_dir() and not d.is_symlink()):
                raise FailedPrecondition(f"{child}: written under a path another task "
                                         "replaced (internal: conflicts() let it through)")
            elif change is not None:
                _copy_attrs(s, d)  # this task changed its metadata; the earlier one did not
            enter(s, d, child)
        elif exists:
            # Two tasks made the same new directory (conflicts() allowed it): merge.
            if change.kind != "dir" or not (d.is_dir() and not d.is_symlink()):
                raise FailedPrecondition(f"{child}: changed by two tasks (internal: "
                                         "conflicts() let it through)")
            enter(s, d, child)
        else:
            _move(s, d)


def _move(src: Path, dst: Path) -> None:
    """Renames an upper's entry into the layer; copies it when the upper is a tmpfs."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        quota.copy_tree(src, dst)


def _normalise_and_sync(layer: Path) -> None:
    """Strips overlay's private xattrs (an opaque marker stays), then fsyncs every regular
    file and directory of the new layer, children before parents. Iterative."""
    directories: list[Path] = []
    pending = [layer]
    while pending:
        directory = pending.pop()
        directories.append(directory)
        with os.scandir(directory) as it:
            for entry in it:
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                    continue
                _strip_private(path, is_dir=False)
                if entry.is_file(follow_symlinks=False):
                    _fsync(path, directory=False)
    for directory in reversed(directories):  # every child was appended after its parent
        if directory != layer:
            _strip_private(directory, is_dir=True)
            _fsync(directory, directory=True)
    _strip_private(layer, is_dir=True, keep_opaque=False)
    _fsync(layer, directory=True)


def _strip_private(path: Path, *, is_dir: bool, keep_opaque: bool = True) -> None:
    for name in os.listxattr(path, follow_symlinks=False):
        if not name.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        if (keep_opaque and is_dir and name == OPAQUE_XATTR
                and os.getxattr(path, name, follow_symlinks=False) == b"y"):
            continue
        os.removexattr(path, name, follow_symlinks=False)


def _link_or_copy(source: Path, target: Path, st: os.stat_result) -> None:
    """Hard-links a non-directory of an immutable layer; copies it past the link limit."""
    try:
        os.link(source, target, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EMLINK, errno.EXDEV):
            raise
    mode = st.st_mode
    if stat.S_ISREG(mode):
        shutil.copyfile(source, target)
        _fsync(target, directory=False)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    else:
        os.mknod(target, mode, st.st_rdev)
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        os.chmod(target, stat.S_IMODE(mode))
        for name, value in _user_xattrs(source).items():
            os.setxattr(target, name, value)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
