"""The worker's filesystem: a new root on a tmpfs, holding only what the policy grants.

Runs in the child, inside its new mount namespace, before privileges are dropped. The root
is built the way bubblewrap builds one: a tmpfs, read-only recursive binds of the granted host
paths (host symlinks such as merged-/usr's /bin -> usr/bin are recreated as symlinks), the
run's workspace at /workspace and a size-capped /tmp (both noexec unless the policy allows
executing there: otherwise ld.so would run any ELF a tool writes), a fresh /proc with the
kernel knobs made read-only or masked as Docker does, and a minimal /dev with its own devpts.
Read-only grants are noexec; the granted programs and the directories of their libraries are
bound executable over themselves, so that nothing else can be executed or mapped executable.
Then pivot_root and the old root is detached, so no host path outside the grants stays
reachable.

Read-only is applied with mount_setattr(AT_RECURSIVE) rather than a bind remount, because a
remount only changes the top mount and would leave submounts of a granted tree writable.
"""

from __future__ import annotations

import os

from agentd.sandbox import libc, overlay
from agentd.sandbox.spec import WorkerSpec

# Devices a worker gets, bound from the host's nodes (a worker has no CAP_MKNOD).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
CA_BUNDLE_PATH = "/etc/ssl/certs/ca-certificates.crt"
"""Where a worker's TLS clients find their trust store (Debian's path)."""

# Kernel interfaces under /proc that stay visible but read-only, and those hidden outright.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "kallsyms", "kmsg",
               "config.gz", "latency_stats")

_NOSUID_NODEV = libc.MS_NOSUID | libc.MS_NODEV
_NOSUID_NODEV_ATTR = libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV
_READ_ONLY = libc.MOUNT_ATTR_RDONLY | _NOSUID_NODEV_ATTR
_READ_ONLY_NOEXEC = _READ_ONLY | libc.MOUNT_ATTR_NOEXEC


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind(source: str, target: str, attrs: int) -> None:
    """Binds `source` at `target` (a file or a directory) with mount attributes `attrs`."""
    if os.path.isdir(source):
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        if not os.path.exists(target):
            with open(target, "w"):
                pass
    libc.mount(source, target, None, libc.MS_BIND | libc.MS_REC)
    libc.mount_setattr_recursive(target, attrs)


def _grant(host_path: str, root: str) -> None:
    """Makes `host_path` appear read-only inside `root`; a host symlink stays a symlink."""
    target = root + host_path
    if os.path.islink(host_path):
        _mkdirs(os.path.dirname(target))
        if not os.path.lexists(target):
            os.symlink(os.readlink(host_path), target)
        return
    if not os.path.exists(host_path):
        return  # a granted path the host lacks grants nothing
    _bind(host_path, target, _READ_ONLY_NOEXEC)


def _bind_over(path: str, root: str, attrs: int) -> None:
    """Binds host `path` (a real path, already visible in `root`) over itself with `attrs`."""
    if os.path.lexists(root + path):
        _bind(path, root + path, attrs)


def _executable_under(directory: str, spec: WorkerSpec) -> bool:
    """Whether the policy lets the worker execute files it can write (under `directory`)."""
    return any(p == directory or p.startswith(directory + "/") for p in spec.exec_allow)


def _build_proc(root: str, *, memfd_noexec: bool) -> None:
    proc = root + "/proc"
    _mkdirs(proc)
    libc.mount("proc", proc, "proc", _NOSUID_NODEV | libc.MS_NOEXEC)
    if memfd_noexec and os.path.exists(f"{proc}/sys/vm/memfd_noexec"):
        # Landlock cannot see memfds (an internal mount): forbid executing them in this pid
        # namespace. Only real root can set it; a user-namespace worker goes without.
        with open(f"{proc}/sys/vm/memfd_noexec", "w") as f:
            f.write("2")
    for name in PROC_READ_ONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
            libc.mount_setattr_recursive(path, _READ_ONLY)
    for name in PROC_MASKED:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            libc.mount("tmpfs", path, "tmpfs", libc.MS_RDONLY | _NOSUID_NODEV, "size=0")
        elif os.path.exists(path):
            libc.mount("/dev/null", path, None, libc.MS_BIND)


