"""The engine's end of the preload library's handoff: guest RAM's uffd and fd over a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# Mirrors struct vmckpt_handoff in native/handoff.h.
_HANDOFF = struct.Struct("<8sIIQQQQIIQ256s")
_MAGIC = b"VMCKPT\x00\x01"
_VERSION = 2
_PEERCRED = struct.Struct("3i")
log = logging.getLogger("vmckpt")
SOCKET_ENV = "VMCKPT_SOCKET"
MIN_BYTES_ENV = "VMCKPT_MIN_BYTES"


class HandoffError(Exception):
    """A peer's handoff that the engine refuses."""


@dataclass
class GuestRam:
    """One region of guest RAM handed over by a VMM: the engine owns its fds from here on."""

    uffd: int
    ramfd: int
    addr: int
    length: int
    offset: int
    features: int
    pid: int
    page_size: int
    path: str
    async_uffd: int = -1  # unregistered, with UFFD_FEATURE_WP_ASYNC; -1 if the kernel lacks it

    def close(self) -> None:
        for fd in (self.uffd, self.ramfd, self.async_uffd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.uffd = self.ramfd = self.async_uffd = -1


def preload_path() -> Path:
    """The preload library built with the package."""
    path = Path(__file__).resolve().parent / "native" / "libvmckpt_preload.so"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall vmckpt (pip install .)")
    return path


def _parse(data: bytes, fds: list[int], peer_pid: int) -> GuestRam:
    if len(fds) not in (2, 3):
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"expected 2 or 3 file descriptors, got {len(fds)}")
    ram = GuestRam(fds[0], fds[1], 0, 0, 0, 0, peer_pid, 4096, "",
                   fds[2] if len(fds) == 3 else -1)
    if len(data) != _HANDOFF.size:
        ram.close()
        raise HandoffError(f"handoff of {len(data)} bytes, expected {_HANDOFF.size}")
    (magic, version, size, addr, length, offset, features, pid, page_size, _async_features,
     path) = _HANDOFF.unpack(data)
    if magic != _MAGIC or version != _VERSION or size != _HANDOFF.size:
        ram.close()
        raise HandoffError("handoff from a preload library of another vmckpt version")
    if pid != peer_pid:
        ram.close()
        raise HandoffError(f"handoff claims pid {pid} but comes from pid {peer_pid}")
    ram.addr, ram.length, ram.offset, ram.features, ram.page_size = (
        addr, length, offset, features, page_size,
    )
    ram.path = path.split(b"\0", 1)[0].decode(errors="replace")
    return ram


class HandoffListener:
    """Listens where VMCKPT_SOCKET points; accepts handoffs only from our own user (or root)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)  # the socket is born 0600: nobody else may hand us anything
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(8)

    async def accept(self) -> GuestRam:
        """Waits for the next handoff; refuses (and keeps waiting) foreign or malformed ones."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                pid, uid, _gid = _PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                )
                conn.setblocking(True)
                conn.settimeout(5)
                try:
                    data, fds, _flags, _addr = socket.recv_fds(conn, _HANDOFF.size, 3)
                    if uid not in (os.getuid(), 0):
                        for fd in fds:
                            os.close(fd)
                        raise HandoffError(f"handoff from uid {uid} refused")
                    ram = _parse(data, fds, pid)
                except (HandoffError, OSError) as e:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"n")
                    log.warning("refused a handoff from pid %d: %s", pid, e)
                    continue
                conn.sendall(b"k")
                return ram

    async def refuse_more(self, why: str) -> None:
        """Answers every further handoff with a refusal (the engine tracks one RAM region)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            with conn:
                conn.setblocking(True)
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    _data, fds, _f, _a = socket.recv_fds(conn, _HANDOFF.size, 3)
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b"n")
                log.warning("refused a second RAM region: %s", why)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
