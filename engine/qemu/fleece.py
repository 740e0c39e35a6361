"""Point-in-time views of a QEMU's writable disks, with QEMU's own machinery (no QEMU patch):
the pattern of libvirt's pull-mode backup.

Between pauses each disk carries a live dirty bitmap (4 KiB granularity, so that disk blocks and
RAM pages deduplicate with each other) and a scratch qcow2 node whose backing is the disk. Inside
a pause one QMP `transaction` per checkpoint adds the next live bitmap, freezes the previous
one and starts `blockdev-backup sync=none` from the disk to the scratch node (image fleecing:
the disk's old data is copied to the scratch before the guest overwrites it). After the resume
the scratch node, exported over NBD with the frozen bitmap, reads as the disk did at the pause;
the engine reads the extents the bitmap names. Then export, job, scratch and frozen bitmap go,
and the next scratch is prepared.

Every name starts with PREFIX, so that the keeper can take a dead engine's away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmckpt.engine.qemu.disks import Disk
from vmckpt.engine.qemu.nbd import BASE_ALLOCATION, dirty_bitmap
from vmckpt.engine.qemu.qmp import QemuError, Qmp

PREFIX = "vmckpt-"
SCRATCH_DIRS = "vmckpt-fleece-"  # the keeper removes a dead engine's, by this name
GRANULARITY = 4096
SETTLE_TIMEOUT = 10.0  # seconds for QEMU to finish cancelling a job or deleting an export


class DiskCaptureError(Exception):
    """A writable disk cannot be captured: the drive, QEMU's reason, and what to do."""


@dataclass
class View:
    """One disk as it was at a pause, exported read-only over NBD."""

    disk: Disk
    first: int     # its first frame in the checkpoint's map
    socket: str    # the NBD server's Unix socket
    export: str
    context: str   # base:allocation (every block), or the frozen bitmap's context


@dataclass
class _Fleece:
    """One disk's pieces of the checkpoint in flight."""

    index: int
    scratch: str          # scratch node (prepared before the pause)
    file: Path            # its qcow2 file
    job: str = ""         # the backup job, once the pause started it
    frozen: str = ""      # the bitmap of the writes before the pause
    full: bool = False    # read every block, not just the frozen bitmap's
    export: str = ""