def _build_dev(root: str) -> None:
    dev = root + "/dev"
    _mkdirs(dev)
    libc.mount("tmpfs", dev, "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "mode=0755,size=64k")
    for name in DEVICES:
        _bind(f"/dev/{name}", f"{dev}/{name}", libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NOEXEC)
    _mkdirs(dev + "/pts")
    libc.mount("devpts", dev + "/pts", "devpts", libc.MS_NOSUID | libc.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", dev + "/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    _mkdirs(dev + "/shm")
    libc.mount("tmpfs", dev + "/shm", "tmpfs", _NOSUID_NODEV | libc.MS_NOEXEC,
               "mode=1777,size=1m")


def _write_etc(root: str, spec: WorkerSpec) -> None:
    """Identity files a worker's tools expect, unless the policy granted the host's own."""
    etc = root + "/etc"
    _mkdirs(etc)
    files = {
        "passwd": f"root:x:0:0::/:/sbin/nologin\nagent:x:{spec.uid}:{spec.gid}::/workspace:"
                  "/bin/sh\n",
        "group": f"root:x:0:\nagent:x:{spec.gid}:\n",
        "hostname": spec.hostname + "\n",
        "hosts": f"127.0.0.1 localhost {spec.hostname}\n::1 localhost\n",
    }
    if spec.nameserver:  # egress: names resolve only through the daemon's resolver
        files["resolv.conf"] = f"nameserver {spec.nameserver}\noptions attempts:1\n"
        files["nsswitch.conf"] = "hosts: files dns\n"
    for name, text in files.items():
        if not os.path.lexists(f"{etc}/{name}"):
            with open(f"{etc}/{name}", "w") as f:
                f.write(text)


def workspace_attrs(spec: WorkerSpec) -> int:
    """The workspace mount's attributes: noexec unless the policy lets /workspace execute."""
    return _NOSUID_NODEV_ATTR | (0 if _executable_under("/workspace", spec)
                                 else libc.MOUNT_ATTR_NOEXEC)


def open_workspace(spec: WorkerSpec) -> int | None:
    """The spec's /workspace as a detached mount fd, built by the daemon for a prebuilt worker
    (agentd/sandbox/pool.py), which attaches it with `attach_workspace`; None if the spec has
    no workspace. The caller closes the fd."""
    if not (spec.workspace_layers and spec.workspace_upper and spec.workspace_work):
        return None
    if spec.workspace_writable:
        return overlay.open_workspace(spec.workspace_layers, spec.workspace_upper,
                                      spec.workspace_work, attrs=workspace_attrs(spec))
    return overlay.open_readonly(spec.workspace_layers, attrs=workspace_attrs(spec))


def attach_workspace(mount_fd: int) -> None:
    """Attaches the workspace a prebuilt worker was handed (child side, after pivot_root)."""
    overlay.attach(mount_fd, "/workspace")


def enter(spec: WorkerSpec, new_root: str, *, workspace: bool = True) -> None:
    """Builds the worker's root at `new_root` and pivots into it (child side, still privileged).

    Without `workspace` (a prebuilt worker), /workspace stays an empty directory for the
    workspace mount handed over at call time."""
    # Nothing we mount may propagate back to the host.
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount("tmpfs", new_root, "tmpfs", _NOSUID_NODEV, "mode=0755,size=1m")
    for path in spec.read_only:
        _grant(path, new_root)
    # Read-only grants are noexec; only the granted programs and their library directories
    # are executable, so the loader cannot map anything else (agentd/policy/execset.py).
    for path in spec.exec_binds:
        _bind_over(path, new_root, _READ_ONLY)
    for path in spec.exec_withheld:
        _bind_over(path, new_root, _READ_ONLY_NOEXEC)
    _mkdirs(new_root + "/workspace")
    if workspace and spec.workspace_layers and spec.workspace_upper and spec.workspace_work:
        if spec.workspace_writable:
            overlay.mount_workspace(new_root + "/workspace", spec.workspace_layers,
                                    spec.workspace_upper, spec.workspace_work,
                                    attrs=workspace_attrs(spec))
        else:
            overlay.mount_readonly(new_root + "/workspace", spec.workspace_layers,
                                   attrs=workspace_attrs(spec))
    _mkdirs(new_root + "/tmp")
    libc.mount("tmpfs", new_root + "/tmp", "tmpfs",
               _NOSUID_NODEV | (0 if _executable_under("/tmp", spec) else libc.MS_NOEXEC),
               f"mode=1777,size={spec.limits.tmp_bytes}")
    _build_proc(new_root, memfd_noexec=not spec.user_namespace)
    _build_dev(new_root)
    _write_etc(new_root, spec)
    if spec.ca_bundle:  # egress with secrets: the run's CA is trusted here, and only here
        _bind(spec.ca_bundle, new_root + CA_BUNDLE_PATH, _READ_ONLY_NOEXEC)

    # pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops it,
    # with every host mount under it, without needing a directory for it in the new root.
    os.chdir(new_root)
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
    # The root tmpfs itself is read-only: writes go to /workspace and /tmp only.
    libc.mount(None, "/", None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | _NOSUID_NODEV)
