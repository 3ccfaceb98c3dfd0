"""The whole confinement of a worker, as one ordered list of setup actions (child side).

Runs in the child of the launcher's clone(), which already put it in new pid, mount, ipc, uts
and net namespaces (and a user namespace when asked). The order matters and is the point of
this module:

    die with the launcher; join our cgroup (unless born in it, or in a user namespace: then
        the launcher moves us); stdio; new session
    new root (mounts), pivot_root; loopback up
    wait for the parent (with a user namespace it maps our ids, and we wait for that
        first, since unmapped ids cannot create files)
    rlimits, cwd; cgroup namespace, hostname
    # from here on, not root
    drop privileges (no_new_privs, every capability, unprivileged uid/gid), and re-arm the
        death signal the uid change cleared
    Landlock
    the exec-watch filter (its listener fd to the launcher over the error socket)
    # seccomp must be last: it forbids what the actions above needed
    seccomp, execve

A prebuilt worker (`prebuilt`, the warm pool: agentd/sandbox/pool.py) runs the same list in
two halves: up to and including the cgroup join before any call (the root without /workspace),
then, when a call takes it, the workspace mount it is handed and the rest from rlimits on
(`_confine_and_exec`, shared with `contain`).

Any failure is written to the error socket as {"action", "errno", "message"} and the child exits
127; a successful execve closes the pipe (O_CLOEXEC), which the launcher reads as "started".
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import json
import os
import select
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from agentd.sandbox import (
    execwatch,
    landlock,
    libc,
    mounts,
    namespaces,
    netns,
    network,
    privileges,
    seccomp,
)
from agentd.sandbox.spec import WorkerSpec, shape_of

# Devices a tool may open for writing and ioctls (terminals) beside /workspace and /tmp.
LANDLOCK_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                    "/dev/tty", "/dev/pts", "/dev/ptmx")


# Where the fds the child must keep are parked while stdio and extras are put in place.
_HIGH_FD = 512
# A prebuilt worker's one call: the spec (JSON) and its fds (stdio, extras, the workspace).
_MAX_CALL = 1 << 20
_MAX_CALL_FDS = 16

# The dynamic loaders of the architectures agentd runs on, where the root has them.
ELF_LOADERS = ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1")


class _Action:
    name = "start"


@contextmanager
def _action(current: type[_Action], name: str) -> Iterator[None]:
    current.name = name
    yield


def _executables(spec: WorkerSpec) -> list[str]:
    """What Landlock lets the worker execute: the policy's list and the ELF interpreters.

    The kernel opens a binary's ELF interpreter (ld.so) with exec permission, so every
    dynamic binary needs it. Allowing ld.so lets a tool run ld.so as a program, but it can
    only map files on executable mounts (mounts.py, agentd/policy/execset.py): the mounts
    decide what can run at all, Landlock is the second wall on execve.
    """
    allowed = [p for p in spec.exec_allow if os.path.exists(p)]
    candidates = [spec.argv[0], *(p for p in allowed if not p.endswith("/"))]
    interpreters = {landlock.interpreter_of(p) for p in candidates if os.path.isfile(p)}
    interpreters.update(p for p in ELF_LOADERS if os.path.exists(p))
    allowed += sorted(p for p in interpreters if p and p not in allowed)
    return allowed


def _close_all_but(*keep: int) -> None:
    """Closes every fd above stderr except `keep`."""
    low = 3
    for fd in sorted({k for k in keep if k >= 3}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _check_launcher_alive(err_fd: int) -> None:
    """The launcher holds the read end of the error pipe: POLLERR on ours means it is gone."""
    poller = select.poll()
    poller.register(err_fd, select.POLLOUT)
    for _, events in poller.poll(0):
        if events & (select.POLLERR | select.POLLHUP):
            raise OSError(errno_mod.ECHILD, "the launcher died while the worker was starting")


def _wait_for_parent(go_fd: int) -> None:
    # EOF instead of the byte means the launcher died before releasing us.
    if os.read(go_fd, 1) != b"g":
        raise OSError(errno_mod.ECHILD, "the launcher went away before the worker started")
    os.close(go_fd)


def _park(*fds: int) -> list[int]:
    """Moves the fds the set-up needs out of the way (above _HIGH_FD, close-on-exec), so that
    placing the tool's fds at 0, 1, 2, 3, ... clobbers none of them."""
    return [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for fd in fds]


