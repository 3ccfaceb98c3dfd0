"""What a worker may map executable, computed from an effective policy (reads files only).

Landlock's execute right cannot confine exec alone: the ELF loader must stay executable (the
kernel opens it as every dynamic program's PT_INTERP), and the loader run as a program maps
its target with mmap, which Landlock does not check. So the worker's read-only host paths are
mounted noexec, and only the places computed here are bound executable over themselves:

    the granted programs (real host paths: /bin/sh is /usr/bin/dash here), one bind each;
    the granted trees ("/usr/bin/");
    the directories of the shared libraries they link against (DT_NEEDED, transitively,
        and the ELF interpreter), and the policy's `exec.libraries` (code loaded by dlopen).

A program outside these cannot be run by any route (execve, execveat, the loader, a copy, a
link): the kernel refuses PROT_EXEC maps and execs from a noexec mount. `withheld` programs
(approval triggers of an unapproved step) are left out, and bound noexec where a tree or a
library directory would otherwise cover them.

What stays reachable is what the library directories hold besides libraries: `reach` lists
the ELF executables there, for a reviewer (`agentctl policy check --reach`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from agentd.policy.effective import EffectivePolicy
from agentd.policy.paths import is_at_or_below

# Where the loader looks for a DT_NEEDED library without a path (Debian's ld.so.conf, x86-64
# and arm64 multiarch directories, then the defaults).
LIBRARY_PATH: tuple[str, ...] = (
    "/usr/local/lib", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib",
    "/usr/lib",
)
# At most this many libraries are followed for one policy (a guard against odd graphs).
MAX_LIBRARIES = 4096


@dataclass(frozen=True)
class ExecMounts:
    """Host paths (real, absolute) the worker gets executable, and those it must not."""

    executable: tuple[str, ...]
    """Files and directories bound executable over themselves, outermost first."""
    withheld: tuple[str, ...]
    """Granted programs withheld from this worker: bound noexec over themselves."""


@dataclass(frozen=True)
class ElfInfo:
    interpreter: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...]  # DT_RPATH / DT_RUNPATH with $ORIGIN expanded
    executable: bool  # ET_EXEC, or ET_DYN with an interpreter: runs as a program


def elf_info(path: str) -> ElfInfo | None:
    """The dynamic-linking facts of the ELF file at `path`, or None if it is not ELF."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            interpreter = None
            for segment in elf.iter_segments():
                if isinstance(segment, InterpSegment):
                    interpreter = str(segment.get_interp_name())
            needed: list[str] = []
            search: list[str] = []
            origin = os.path.dirname(os.path.realpath(path))
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    kind = tag.entry.d_tag
                    if kind == "DT_NEEDED":
                        needed.append(str(getattr(tag, "needed")))  # noqa: B009 (untyped)
                    elif kind in ("DT_RPATH", "DT_RUNPATH"):
                        text = str(getattr(tag, "rpath" if kind == "DT_RPATH" else "runpath"))
                        search += [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                                   for p in text.split(":") if p]
            etype = elf.header["e_type"]
            return ElfInfo(interpreter, tuple(needed), tuple(search),
                           etype == "ET_EXEC" or (etype == "ET_DYN" and interpreter is not None))
    except (OSError, ELFError, ValueError):
        return None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _visible(real: str, roots: Sequence[str]) -> bool:
    return any(is_at_or_below(real, root) for root in roots)


def _library_dirs(programs: Iterable[str]) -> set[str]:
    """Real directories holding the interpreters and shared libraries of `programs`."""
    dirs: set[str] = set()
    seen: set[str] = set()
    todo = list(programs)
    while todo and len(seen) < MAX_LIBRARIES:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        info = elf_info(path)
        if info is None:
            continue
        if info.interpreter:
            real = os.path.realpath(info.interpreter)
            if os.path.isfile(real):
                dirs.add(os.path.dirname(real))
                todo.append(real)
        for name in info.needed:
            candidates = [name] if "/" in name else [os.path.join(d, name) for d in
                                                      (*info.search, *LIBRARY_PATH)]
            for candidate in candidates:
                if os.path.isfile(candidate):
                    real = os.path.realpath(candidate)
                    dirs.add(os.path.dirname(real))
                    todo.append(real)
                    break
    return dirs


def _outermost(paths: Iterable[str]) -> list[str]:
    """`paths` without those inside another one, sorted."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(is_at_or_below(path, k) for k in kept):
            kept.append(path)
    return kept


@lru_cache(maxsize=64)
def exec_mounts(policy: EffectivePolicy, withheld: tuple[str, ...] = ()) -> ExecMounts:
    """The executable binds of a worker under `policy`, without the `withheld` programs.

    Cached per (effective policy, withheld): the daemon computes it once, not per spawn.
    Only paths the worker can see (below a read-only grant that is not itself a symlink) are
    returned; `withheld` are compared by real path, so /bin/rm and /usr/bin/rm are one.
    """
    roots = [r for r in policy.read_only if os.path.realpath(r) == r]
    held = {os.path.realpath(p) for p in withheld}
    held_inodes = {_inode(p) for p in held} - {None}
    files: set[str] = set()
    trees: set[str] = set()
    for entry in policy.exec_allow:
        real = os.path.realpath(entry)
        if not _visible(real, roots):
            continue
        if entry.endswith("/") and os.path.isdir(real):
            trees.add(real)
        elif (os.path.isfile(real) and not any(is_at_or_below(real, h) for h in held)
              and _inode(real) not in held_inodes):  # a hard link of a withheld program
            files.add(real)
    libraries = _library_dirs(sorted(files))
    if trees:
        libraries.update(os.path.realpath(d) for d in LIBRARY_PATH if os.path.isdir(d))
    libraries.update(os.path.realpath(d) for d in policy.exec_libraries
                     if os.path.isdir(d))
    dirs = _outermost(d for d in trees | libraries if _visible(d, roots))
    executable = dirs + sorted(f for f in files if not any(is_at_or_below(f, d) for d in dirs))
    shadowed = sorted(h for h in held if os.path.exists(h)
                      and any(is_at_or_below(h, d) for d in dirs))
    return ExecMounts(tuple(executable), tuple(shadowed))


def reach(policy: EffectivePolicy) -> dict[str, list[str]]:
    """Programs a worker could run beyond its grants: ELF executables in the library dirs.

    Keyed by the library directory; granted programs are not listed (they are reachable by
    right). A reviewer reads this to judge whether a library directory gives away too much.
    """
    mounts = exec_mounts(policy)
    granted = {os.path.realpath(e) for e in policy.exec_allow if not e.endswith("/")}
    trees = {os.path.realpath(e) for e in policy.exec_allow if e.endswith("/")}
    found: dict[str, list[str]] = {}
    for top in mounts.executable:
        if not os.path.isdir(top) or top in trees:
            continue
        programs: list[str] = []
        for directory, subdirs, names in os.walk(top):
            subdirs.sort()
            for name in sorted(names):
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or path in granted:
                    continue
                info = elf_info(path)
                if info is not None and info.executable:
                    programs.append(path)
        found[top] = programs
    return found
