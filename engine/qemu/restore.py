"""Brings a checkpoint back to life in a new QEMU: RAM image on tmpfs + device state via QMP."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError
from vmckpt.engine.cycle import EngineOptions
from vmckpt.engine.qemu.argv import for_restore, with_qmp
from vmckpt.engine.qemu.qmp import QemuError, Qmp
from vmckpt.engine.qemu.restore_disks import (
    DiskWriteError,
    Image,
    match_drives,
    point_drives,
    write_disks,
)
from vmckpt.engine.session import AttachError, TrackedProgram, checkpoint_program
from vmckpt.storage import PageStore, get_blob, restore_image

log = logging.getLogger("vmckpt")


class RestoreError(Exception):
    """The checkpoint could not be brought back; the message says why, in QEMU's words too."""


class StderrTail:
    """A pipe for a child's stderr, read from before the child starts: passes it through and
    keeps its last lines, so QEMU's own words are there whenever it fails, at start-up too."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=8)
        r, self.fd = os.pipe()  # fd: the child's end, for its stderr
        self._reader = os.fdopen(r, "rb", buffering=0)
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), self._reader)
        try:
            while line := await stream.readline():
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
                self.lines.append(line.decode(errors="replace").strip())
        finally:
            transport.close()

    def started(self) -> None:
        """The child holds its copy of our write end: close ours, so EOF comes when it exits."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def text(self) -> str:
        self.started()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), 2)
        return " / ".join(self.lines) or "QEMU printed nothing"

    async def close(self) -> None:
        self.started()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self.task