def _place_stdio(fds: tuple[int, ...] | list[int], keep: tuple[int, ...]) -> None:
    """The tool's stdin, stdout, stderr and extras at 0, 1, 2, 3, ...; nothing else of the
    launcher (its socket, other workers' pipes) may reach the tool."""
    moved = _park(*fds)
    for target, fd in enumerate(moved):
        os.dup2(fd, target, inheritable=True)
    _close_all_but(*range(len(moved)), *keep)


def _new_session() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive execve.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # A new session: no controlling terminal, so no TIOCSTI into the operator's shell.
    os.setsid()


def _report_and_exit(action: type[_Action], exc: BaseException, spec: WorkerSpec | None,
                     err_fd: int) -> NoReturn:
    err = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if action.name == "execve" and spec is not None:
        detail = f"{spec.argv[0]}: {detail}"
    elif action.name == "chdir" and spec is not None:
        detail = (f"cwd {spec.cwd}: {detail} in the worker; create the directory in an "
                  "earlier step, or give an existing one")
    report = {"action": action.name, "errno": err, "message": detail}
    try:
        os.write(err_fd, json.dumps(report).encode())
    finally:
        os._exit(127)


def contain(spec: WorkerSpec, *, new_root: str, seccomp_program: bytes, go_fd: int,
            err_fd: int, fds: tuple[int, ...], join: tuple[str, ...] = (),
            netns_fd: int = -1) -> NoReturn:
    """Confines the calling (freshly cloned) process and execs the tool; never returns.
    `join`: its cgroup's cgroup.procs files, written first (else the launcher moves it).
    `netns_fd`: the egress slot to join (agentd/sandbox/egress.py) instead of a new one."""
    action = _Action
    try:
        with _action(action, "pdeathsig"):
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        with _action(action, "egress namespace"):
            _join_egress(spec, netns_fd)
        if join:
            with _action(action, "join cgroup"):
                _join(join)
        if spec.user_namespace:
            with _action(action, "wait for parent"):
                _wait_for_parent(go_fd)
            with _action(action, "filesystem ids"):
                # Only the worker's ids are mapped; files of the new root are created as them.
                libc.set_filesystem_ids(spec.uid, spec.gid)
        with _action(action, "stdio"):
            if spec.user_namespace:
                (err_fd,) = _park(err_fd)
            else:
                err_fd, go_fd = _park(err_fd, go_fd)
            _place_stdio(fds, keep=(err_fd, go_fd))
            _new_session()
        with _action(action, "mounts"):
            mounts.enter(spec, new_root)
        with _action(action, "network"):
            network.enter()
        if not spec.user_namespace:
            # The launcher's "go" (it may still be writing our cgroup.procs if it was not
            # ours to write); nothing of the tool runs before we are in the cgroup.
            with _action(action, "wait for parent"):
                _wait_for_parent(go_fd)
        _confine_and_exec(spec, action, err_fd, seccomp_program)
    except BaseException as exc:
        _report_and_exit(action, exc, spec, err_fd)


def prebuilt(shape: WorkerSpec, *, new_root: str, seccomp_program: bytes, go_fd: int,
             err_fd: int, ctl_fd: int, join: tuple[str, ...]) -> NoReturn:
    """A warm-pool worker (agentd/sandbox/pool.py): builds everything of `shape` that does not
    depend on the call (root, loopback, cgroup), says "r" on `ctl_fd` and waits there for its
    one call: the full spec, the tool's fds and, if the spec has a workspace, a detached
    workspace mount last. Then the same confinement as `contain`. EOF instead of a call (the
    pool is drained) exits quietly. Never takes a user namespace (the pool does not offer it).
    It joins its cgroup (`join`) itself: on cgroup v1 a cgroup.procs write can wait for an RCU
    grace period, which would stall the launcher's loop and every spawn behind it.
    """
    action = _Action
    spec: WorkerSpec | None = None
    try:
        with _action(action, "pdeathsig"):
            libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        with _action(action, "stdio"):
            err_fd, go_fd, ctl_fd = _park(err_fd, go_fd, ctl_fd)
            _close_all_but(err_fd, go_fd, ctl_fd)
            _new_session()
        with _action(action, "join cgroup"):
            _join(join)
        with _action(action, "mounts"):
            mounts.enter(shape, new_root, workspace=False)
        with _action(action, "network"):
            network.enter()
        with _action(action, "wait for parent"):
            _wait_for_parent(go_fd)
        with _action(action, "wait for call"):
            os.write(ctl_fd, b"r")
            call = _receive_call(ctl_fd, shape)
            if call is None:
                os._exit(0)
            spec, fds, mount_fd = call
        with _action(action, "stdio"):
            _place_stdio(fds, keep=(err_fd, mount_fd))
        if mount_fd >= 0:
            with _action(action, "mounts"):
                mounts.attach_workspace(mount_fd)
                os.close(mount_fd)
        _confine_and_exec(spec, action, err_fd, seccomp_program)
    except BaseException as exc:
        _report_and_exit(action, exc, spec, err_fd)


