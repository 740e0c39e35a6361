"""A client of one QEMU NBD export (libnbd through cffi): the extents a meta context names,
and their bytes. The calls release the GIL, so several connections read in parallel."""

from __future__ import annotations

import numpy as np
from vmckpt.engine._nbd import ffi, lib

BASE_ALLOCATION = "base:allocation"
STATE_ZERO = 2   # base:allocation: the extent reads as zeros
DIRTY = 1        # qemu:dirty-bitmap:NAME: the extent was written


class NbdError(Exception):
    pass


def _error(what: str) -> NbdError:
    why = lib.nbd_get_error()
    return NbdError(f"{what}: {ffi.string(why).decode() if why else 'unknown error'}")


def dirty_bitmap(name: str) -> str:
    return f"qemu:dirty-bitmap:{name}"


class NbdExport:
    def __init__(self, socket: str, export: str, context: str = BASE_ALLOCATION) -> None:
        self.context = context
        self._h = lib.nbd_create()
        if self._h == ffi.NULL:
            raise _error("libnbd")
        try:
            for ok, what in ((lambda: lib.nbd_set_export_name(self._h, export.encode()),
                              "export name"),
                             (lambda: lib.nbd_add_meta_context(self._h, context.encode()),
                              "meta context"),
                             (lambda: lib.nbd_connect_unix(self._h, socket.encode()),
                              f"connecting to NBD export {export} at {socket}")):
                if ok() == -1:
                    raise _error(what)
            if lib.nbd_can_meta_context(self._h, context.encode()) != 1:
                raise NbdError(f"NBD export {export} does not offer {context}")
            self.size = lib.nbd_get_size(self._h)
            if self.size < 0:
                raise _error(f"size of NBD export {export}")
        except BaseException:
            lib.nbd_close(self._h)
            raise

    def extents(self, mask: int, want: int) -> np.ndarray:
        """(offset, length) rows of the extents whose flags & mask == want, merged."""
        out = ffi.new("uint64_t **")
        n = lib.vk_extents(self._h, self.context.encode(), self.size, mask, want, out)
        if n < 0:
            raise _error("NBD block status")
        try:
            return np.frombuffer(ffi.buffer(out[0], n * 16), np.uint64).reshape(n, 2).copy()
        finally:
            lib.vk_free(out[0])

    def written(self) -> np.ndarray:
        """The extents that hold data: dirty ones under a dirty bitmap's context, else those
        not known to read as zeros."""
        if self.context == BASE_ALLOCATION:
            return self.extents(STATE_ZERO, 0)
        return self.extents(DIRTY, DIRTY)

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        if lib.nbd_pread(self._h, ffi.from_buffer(buf), buf.nbytes, offset, 0) == -1:
            raise _error(f"NBD read of {buf.nbytes} bytes at {offset}")

    def close(self) -> None:
        if self._h is not None:
            lib.nbd_shutdown(self._h, 0)
            lib.nbd_close(self._h)
            self._h = None

    def __enter__(self) -> NbdExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
