"""The run's workspace as an overlay mount: immutable layers below, one task's upper on top.

Child side: runs in the worker's own mount namespace, before pivot_root (layer paths are host
paths), with the same credentials as the rest of `mounts.enter` (so, in a user namespace,
after `set_filesystem_ids`). Built with the new mount API (fsopen / fsconfig / fsmount /
move_mount) because it takes one `lowerdir+` per fsconfig call (kernel >= 6.8): a stack of
hundreds of layers never meets the page-size limit of a classic mount option string, and no
path needs escaping (`lowerdir+` does not split on ':' or ',').

Order. `lowers` is lowest first (base first), like a checkpoint's layer list everywhere else
in agentd. The kernel wants the opposite: the first `lowerdir+` is the top-most lower (right
under the upper), each later one goes below it, as with `lowerdir=top:...:bottom`; this module
reverses the list. At most MAX_LOWERS (500, OVL_MAX_STACK) lowers, with or without an upper;
more is refused here with E2BIG before the kernel's bare EINVAL: squash first.

Options, and why:

    userxattr            always, not only in a user namespace. Overlay's private xattrs
                         (opaque dirs) live in `user.overlay.*` instead of `trusted.overlay.*`.
                         In a user namespace it is mandatory: trusted.* cannot be written
                         there, and without it `rm -rf` of a lower directory fails with EIO.
                         The kernel reads the *same* namespace on every layer of a mount,
                         lowers included, so a layer's opaque marker means something only
                         under one of the two modes; using userxattr everywhere makes every
                         layer mount identically for plain and user-namespace workers
                         (LayerStore writes `user.overlay.opaque`, see OPAQUE_XATTR). Through
                         the overlay a tool can neither read nor set `user.overlay.*`, so it
                         cannot forge a marker into its upper.
    redirect_dir=nofollow  renaming a directory that exists in a lower fails with EXDEV and
                         tools (mv, Python's shutil.move) fall back to copy + delete, as
                         across filesystems; no redirect xattr reaches a layer, so a layer is
                         self-describing. `off` is not usable: with userxattr the kernel
                         rejects anything but nofollow (and on this kernel `off` means
                         `follow`, CONFIG_OVERLAY_FS_REDIRECT_ALWAYS_FOLLOW).
    metacopy=off         a chmod copies the whole file up: an upper entry is always complete,
                         so a committed layer never depends on the layer it was copied from.
    index=off            no inode index in the work dir: hard links are not kept across
                         copy-up (documented overlayfs behaviour), and nothing in an upper
                         refers to a lower's file handles that commit would have to rewrite.
    xino=off             every layer and the upper are on one filesystem (LayerStore checks
                         it): overlay then reports the real st_ino, unique and stable, with no
                         high bits to spend.
    (volatile: not set)  it would make tools' fsyncs free, and is sound here (a crash
                         discards uppers; commit fsyncs what it keeps), but it is an
                         optimisation nothing has measured a need for yet.

The read-write variant checks that the mount came out writable: overlay mounts *read-only
without an error* when it cannot create its work directory (in a user namespace: upper and
work not owned by the mapped uid), and a task whose writes all fail with EROFS is far harder
to diagnose than a setup error. The read-only variant (export, inspection) has no upper;
overlay needs two lowers then, so a one-layer stack is bound read-only instead (a bottom layer,
base or squash, holds no whiteouts, so the bind shows the same tree).

Every failure raises OSError with the errno and a message naming the fsconfig key (or the
syscall) that failed, plus what the kernel logged on the context, if anything.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from agentd.sandbox import libc

MAX_LOWERS = 500  # OVL_MAX_STACK
OPAQUE_XATTR = "user.overlay.opaque"  # what the kernel reads on every layer with userxattr
PRIVATE_XATTR_PREFIXES = ("user.overlay.", "trusted.overlay.")

# Options set on every overlay mount, in order; None is a flag. See the module docstring.
OPTIONS: tuple[tuple[str, str | None], ...] = (
    ("userxattr", None),
    ("redirect_dir", "nofollow"),
    ("metacopy", "off"),
    ("index", "off"),
    ("xino", "off"),
)

DEFAULT_ATTRS = libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV

# Generic syscall numbers: the same on x86_64 and aarch64.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432

_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(number: int, what: str, *args: libc.SyscallArg) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _kernel_log(fs_fd: int) -> str:
    """What the kernel logged on the fs context (read(2) yields one message per call)."""
    messages = []
    while True:
        try:
            raw = os.read(fs_fd, 4096)
        except OSError:  # ENODATA: no more messages
            break
        if not raw:
            break
        messages.append(raw.decode(errors="replace").strip())
    return "; ".join(messages)


def _fsconfig(fs_fd: int, key: str, value: str | None) -> None:
    cmd = _FSCONFIG_SET_FLAG if value is None else _FSCONFIG_SET_STRING
    result = int(_libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fs_fd),
                               ctypes.c_uint(cmd), ctypes.c_char_p(key.encode()),
                               None if value is None else ctypes.c_char_p(value.encode()),
                               ctypes.c_int(0)))
    if result == -1:
        err = ctypes.get_errno()
        shown = key if value is None else f"{key}={value}"
        log = _kernel_log(fs_fd)
        raise OSError(err, f"overlay fsconfig {shown}: {os.strerror(err)}"
                           + (f" (kernel: {log})" if log else ""))


def _create(fs_fd: int) -> None:
    result = int(_libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_int(fs_fd),
                               ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0)))
    if result == -1:
        err = ctypes.get_errno()
        log = _kernel_log(fs_fd)
        raise OSError(err, f"overlay fsconfig create: {os.strerror(err)}"
                           + (f" (kernel: {log})" if log else " (see dmesg: overlayfs)"))


def _attach(mount_fd: int, target: str) -> None:
    _syscall(_SYS_MOVE_MOUNT, f"move_mount to {target}", ctypes.c_int(mount_fd),
             ctypes.c_char_p(b""), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(target.encode()),
             ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))


def _check_lowers(lowers: Sequence[str], *, minimum: int) -> None:
    if len(lowers) < minimum:
        raise OSError(errno.EINVAL, f"overlay needs at least {minimum} lower layer(s), got "
                                    f"{len(lowers)}")
    if len(lowers) > MAX_LOWERS:
        raise OSError(errno.E2BIG, f"overlay fsconfig lowerdir+: {len(lowers)} lower layers, "
                                   f"overlayfs stacks at most {MAX_LOWERS}: squash the stack")


def _kernel_has_lowerdir_plus() -> bool:
    """`lowerdir+` (one layer per fsconfig call) exists from Linux 6.8; Debian 12 has 6.1."""
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (6, 8)
    except (IndexError, ValueError):
        return False


_LOWERDIR_PLUS = _kernel_has_lowerdir_plus()
_LEGACY_DATA_MAX = 4095  # mount(2) copies at most one page of options


def _mount_overlay_legacy(target: str, lowers: Sequence[str],
                          upper: tuple[str, str] | None, attrs: int) -> None:
    """mount(2) with a `lowerdir=a:b:c` option string, for kernels before 6.8.

    The string must fit in a page, so the layers are named relative to their common parent
    (made the working directory for the call): ~27 bytes a layer, room for about 140; the
    daemon squashes long before that.
    """
    parents = {os.path.dirname(lower) for lower in lowers}
    base = parents.pop() if len(parents) == 1 else None
    names = [os.path.basename(lower) if base else lower for lower in reversed(lowers)]
    if any(c in name for name in names for c in ":,\\"):
        raise OSError(errno.EINVAL, "overlay: a layer path contains ':', ',' or '\\'")
    options = ["lowerdir=" + ":".join(names)]
    if upper is not None:
        options += [f"upperdir={upper[0]}", f"workdir={upper[1]}"]
    options += [key if value is None else f"{key}={value}" for key, value in OPTIONS]
    data = ",".join(options)
    if len(data) > _LEGACY_DATA_MAX:
        raise OSError(errno.E2BIG, f"overlay: {len(lowers)} layers do not fit in one mount's "
                                   "options on this kernel (< 6.8); squash the stack")
    previous = os.getcwd()
    if base:
        os.chdir(base)
    try:
        # MOUNT_ATTR_{RDONLY,NOSUID,NODEV,NOEXEC} are the same bits as MS_{...}.
        libc.mount("overlay", target, "overlay", attrs & 0xF, data)
    finally:
        os.chdir(previous)


def _open_overlay(lowers: Sequence[str], upper: tuple[str, str] | None, attrs: int) -> int:
    """A detached overlay mount (an fd for move_mount), built with `lowerdir+` (>= 6.8)."""
    fs_fd = _syscall(_SYS_FSOPEN, "fsopen overlay", ctypes.c_char_p(b"overlay"),
                     ctypes.c_uint(_FSOPEN_CLOEXEC))
    try:
        for lower in reversed(lowers):  # the kernel takes the top-most lower first
            _fsconfig(fs_fd, "lowerdir+", lower)
        if upper is not None:
            _fsconfig(fs_fd, "upperdir", upper[0])
            _fsconfig(fs_fd, "workdir", upper[1])
        for key, value in OPTIONS:
            _fsconfig(fs_fd, key, value)
        _create(fs_fd)
        return _syscall(_SYS_FSMOUNT, "fsmount overlay", ctypes.c_int(fs_fd),
                        ctypes.c_uint(_FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
    finally:
        os.close(fs_fd)


def _open_tree(path: str, attrs: int) -> int:
    """A detached bind of `path` with mount attributes `attrs`."""
    tree_fd = _syscall(_SYS_OPEN_TREE, f"open_tree {path}", ctypes.c_int(_AT_FDCWD),
                       ctypes.c_char_p(path.encode()),
                       ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC))
    try:
        attr = _MountAttr(attrs, 0, 0, 0)
        libc.syscall("mount_setattr", ctypes.c_int(tree_fd), ctypes.c_char_p(b""),
                     ctypes.c_uint(_AT_EMPTY_PATH), ctypes.c_void_p(ctypes.addressof(attr)),
                     ctypes.c_size_t(ctypes.sizeof(attr)))
    except BaseException:
        os.close(tree_fd)
        raise
    return tree_fd


# A workspace can be built as a detached mount in one process and attached by another (the
# warm pool: agentd/sandbox/pool.py) only where `lowerdir+` exists.
DETACHED = _LOWERDIR_PLUS


def attach(mount_fd: int, target: str) -> None:
    """Attaches a detached mount (from `open_workspace`/`open_readonly`) at `target`, in the
    caller's mount namespace; the fd may come from another process."""
    _attach(mount_fd, target)


