"""The engine's QMP connection (qemu.qmp) and device state moved through pipes, no files."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from vmckpt.engine.targets.base import pid_alive

MIGRATION_DONE = ("completed", "failed", "cancelled")
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


class QemuError(Exception):
    """QEMU refused or failed a command; the message says what QEMU said."""


async def _read_to_eof(fd: int) -> bytes:
    """Reads a pipe to its end on the event loop: no thread hop inside the pause."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except BlockingIOError:
            return
        except OSError as e:
            done.set_exception(e)
        else:
            done.set_result(None)
        loop.remove_reader(fd)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Qmp:
    def __init__(self, client: QMPClient, sock: socket.socket) -> None:
        self.client = client
        self._sock = sock  # ours, for SCM_RIGHTS (qemu.qmp's own way fails under uvloop)
        self._out: int | None = None  # our end of the pipe QEMU already holds (prepare_save)
        self._preparing = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = 30.0,
                      pid: int | None = None) -> Qmp:
        """Connects as soon as QEMU listens; fails if QEMU exits or the timeout passes."""
        deadline = time.monotonic() + timeout
        while True:
            client = QMPClient("vmckpt")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                await client.connect(sock)
                return cls(client, sock)
            except Exception as e:  # noqa: BLE001 (qemu.qmp wraps OSError in ConnectError)
                sock.close()
                err = e
            if pid is not None and not pid_alive(pid):
                raise QemuError(f"QEMU (pid {pid}) exited before its QMP monitor answered")
            if time.monotonic() > deadline:
                raise QemuError(f"no QMP monitor at {path} after {timeout:g} s: {err}")
            await asyncio.sleep(0.05)

    async def cmd(self, name: str, /, **args: Any) -> Any:  # /: QMP has "name" arguments
        try:
            return await self.client.execute(name, args or None)
        except ExecuteError as e:
            raise QemuError(f"QEMU refused {name}: {e}") from None  # str(): its desc

    async def send_fd(self, fd: int, name: str) -> None:
        """Gives QEMU a copy of fd under name (for `fd:name` migration URIs)."""
        self._sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("@i", fd))])
        await self.cmd("getfd", fdname=name)

    async def set_capability(self, name: str, state: bool) -> None:
        await self.cmd("migrate-set-capabilities",
                       capabilities=[{"capability": name, "state": state}])

    async def set_ignore_shared(self) -> None:
        await self.set_capability("x-ignore-shared", True)

    async def prepare_save(self) -> None:
        """Hands QEMU the pipe of the next device-state save ahead of the pause, so that inside
        it only `migrate` is left (one QMP round trip and an SCM_RIGHTS message fewer). One at a
        time: QEMU keeps only the last fd of a name, and ours must be its other end."""
        async with self._preparing:
            if self._out is not None:
                return
            r, w = os.pipe()
            # Room for a whole device state (~320 KB for a PC), so QEMU never waits on us.
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            try:
                await self.send_fd(w, "vmckpt-out")
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)  # QEMU holds its own copy: EOF comes when QEMU closes it
            self._out = r

    async def save_device_state(self) -> tuple[bytes, asyncio.Future[dict]]:
        """Runs a migration into a pipe that this process reads; returns the stream and QEMU's
        figures for it, still to come: QEMU closes the pipe only once the migration has ended,
        so the guest may be continued before they are read (a round trip out of the pause).
        The guest must be stopped (shared RAM is skipped, not copied)."""
        await self.prepare_save()
        r, self._out = self._out, None
        assert r is not None
        reader = asyncio.ensure_future(_read_to_eof(r))
        try:
            await self.cmd("migrate", uri="fd:vmckpt-out")
        except BaseException:
            # No stream is coming, and no EOF either if QEMU took the fd before refusing
            # (it keeps it open): waiting for one would hang the pause.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            os.close(r)
            with contextlib.suppress(QemuError):  # gone already if QEMU took it
                await self.cmd("closefd", fdname="vmckpt-out")
            raise
        try:
            data = await reader
        finally:
            os.close(r)
        return data, asyncio.ensure_future(self.wait_migration())

    async def save_devices_only(self, path: Path) -> bytes:
        """The device state without `migrate`: QEMU's xen-save-devices-state (any accelerator,
        despite its name) writes the same sections, guest RAM left out, into path, and leaves
        the block nodes active. A migration inactivates them at its end, which QEMU refuses
        while a disk's fleecing job runs (engine/qemu/fleece.py), and a job started after it
        finds them read-only. The guest must be stopped."""
        try:
            await self.cmd("xen-save-devices-state", filename=str(path), live=False)
            return path.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def load_device_state(self, data: bytes) -> dict:
        """Feeds a saved stream to a QEMU started with `-incoming defer`."""
        r, w = os.pipe()
        try:
            await self.send_fd(r, "vmckpt-in")
        finally:
            os.close(r)
        try:
            await self.cmd("migrate-incoming", uri="fd:vmckpt-in")
            await asyncio.to_thread(_write_all, w, data)
        finally:
            with contextlib.suppress(OSError):
                os.close(w)
        return await self.wait_migration()

    async def wait_migration(self) -> dict:
        while True:
            info = await self.cmd("query-migrate")
            status = info.get("status")
            if status in MIGRATION_DONE:
                if status != "completed":
                    raise QemuError(f"migration {status}: "
                                    f"{info.get('error-desc', 'QEMU gave no reason')}")
                return info
            await asyncio.sleep(0.0005)

    async def close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(Exception):
                await self.cmd("closefd", fdname="vmckpt-out")
            os.close(self._out)
            self._out = None
        with contextlib.suppress(Exception):
            await self.client.disconnect()
