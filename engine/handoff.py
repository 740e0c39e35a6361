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

from vmckpt.engine.peers import bind_private, peer_credentials, refusal

# Mirrors struct vmckpt_handoff in native/handoff.h.
_HANDOFF = struct.Struct("<8sIIQQQQIIQ256s")
_MAGIC = b"VMCKPT\x00\x01"
_VERSION = 2
HANDOFF_TIMEOUT = 5.0  # seconds a connection has to send its handoff before it is dropped
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
    """Listens where VMCKPT_SOCKET points; takes handoffs only from our own user (or root).

    Every connection is served on its own, on the event loop with non-blocking sockets, so a
    peer that connects and sends nothing holds only its own connection (dropped after
    timeout), never the checkpoint cycle nor another handoff."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.path = Path(path)
        self.timeout = HANDOFF_TIMEOUT if timeout is None else timeout
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        bind_private(self._sock, str(self.path))  # 0600: nobody else may hand us anything
        self._sock.listen(16)
        self._taken: asyncio.Queue[GuestRam] = asyncio.Queue()
        self._refusing: str | None = None  # set: every further handoff is refused, saying why
        self._server: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def _serve(self) -> None:
        if self._server is None:
            self._server = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = asyncio.ensure_future(self._handle(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            pid, uid = peer_credentials(conn)
            try:
                try:
                    data, fds = await asyncio.wait_for(_receive(conn), self.timeout)
                except TimeoutError:
                    raise HandoffError(f"sent no handoff within {self.timeout:g} s") from None
                # Refused only once read, so that the peer hears why (closed at once: an
                # unread message would make its send fail instead).
                if why := refusal(uid) or self._refusing:
                    for fd in fds:
                        os.close(fd)
                    raise HandoffError(why)
                ram = _parse(data, fds, pid)
            except (HandoffError, OSError) as e:
                with contextlib.suppress(OSError):
                    conn.send(b"n")
                log.warning("refused a handoff from pid %d: %s", pid, e)
                return
            try:
                conn.send(b"k")  # one byte into an empty socket buffer: never blocks
            except OSError as e:
                ram.close()
                log.warning("pid %d left before its handoff was taken: %s", pid, e)
                return
            self._taken.put_nowait(ram)

    async def accept(self) -> GuestRam:
        """Waits for the next handoff taken; refuses (and keeps waiting) foreign or malformed
        ones."""
        self._serve()
        return await self._taken.get()

    def taken(self) -> list[GuestRam]:
        """The handoffs taken and not yet accepted (the engine owns their fds)."""
        self._serve()
        out = []
        while not self._taken.empty():
            out.append(self._taken.get_nowait())
        return out

    def refuse(self, why: str) -> list[GuestRam]:
        """From now on every handoff is refused with why; returns those already taken."""
        self._refusing = why
        return self.taken()

    async def refuse_more(self, why: str) -> None:
        """Refuses every further handoff (the engine tracks one RAM region), until cancelled."""
        for ram in self.refuse(why):
            log.warning("refused a second RAM region (%s, %d MiB): %s", ram.path,
                        ram.length >> 20, why)
            ram.close()
        await asyncio.Event().wait()

    def close(self) -> None:
        for task in [*self._conns, *([self._server] if self._server else [])]:
            task.cancel()
        for ram in self.taken() if self._server else []:
            ram.close()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One handoff message and its fds from a non-blocking socket (fewer bytes at EOF)."""
    data, fds = b"", []
    try:
        while len(data) < _HANDOFF.size:
            await _readable(conn)
            try:
                chunk, more, _flags, _addr = socket.recv_fds(
                    conn, _HANDOFF.size - len(data), 3, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                continue
            fds += more
            if not chunk:
                break
            data += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, fds
