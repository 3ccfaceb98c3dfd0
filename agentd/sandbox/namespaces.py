"""Which namespaces a worker gets, and the parts of setting them up that need both sides.

Every worker gets new pid, mount, ipc, uts, net and cgroup namespaces; a user namespace when
the policy asks for one. All but the cgroup namespace are created by the clone() that makes
the worker, so it is pid 1 of its pid namespace from its first instruction. The cgroup
namespace is unshared only after the parent has moved the child into its task cgroup, so the
worker's view of /proc/self/cgroup is rooted at its own cgroup.
"""

from __future__ import annotations

from agentd.sandbox import libc
from agentd.sandbox.spec import WorkerSpec

_ALWAYS = (libc.CLONE_NEWPID | libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
           | libc.CLONE_NEWNET)


def clone_flags(spec: WorkerSpec) -> int:
    """The namespace flags of the clone() that creates the worker (parent side). A worker
    with egress gets no new network namespace: it joins its slot's (contain.py)."""
    flags = _ALWAYS & ~libc.CLONE_NEWNET if spec.nameserver else _ALWAYS
    return flags | (libc.CLONE_NEWUSER if spec.user_namespace else 0)


def from_parent(pid: int, spec: WorkerSpec) -> None:
    """Maps the worker's uid and gid in its user namespace (parent side, after clone).

    Only the worker's own unprivileged ids are mapped, each onto itself: root inside the
    namespace maps to nothing on the host, so even a full escape of the worker's uid lands on
    an unprivileged host uid.
    """
    if not spec.user_namespace:
        return
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"{spec.uid} {spec.uid} 1\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"{spec.gid} {spec.gid} 1\n")


def enter(spec: WorkerSpec) -> None:
    """Child side, once it is in its cgroup: its own cgroup namespace and hostname."""
    libc.unshare(libc.CLONE_NEWCGROUP)
    libc.sethostname(spec.hostname)
