"""Host and worker paths in policies: validation, normal form, and containment.

Policy decisions compare paths as strings, never by looking at the filesystem: the policy
layer does no I/O, and a decision must not change because a symlink appeared on the host.
That only works if every path has one spelling, so paths are checked (absolute, no `..`, no
NUL or other control characters) and normalised when the file is loaded. A `..` is refused
rather than resolved because `/usr/../etc` in a reviewed file is a trick or a mistake, and
either way a reviewer should see the real path.

Exec allow entries are files (`/usr/bin/python3`) or trees (`/usr/lib/git-core/`): the
trailing slash is the only thing that makes an entry a tree, so it is kept.
"""

from __future__ import annotations

import os.path
from collections.abc import Iterable
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, WithJsonSchema

PATH_MAX: Final = 4095


def normalise_path(value: Any) -> str:
    """Return `value` as a normalised absolute path without a trailing slash."""
    text = _check(value)
    return _normal(text)


def normalise_exec_entry(value: Any) -> str:
    """Return `value` as a normalised absolute path; a trailing "/" (a whole tree) is kept."""
    text = _check(value)
    normal = _normal(text)
    if text.endswith("/") and normal != "/":
        return normal + "/"
    return normal


def is_at_or_below(path: str, root: str) -> bool:
    """True when `path` is `root` or inside it (both normalised, without trailing slash)."""
    if root == "/":
        return True
    return path == root or path.startswith(root + "/")


def exec_entry_covers(entry: str, target: str) -> bool:
    """True when exec allow `entry` allows everything `target` (a file or a tree) allows.

    A file entry covers only itself; a tree entry covers every file and tree below it.
    """
    if entry.endswith("/"):
        return target.startswith(entry)
    return target == entry


def matching_exec_entry(entries: Iterable[str], executable: str) -> str | None:
    """Return the first exec allow entry that allows `executable`, or None."""
    for entry in entries:
        if exec_entry_covers(entry, executable):
            return entry
    return None


def check_worker_path(value: str, what: str) -> str | None:
    """Return why `value` is not an absolute normalised path, or None when it is one."""
    if not value:
        return f"{what} is empty; give an absolute path"
    if "\0" in value:
        return f"{what} contains a NUL byte"
    if not value.startswith("/"):
        return f"{what} {value!r} is not absolute; give a path starting with /"
    if _normal(value) != value:
        return f"{what} {value!r} is not normalised; write {_normal(value)!r}"
    return None


def _check(value: Any) -> str:
    if not isinstance(value, str):
        message = f"{value!r} is not a path; write an absolute path such as /usr/bin"
        raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    if not value:
        raise ValueError("empty path; write an absolute path such as /usr/bin")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{value!r} contains a NUL or control character; remove it")
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not absolute; write the full path starting with /")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} contains '..'; write the path it leads to instead")
    if len(value) > PATH_MAX:
        raise ValueError(f"path is longer than {PATH_MAX} bytes")
    return value


def _normal(text: str) -> str:
    # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux treats it as "/".
    return "/" + os.path.normpath(text).lstrip("/")


_PATH_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "pattern": "^/",
    "maxLength": PATH_MAX,
    "description": "An absolute path without '..'.",
}

HostPath = Annotated[
    str,
    BeforeValidator(normalise_path),
    WithJsonSchema(_PATH_SCHEMA),
]
"""An absolute, normalised path (no trailing slash)."""

ExecEntry = Annotated[
    str,
    BeforeValidator(normalise_exec_entry),
    WithJsonSchema(
        {
            **_PATH_SCHEMA,
            "description": "An absolute path of an executable, or a directory ending in '/'"
            " to allow every executable below it.",
        }
    ),
]
"""An exec allow entry: an absolute file path, or a tree ending in "/"."""