class DiskCapture:
    def __init__(self, qmp: Qmp, disks: list[Disk], firsts: list[int]) -> None:
        self.qmp, self.disks, self.firsts = qmp, disks, firsts
        self._dir = Path(tempfile.mkdtemp(prefix=SCRATCH_DIRS))
        self._socket = str(self._dir / "nbd.sock")
        self.state_file = self._dir / "devices"  # QEMU's device state, saved in the pause
        self._gen = 0
        self._live: str = ""  # bitmap (one name on every disk) recording writes since then
        self._next: list[_Fleece] = []   # scratch nodes ready for the next pause
        self._taken: list[_Fleece] = []  # the pause's, until released
        self._full_owed = True  # the next checkpoint reads every block, not just the written
        self._server = False
        self.started = False

    async def start(self) -> None:
        """NBD server, a live bitmap from now and the first scratch nodes; a disk QEMU will
        not fleece is refused here, by name, before any checkpoint."""
        try:
            await self.qmp.cmd("nbd-server-start",
                               addr={"type": "unix", "data": {"path": self._socket}})
            self._server = True
            self._live = self._name("live")
            for d in self.disks:
                await self._for(d, "block-dirty-bitmap-add", node=d.node, name=self._live,
                                granularity=GRANULARITY, persistent=False)
            # The backup job itself is tried once now: a refusal inside a pause is too late.
            # Its scratch nodes may have taken old data, so they are made anew after.
            await self._prepare()
            trial, self._next = self._next, []
            for f in trial:
                d = self.disks[f.index]
                f.job = self._name(f"trial{f.index}")
                await self._for(d, "blockdev-backup", device=d.node, target=f.scratch,
                                sync="none", **{"job-id": f.job})
                await self._discard(f)
            await self._prepare()
        except BaseException:
            await self.close()
            raise
        self.started = True

    def base_on_attach(self, incremental: bool) -> None:
        """Whether the first checkpoint reads only the blocks written since start() (its
        parent holds the disks as they were then: a restored branch), or every block."""
        self._full_owed = not incremental

    def _name(self, what: str) -> str:
        return f"{PREFIX}{what}-{self._gen}"

    async def _for(self, disk: Disk, command: str, /, **args: object) -> object:
        try:
            return await self.qmp.cmd(command, **args)
        except QemuError as e:
            raise DiskCaptureError(
                f"disk {disk.device} ({disk.file}) cannot be captured: {e}. Checkpoint RAM "
                "only with --no-disks (every restore then warns), or give the VM a local raw "
                "or qcow2 image") from None

    async def _prepare(self) -> None:
        """The next pause's scratch nodes: an empty qcow2 per disk, backed by the disk."""
        self._gen += 1
        ready = []
        try:
            for i, d in enumerate(self.disks):
                f = _Fleece(i, self._name(f"scratch{i}"), self._dir / f"scratch{i}-{self._gen}")
                await _qemu_img_create(f.file, d.size)
                await self._for(d, "blockdev-add", driver="qcow2", **{"node-name": f.scratch},
                                file={"driver": "file", "filename": str(f.file)}, backing=d.node,
                                **{"discard": "unmap"})
                ready.append(f)
        except BaseException:
            self._next = ready
            raise
        self._next = ready

    def pause_actions(self) -> list[dict]:
        """The transaction for the pause that begins now (sent with QMP stop, one round trip)."""
        if not self._next:
            raise DiskCaptureError("the disks' scratch nodes are not ready (a previous "
                                   "checkpoint failed to prepare them)")
        self._taken, self._next = self._next, []
        live = self._name("live")
        actions = []
        for f in self._taken:
            d = self.disks[f.index]
            f.job, f.frozen, f.full = self._name(f"backup{f.index}"), self._live, self._full_owed
            actions += [{"type": "block-dirty-bitmap-add",
                         "data": {"node": d.node, "name": live, "granularity": GRANULARITY,
                                  "persistent": False}},
                        {"type": "block-dirty-bitmap-disable",
                         "data": {"node": d.node, "name": f.frozen}},
                        {"type": "blockdev-backup",
                         "data": {"device": d.node, "target": f.scratch, "sync": "none",
                                  "job-id": f.job}}]
        self._live, self._full_owed = live, False
        return actions

    async def expose(self) -> list[View]:
        """After the resume: the pause's views, exported."""
        views = []
        for f in self._taken:
            d = self.disks[f.index]
            f.export = f"{PREFIX}disk{f.index}-{self._gen}"
            await self._for(d, "block-export-add", type="nbd", id=f.export,
                            **{"node-name": f.scratch}, name=f.export, writable=False,
                            bitmaps=[] if f.full else [f.frozen])
            views.append(View(d, self.firsts[f.index], self._socket, f.export,
                              BASE_ALLOCATION if f.full else dirty_bitmap(f.frozen)))
        return views

    async def release(self, *, kept: bool) -> None:
        """Takes the pause's export, job, scratch and frozen bitmap away, and prepares the next
        scratch nodes. kept False (the checkpoint was dropped): the frozen bitmap's blocks are
        merged into the live one, so the next checkpoint reads them again. A checkpoint that
        read every block and was dropped makes the next one read every block again."""
        taken, self._taken = self._taken, []
        for f in taken:
            await self._drop_export(f.export)
        for f in taken:
            await self._discard(f)
        for f in taken:
            d = self.disks[f.index]
            if not kept:
                await self.qmp.cmd("block-dirty-bitmap-merge", node=d.node,
                                   target=self._live, bitmaps=[f.frozen])
                self._full_owed |= f.full
            await self.qmp.cmd("block-dirty-bitmap-remove", node=d.node, name=f.frozen)
        await self._prepare()

    async def _drop_export(self, export: str) -> None:
        if not export:
            return
        with contextlib.suppress(QemuError):
            await self.qmp.cmd("block-export-del", id=export, mode="hard")
        await self._until(lambda: self._export_gone(export), f"NBD export {export}")

    async def _export_gone(self, export: str) -> bool:
        return all(e["id"] != export for e in await self.qmp.cmd("query-block-exports"))

    async def _end_job(self, job: str) -> None:
        if not job:
            return
        with contextlib.suppress(QemuError):
            await self.qmp.cmd("block-job-cancel", device=job, force=True)
        await self._until(lambda: self._job_gone(job), f"block job {job}")

    async def _job_gone(self, job: str) -> bool:
        return all(j["device"] != job for j in await self.qmp.cmd("query-block-jobs"))

    async def _discard(self, f: _Fleece) -> None:
        """Its backup job ended, then its scratch node and image gone."""
        await self._end_job(f.job)
        with contextlib.suppress(QemuError):
            await self.qmp.cmd("blockdev-del", **{"node-name": f.scratch})
        with contextlib.suppress(FileNotFoundError):
            f.file.unlink()

    @staticmethod
    async def _until(done, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not await done():
            if time.monotonic() > deadline:
                raise QemuError(f"{what} did not go within {SETTLE_TIMEOUT:g} s")
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        """Everything away: QEMU runs on with its disks as they are, nothing of ours left."""
        try:
            for f in self._taken:
                await self._drop_export(f.export)
            for f in self._taken + self._next:
                await self._discard(f)
            for f in self._taken:
                if f.frozen:  # taken by a pause that failed before it was released
                    with contextlib.suppress(QemuError):
                        await self.qmp.cmd("block-dirty-bitmap-remove",
                                           node=self.disks[f.index].node, name=f.frozen)
            if self._live:
                for d in self.disks:
                    with contextlib.suppress(QemuError):
                        await self.qmp.cmd("block-dirty-bitmap-remove", node=d.node,
                                           name=self._live)
            if self._server:
                with contextlib.suppress(QemuError):
                    await self.qmp.cmd("nbd-server-stop")
        finally:
            self._taken, self._next, self._live, self._server = [], [], "", False
            shutil.rmtree(self._dir, ignore_errors=True)


async def _qemu_img_create(path: Path, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise DiskCaptureError(f"qemu-img could not create a scratch image in {path.parent}: "
                               f"{err.decode().strip()}")
    os.chmod(path, 0o600)  # it holds the guest's old disk data
