"""A checkpoint's workspace as a tarball: the merged view of its layers, streamed.

Fed by `agentd.store.layers.walk_merged`, so no mount is needed and nothing of overlay's
format (whiteouts, opaque markers) reaches the archive. PAX format (long names, large ids);
numeric owners only (uname/gname empty: the host's user database means nothing inside a
workspace); mtimes in whole seconds; the root directory is the member "." so its mode and
owner travel too. Files that are hard links of one another in the view become tar hard
links. Sockets are skipped (tar cannot hold them); xattrs are not exported.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from agentd.store.layers import MergedEntry


def _info(entry: MergedEntry) -> tarfile.TarInfo | None:
    st = entry.stat
    info = tarfile.TarInfo(entry.rel or ".")
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.source)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return info


def write_tar(entries: Iterable[MergedEntry], fileobj: BinaryIO) -> None:
    """Writes `entries` (parents before children) to `fileobj` as a streamed PAX tarball."""
    linked: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = _info(entry)
            if info is None:
                continue
            st = entry.stat
            if info.type != tarfile.REGTYPE:
                tar.addfile(info)
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in linked:
                info.type, info.size, info.linkname = tarfile.LNKTYPE, 0, linked[key]
                tar.addfile(info)
                continue
            if st.st_nlink > 1:
                linked[key] = info.name
            with open(entry.source, "rb") as data:
                tar.addfile(info, data)