def _join_egress(spec: WorkerSpec, netns_fd: int) -> None:
    """Joins the egress slot's namespace; a spec with egress and no slot is refused rather
    than run in an empty namespace it was not built for."""
    if netns_fd >= 0:
        netns.enter(netns_fd)
    elif spec.nameserver:
        raise OSError(errno_mod.EINVAL, "an egress worker came without its namespace")


def _join(paths: tuple[str, ...]) -> None:
    """Moves this process into its cgroup: "0" in each hierarchy's cgroup.procs."""
    for path in paths:
        with open(path, "w") as f:
            f.write("0")


def _receive_call(ctl_fd: int, shape: WorkerSpec
                  ) -> tuple[WorkerSpec, list[int], int] | None:
    """A prebuilt worker's call: its spec, the tool's fds, the workspace mount fd (or -1);
    None at EOF. A spec of another shape is refused: this worker was not built for it."""
    ctl = socket.socket(fileno=ctl_fd)
    try:
        data, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_CALL, _MAX_CALL_FDS,
                                                   socket.MSG_CMSG_CLOEXEC)
    finally:
        ctl.close()
    if not data:
        return None
    message = json.loads(data)
    spec = WorkerSpec.from_json(message["spec"])
    if shape_of(spec) != shape_of(shape):
        raise OSError(errno_mod.EINVAL, "the call's spec is not of this worker's shape")
    mount_fd = fds.pop() if message.get("workspace") else -1
    return spec, fds, mount_fd


def _confine_and_exec(spec: WorkerSpec, action: type[_Action], err_fd: int,
                      seccomp_program: bytes) -> NoReturn:
    """From the worker's root and cgroup to the tool: the part of set-up that takes the
    call's limits and drops every privilege; seccomp last."""
    with _action(action, "rlimits"):
        privileges.set_rlimits(core=0, nofile=spec.limits.open_files,
                               fsize=spec.limits.file_size_bytes)
    with _action(action, "chdir"):
        os.chdir(spec.cwd)
    with _action(action, "namespaces"):
        namespaces.enter(spec)
    executables = _executables(spec)
    # from here on, not root
    with _action(action, "drop privileges"):
        privileges.drop(spec.uid, spec.gid)
    with _action(action, "pdeathsig again"):
        # Changing uid/gid cleared the death signal; re-arm it, then make sure the
        # launcher did not die in between (getppid() is 0 for a pid namespace's pid 1).
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _check_launcher_alive(err_fd)
    if spec.landlock:
        with _action(action, "landlock"):
            has_workspace = bool(spec.workspace_layers)
            write = ["/tmp"] + (["/workspace"] if has_workspace and spec.workspace_writable
                                else [])
            landlock.enter(read=["/"], write=write, execute=executables,
                           devices=LANDLOCK_DEVICES, connect=spec.egress_ports)
    if spec.seccomp:
        with _action(action, "exec watch"):
            # Denied execs on record (agentd/sandbox/execwatch.py), and an egress worker's
            # network calls its own kernel would refuse (agentd/sandbox/netwatch.py): the
            # listener goes out over the error socket; the launcher answers from now on.
            listener = execwatch.install(network=bool(spec.nameserver))
            socket.send_fds(socket.socket(fileno=os.dup(err_fd)), [b"w"], [listener])
            os.close(listener)
    # seccomp must be last: it forbids what the actions above needed
    if spec.seccomp:
        with _action(action, "seccomp"):
            seccomp.enter(seccomp_program)
    with _action(action, "execve"):
        os.execve(spec.argv[0], list(spec.argv), spec.env)
    os._exit(127)  # unreachable: execve either replaced us or raised
