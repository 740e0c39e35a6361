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

from vmckpt.engine.cycle import EngineOptions
from vmckpt.engine.qemu.argv import for_restore, with_qmp
from vmckpt.engine.qemu.qmp import QemuError, Qmp
from vmckpt.engine.session import TrackedProgram, checkpoint_program
from vmckpt.storage import PageStore, get_blob, restore_image

log = logging.getLogger("vmckpt")


class RestoreError(Exception):
    """The checkpoint could not be brought back; the message says why, in QEMU's words too."""


class StderrTail:
    """Passes a child's stderr through and keeps its last lines for error messages."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=8)
        self.task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            self.lines.append(line.decode(errors="replace").strip())

    async def text(self) -> str:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.task), 2)
        return " / ".join(self.lines) or "QEMU printed nothing"


async def restore_qemu(store: PageStore, ckpt: int | str, argv: Sequence[str], *,
                       paused: bool = False, checkpoint: EngineOptions | None = None,
                       image_dir: str = "/dev/shm", attach_timeout: float = 30.0,
                       on_loaded: Callable[[Path], None] | None = None, **how: Any) -> int:
    """Runs a new QEMU (argv: the same machine as the checkpointed one) from checkpoint ckpt.

    paused: stop after loading (for a debugger); checkpoint: keep checkpointing it into the
    same store as a new branch whose parent is ckpt (how: checkpoint_program's options).
    on_loaded (tests) sees the RAM image once the device state is in, before the guest runs.
    Returns QEMU's exit status.
    """
    rec = store.get_record(ckpt)
    if not rec.get("device_state"):
        raise RestoreError(f"checkpoint {rec['id']} holds no QEMU device state (it was taken "
                           f"from a {rec['target']['kind']}): restore its RAM with --image")
    device = get_blob(store, rec["device_state"])
    image = Path(image_dir) / f"vmckpt-{rec['id']}-{os.getpid()}.ram"
    restore_image(store, rec["id"], image)
    try:
        qemu_argv = for_restore(argv, image, rec["ram_size"])
        with tempfile.TemporaryDirectory(prefix="vmckpt-") as tmp:
            sock = Path(tmp) / "engine.sock"
            prog = None
            if checkpoint:
                prog = await TrackedProgram.start(
                    qemu_argv, sock, copiers=checkpoint.copiers,
                    buffer_bytes=checkpoint.buffer_bytes, tracking=checkpoint.tracking,
                    priority=checkpoint.priority,
                    attach_timeout=attach_timeout,
                    stderr=asyncio.subprocess.PIPE)
                proc, qmp = prog.proc, prog.target.qmp  # type: ignore[attr-defined]
            else:
                qmp_path = Path(tmp) / "qmp.sock"
                proc = await asyncio.create_subprocess_exec(
                    *with_qmp(qemu_argv, qmp_path), stderr=asyncio.subprocess.PIPE)
                qmp = await Qmp.connect(qmp_path, timeout=attach_timeout, pid=proc.pid)
                await qmp.set_ignore_shared()
            assert proc.stderr
            tail = StderrTail(proc.stderr)
            try:
                await qmp.load_device_state(device)
            except Exception as e:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                if prog:
                    await prog.untrack()
                taken = " ".join(rec["target"].get("argv") or [])
                raise RestoreError(
                    f"QEMU could not load checkpoint {rec['id']}: {await tail.text()} "
                    f"({e}). The machine must match the checkpointed one, which ran: "
                    f"{taken}") from None
            if on_loaded:
                on_loaded(image)
            image.unlink()  # QEMU keeps its mapping; the memory goes when QEMU exits
            if not paused:
                await qmp.cmd("cont")
            log.info("checkpoint %d restored%s", rec["id"],
                     " (paused)" if paused else "; the guest runs")
            if prog:
                return await checkpoint_program(prog, store, checkpoint, parent=rec["id"],
                                                **how)
            # Like `vmckpt run`: Ctrl-C or SIGTERM stops the VM cleanly.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, proc.terminate)
            try:
                return await proc.wait()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
                await qmp.close()
    except QemuError as e:
        raise RestoreError(str(e)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
