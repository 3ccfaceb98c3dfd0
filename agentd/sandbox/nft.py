"""nftables from Python: libnftables through ctypes, in the calling thread's namespace.

Why the library and not `nft -f -`: the resolver adds a set element per DNS answer, on the
path of a worker's connection; a process per answer costs milliseconds and a fork from the
threaded daemon. libnftables takes the same text commands, in-process, in microseconds, and
talks netlink in the namespace of the thread that creates the context (agentd/sandbox/netns.py).
It is the library the `nft` tool (Debian's `nftables` package) is built on; python3-nftables is
a thin wrapper over the same calls, not installable into a virtualenv.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

_LIB_NAMES = ("libnftables.so.1", ctypes.util.find_library("nftables") or "libnftables.so")
NFT_CTX_DEFAULT = 0


def _load() -> ctypes.CDLL:
    for name in _LIB_NAMES:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    raise OSError(errno.ENOENT, "libnftables.so.1 not found; install the nftables package")


class Nft:
    """One libnftables context; create and use it on one thread (its namespace's)."""

    def __init__(self) -> None:
        self._lib = _load()
        self._ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> str:
        """Runs `commands` (nft syntax, one transaction); their output, or OSError with
        nft's message."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise OSError(errno.EINVAL, f"nft: {error.strip() or 'failed'}")
        return output

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