def open_workspace(lowers: Sequence[str], upper: str, work: str, *,
                   attrs: int = DEFAULT_ATTRS) -> int:
    """`mount_workspace` as a detached mount fd (kernel >= 6.8, see DETACHED); the caller
    closes it. Raises OSError(EROFS) if overlay fell back to a read-only mount."""
    _check_lowers(lowers, minimum=1)
    mount_fd = _open_overlay(lowers, (upper, work), attrs & ~libc.MOUNT_ATTR_RDONLY)
    if os.fstatvfs(mount_fd).f_flag & os.ST_RDONLY:
        os.close(mount_fd)
        raise OSError(errno.EROFS, f"overlay came out read-only: the mounter cannot write "
                                   f"{upper} or {work} (in a user namespace they must be "
                                   "owned by the mapped uid)")
    return mount_fd


def open_readonly(lowers: Sequence[str], *, attrs: int = DEFAULT_ATTRS) -> int:
    """`mount_readonly` as a detached mount fd (kernel >= 6.8); the caller closes it."""
    _check_lowers(lowers, minimum=1)
    attrs |= libc.MOUNT_ATTR_RDONLY
    if len(lowers) > 1:
        return _open_overlay(lowers, None, attrs)
    return _open_tree(lowers[0], attrs)


def _mount_overlay(target: str, lowers: Sequence[str], upper: tuple[str, str] | None,
                   attrs: int) -> None:
    if not _LOWERDIR_PLUS:
        _mount_overlay_legacy(target, lowers, upper, attrs)
        return
    mount_fd = _open_overlay(lowers, upper, attrs)
    try:
        _attach(mount_fd, target)
    finally:
        os.close(mount_fd)