def _write_image(store: PageStore, ckpt: int, image_dir: str) -> Path:
    """The checkpoint's RAM in a new file of image_dir (tmpfs): an unpredictable name, created
    0600 with O_EXCL|O_NOFOLLOW (mkstemp), so nothing planted there is followed or reused;
    removed again if writing it fails or is interrupted."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"vmckpt-{ckpt}-{os.getpid()}-", suffix=".ram",
                                    dir=image_dir)
    except OSError as e:
        raise RestoreError(f"cannot create the RAM image in {image_dir}: {e.strerror}") from None
    try:
        restore_image(store, ckpt, fd)
    except BaseException as e:
        os.unlink(name)
        if isinstance(e, OSError):
            raise RestoreError(f"cannot write the RAM image of checkpoint {ckpt} in "
                               f"{image_dir}: {e.strerror}") from None
        raise
    finally:
        os.close(fd)
    return Path(name)


def _write_disks(store: PageStore, rec: dict, disk_dir: str, fmt: str) -> dict[str, Image]:
    try:
        return write_disks(store, rec, disk_dir, fmt)
    except DiskWriteError as e:
        raise RestoreError(str(e)) from None


def _remove(disks: dict[str, Image]) -> None:
    for disk in disks.values():
        disk.path.unlink(missing_ok=True)


async def _kill(proc: asyncio.subprocess.Process | None) -> None:
    if proc and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def restore_qemu(store: PageStore, ckpt: int | str, argv: Sequence[str], *,
                       paused: bool = False, checkpoint: EngineOptions | None = None,
                       image_dir: str = "/dev/shm", disk_dir: str | None = None,
                       disk_format: str = "raw", attach_timeout: float = 30.0,
                       on_loaded: Callable[[Path], None] | None = None, **how: Any) -> int:
    """Runs a new QEMU (argv: the same machine as the checkpointed one) from checkpoint ckpt.

    Each disk the checkpoint holds is written into a new sparse image (disk_format: raw or
    qcow2) in disk_dir (default: image_dir) and its drive on argv is pointed at it; the images
    stay once the guest runs (they are its disks now), and the user's own are never written.

    paused: stop after loading (for a debugger); checkpoint: keep checkpointing it into the
    same store as a new branch whose parent is ckpt (how: checkpoint_program's options).
    on_loaded (tests) sees the RAM image once the device state is in, before the guest runs.
    Returns QEMU's exit status. If QEMU fails to start or to load the checkpoint, the
    RestoreError says why in QEMU's words, with the command line the checkpoint was taken
    with; QEMU is never left running and the RAM image never left behind.
    """
    rec = store.get_record(ckpt)
    if not rec.get("device_state"):
        raise RestoreError(f"checkpoint {rec['id']} holds no QEMU device state (it was taken "
                           f"from a {rec['target']['kind']}): restore its RAM with --image")
    device = get_blob(store, rec["device_state"])
    if missed := rec.get("disks_not_captured"):
        log.warning("checkpoint %d did not capture the VM's disks (%s): the guest will see "
                    "them as they are now, not as they were at the checkpoint", rec["id"],
                    ", ".join(d["device"] for d in missed))
    for_restore(argv, "IMAGE", rec)  # refuses a wrong size before any work
    if "disks" in rec:  # (a record from before disks were captured says nothing of them)
        match_drives(argv, rec)  # and a command line with other disks
    # Until the guest runs, SIGTERM stops the restore like Ctrl-C does (asyncio cancels the
    # task at its next await): the cleanup below runs, where SIGTERM's default would leave
    # the image and QEMU behind.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task
    terminated: list[bool] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: (terminated.append(True), task.cancel()))
    try:
        return await _restore(store, rec, device, argv, paused, checkpoint, image_dir,
                              disk_dir or image_dir, disk_format, attach_timeout, on_loaded,
                              how)
    except asyncio.CancelledError:
        if not terminated:
            raise
        raise RestoreError(f"the restore of checkpoint {rec['id']} was stopped by SIGTERM "
                           "before the guest ran") from None
    finally:  # ours, if the guest never ran (else already replaced and removed)
        loop.remove_signal_handler(signal.SIGTERM)


async def _restore(store: PageStore, rec: dict, device: bytes, argv: Sequence[str],
                   paused: bool, checkpoint: EngineOptions | None, image_dir: str,
                   disk_dir: str, disk_format: str, attach_timeout: float,
                   on_loaded: Callable[[Path], None] | None, how: dict[str, Any]) -> int:
    disks = _write_disks(store, rec, disk_dir, disk_format)
    try:
        image = _write_image(store, rec["id"], image_dir)
    except BaseException:
        _remove(disks)
        raise
    tail = StderrTail()
    proc: asyncio.subprocess.Process | None = None
    prog: TrackedProgram | None = None
    qmp: Qmp | None = None
    loaded = False
    try:
        qemu_argv = for_restore(point_drives(argv, rec, disks) if disks else argv, image, rec)
        with tempfile.TemporaryDirectory(prefix="vmckpt-") as tmp:
            sock = Path(tmp) / "engine.sock"
            try:
                if checkpoint:
                    try:
                        prog = await TrackedProgram.start(
                            qemu_argv, sock, copiers=checkpoint.copiers,
                            buffer_bytes=checkpoint.buffer_bytes, tracking=checkpoint.tracking,
                            priority=checkpoint.priority, disks=checkpoint.disks,
                            attach_timeout=attach_timeout,
                            stderr=tail.fd)
                    finally:
                        tail.started()
                    proc, qmp = prog.proc, prog.target.qmp  # type: ignore[attr-defined]
                else:
                    qmp_path = Path(tmp) / "qmp.sock"
                    try:
                        proc = await asyncio.create_subprocess_exec(
                            *with_qmp(qemu_argv, qmp_path), stderr=tail.fd)
                    finally:
                        tail.started()
                    qmp = await Qmp.connect(qmp_path, timeout=attach_timeout, pid=proc.pid)
                    await qmp.set_ignore_shared()
                assert qmp
                await qmp.load_device_state(device)
                if prog:  # its block nodes are active now, the guest not yet running
                    await prog.target.start_disks()  # type: ignore[attr-defined]
                loaded = True
            # ExecInterruptedError: QEMU exited in the middle of a command (a failed load).
            except (QemuError, AttachError, OSError, ExecInterruptedError) as e:
                if proc is None and isinstance(e, (FileNotFoundError, PermissionError)):
                    raise  # no QEMU to run: the caller says "cannot start"
                await _kill(proc)
                taken = " ".join(rec["target"].get("argv") or [])
                raise RestoreError(
                    f"QEMU could not load checkpoint {rec['id']}: {await tail.text()} "
                    f"({e}). The machine must match the checkpointed one, which ran: "
                    f"{taken}") from None
            if on_loaded:
                on_loaded(image)
            image.unlink()  # QEMU keeps its mapping; the memory goes when QEMU exits
            for name, disk in disks.items():  # the guest's disks now: they stay
                log.info("disk %s restored into %s (%s)", name, disk.path, disk.format)
            if not paused:
                await qmp.cmd("cont")
            log.info("checkpoint %d restored%s", rec["id"],
                     " (paused)" if paused else "; the guest runs")
            if prog:
                qmp = None  # the engine's now: checkpoint_program closes it
                return await checkpoint_program(prog, store, checkpoint, parent=rec["id"],
                                                **how)
            # Like `vmckpt run`: Ctrl-C or SIGTERM stops the VM cleanly.
            assert proc
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, proc.terminate)
            try:
                return await proc.wait()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
    except QemuError as e:
        raise RestoreError(str(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        if not loaded:  # failed or interrupted (Ctrl-C) before the guest was ours to run
            if prog:
                await prog.untrack()
            await _kill(proc)
            _remove(disks)
        if qmp:  # always: an unclosed client leaves "exception was never retrieved" behind
            await qmp.close()
        await tail.close()
