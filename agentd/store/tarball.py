"""A checkpoint's workspace as a tarball: the merged view of its layers, streamed.

Fed by `agentd.store.layers.walk_merged`, so no mount is needed and nothing of overlay's
format (whiteouts, opaque markers) reaches the archive. PAX format (long names, large ids);
numeric owners only (uname/gname empty: the host's user database means nothing inside a
workspace); mtimes in whole seconds; the root directory is the member "." so its mode and
owner travel too. Files that are hard links of one another in the view become tar hard
links. Sockets are skipped (tar cannot hold them); xattrs are not exported.

Sparse files stay sparse: a file whose data (SEEK_DATA/SEEK_HOLE) is smaller than its size is
written in the PAX 1.0 sparse format (GNU tar's `--sparse-version=1.0`: the map of data
segments at the start of the member's data, then only the segments; `GNU.sparse.*` PAX
records carry the real name and size). GNU tar, bsdtar and Python's tarfile recreate the
holes on extraction; a tool that knows no sparse format extracts a file named
`GNUSparseFile.0/NAME` holding the map and the data, never a wrong file under the real name.
The alternative, GNU's old sparse headers, limits the map to what extension headers hold and
is not PAX. Without this, a 108 KiB layer holding a 4 GiB sparse file exported as 4 GiB.

`max_bytes` caps the archive (what the caller receives): past it the export stops with
RESOURCE_EXHAUSTED, and the caller must discard what it received (agentctl does).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO, cast

from agentd.errors import ResourceExhausted

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


def write_tar(entries: Iterable[MergedEntry], fileobj: BinaryIO, *,
              max_bytes: int | None = None) -> None:
    """Writes `entries` (parents before children) to `fileobj` as a streamed PAX tarball;
    raises ResourceExhausted once the archive would pass `max_bytes`."""
    linked: dict[tuple[int, int], str] = {}
    out = cast(BinaryIO, _Capped(fileobj, max_bytes))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
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
            fd = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                segments = data_segments(fd, st.st_size)
                if sum(length for _, length in segments) < st.st_size:
                    _as_sparse(info, segments)
                    tar.addfile(info, _SparseReader(fd, segments))
                else:
                    os.lseek(fd, 0, os.SEEK_SET)  # data_segments moved the shared offset
                    with os.fdopen(os.dup(fd), "rb") as data:
                        tar.addfile(info, data)
            finally:
                os.close(fd)


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of `fd` that hold data, by SEEK_DATA/SEEK_HOLE; a file
    system without them reports one run, the whole file (correct, only not sparse)."""
    segments: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                break
            if exc.errno == errno.EINVAL and not segments:
                return [(0, size)]
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end - start))
        offset = end
    return segments


def _as_sparse(info: tarfile.TarInfo, segments: list[tuple[int, int]]) -> None:
    """Turns a regular member into a PAX 1.0 sparse one; its data is then the map and the
    segments. A file that ends in a hole gets a last empty segment at its end, as GNU tar
    writes it, so the extracted file has the full size."""
    realsize = info.size
    if not segments or sum(segments[-1]) < realsize:
        segments.append((realsize, 0))
    head, _, tail = info.name.rpartition("/")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": info.name, "GNU.sparse.realsize": str(realsize)}
    info.name = f"{head}/GNUSparseFile.0/{tail}" if head else f"GNUSparseFile.0/{tail}"
    info.size = len(_map_block(segments)) + sum(length for _, length in segments)


class _SparseReader:
    """A file object over a sparse member's data: the map block, then each data segment,
    read from the file as tarfile asks for it (no buffering beyond its request)."""

    def __init__(self, fd: int, segments: list[tuple[int, int]]) -> None:
        self._fd = fd
        self._header = _map_block(segments)
        self._segments = [(offset, length) for offset, length in segments if length]
        self._index = 0  # the segment being read
        self._done = 0  # bytes of it already read

    def read(self, size: int = -1) -> bytes:
        """Exactly `size` bytes until the end (tarfile takes a short read for truncation)."""
        if size < 0:
            raise ValueError("read the member in chunks")  # tarfile always passes a size
        parts = []
        while size > 0:
            part = self._read_some(size)
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def _read_some(self, size: int) -> bytes:
        if self._header:
            data, self._header = self._header[:size], self._header[size:]
            return data
        if self._index == len(self._segments):
            return b""
        offset, length = self._segments[self._index]
        data = os.pread(self._fd, min(size, length - self._done), offset + self._done)
        if not data:
            raise OSError(errno.EIO, "a file of an immutable layer shrank during export")
        self._done += len(data)
        if self._done == length:
            self._index, self._done = self._index + 1, 0
        return data


def _map_block(segments: list[tuple[int, int]]) -> bytes:
    lines = [str(len(segments))]
    for offset, length in segments:
        lines += [str(offset), str(length)]
    header = ("\n".join(lines) + "\n").encode()
    return header + b"\0" * (-len(header) % tarfile.BLOCKSIZE)


class _Capped:
    """Passes writes through until `limit` bytes; then raises ResourceExhausted once and
    drops the rest (tarfile's close still writes its end blocks)."""

    def __init__(self, fileobj: BinaryIO, limit: int | None) -> None:
        self._fileobj = fileobj
        self._limit = limit
        self._written = 0
        self._over = False

    def write(self, data: bytes) -> int:
        if self._over:
            return len(data)
        self._written += len(data)
        if self._limit is not None and self._written > self._limit:
            self._over = True
            raise ResourceExhausted(
                f"the export is larger than the {self._limit} bytes allowed (max_export_bytes"
                " in the daemon config); export a smaller checkpoint or raise the limit")
        return self._fileobj.write(data)

    def flush(self) -> None:
        self._fileobj.flush()