def mount_workspace(target: str, lowers: Sequence[str], upper: str, work: str, *,
                    attrs: int = DEFAULT_ATTRS) -> None:
    """Mounts `lowers` (lowest first) under the writable `upper` at `target` (child side).

    `work` must be an empty directory on the upper's filesystem. `attrs` are MOUNT_ATTR_*
    flags of the new mount (add MOUNT_ATTR_NOEXEC unless the policy lets the workspace be
    executed; MOUNT_ATTR_RDONLY is ignored: a read-only workspace is `mount_readonly`).
    Raises OSError(EROFS) if overlay fell back to a read-only mount.
    """
    _check_lowers(lowers, minimum=1)
    _mount_overlay(target, lowers, (upper, work), attrs & ~libc.MOUNT_ATTR_RDONLY)
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        libc.umount2(target, libc.MNT_DETACH)
        raise OSError(errno.EROFS, f"overlay on {target} came out read-only: the mounter cannot "
                                   f"write {upper} or {work} (in a user namespace they must be "
                                   "owned by the mapped uid)")


def mount_readonly(target: str, lowers: Sequence[str], *, attrs: int = DEFAULT_ATTRS) -> None:
    """Mounts the merged, read-only view of `lowers` (lowest first) at `target` (child side)."""
    _check_lowers(lowers, minimum=1)
    attrs |= libc.MOUNT_ATTR_RDONLY
    if len(lowers) > 1:
        _mount_overlay(target, lowers, None, attrs)
        return
    tree_fd = _open_tree(lowers[0], attrs)
    try:
        _attach(tree_fd, target)
    finally:
        os.close(tree_fd)
