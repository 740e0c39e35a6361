"""QEMU as a checkpoint target: QMP stop, device state without RAM, cont."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict

from vmckpt.engine.qemu.argv import DEVICES_ONLY
from vmckpt.engine.qemu.disk_drain import drain_view
from vmckpt.engine.qemu.disks import find_disks
from vmckpt.engine.qemu.fleece import DiskCapture, DiskCaptureError
from vmckpt.engine.qemu.qmp import QemuError, Qmp
from vmckpt.engine.targets.base import DiskCopied, TargetGone, pid_alive
from vmckpt.storage import PageStore, place_disks

log = logging.getLogger("vmckpt")


def _exits(pid: int, within: float = 1.0) -> bool:
    """Whether pid is gone or goes within a moment: a dying QEMU closes its sockets (our QMP
    connection breaks) a little before it becomes a zombie."""
    deadline = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class QemuTarget:
    """Owns the engine's QMP connection to one QEMU.

    A keeper process (engine/qemu/keeper.py) continues the guest if the engine dies while the
    guest is stopped, so a crash of the engine never leaves the VM paused. A VM that was not
    running when a pause began (stopped by its user, started with -S, restored --paused) is
    checkpointed as it is and left so: neither the engine nor the keeper continues it.
    """

    kind = "qemu"

    def __init__(self, qmp: Qmp, qmp_path: str | os.PathLike[str], pid: int, ram_length: int,
                 name: str = "qemu", argv: Sequence[str] | None = None) -> None:
        self.qmp, self.pid, self.ram_length, self.name = qmp, pid, ram_length, name
        self.argv = list(argv) if argv else None
        self._prepared: asyncio.Future[None] | None = None
        self._outcome: asyncio.Future[dict] | None = None
        self._stopped_by_us = False  # this pause stopped a running guest: resume continues it
        self._status = ""  # QEMU's run state when the pause began
        # The device state of our last save and QEMU's figures for it: a VM that has not run
        # since (run state postmigrate) cannot be migrated again, and its devices are the same.
        self._saved: tuple[bytes, dict] | None = None
        self._saving: bytes | None = None
        # Writable disks that checkpoints leave out (--no-disks): each record names them, and
        # a restore warns that the guest will see them as they are then.
        self.uncaptured_disks: list[dict] = []
        self.disks: list[dict] = []
        self.skipped_disks: list[dict] = []
        self._capture: DiskCapture | None = None
        self._fleecing: asyncio.Future | None = None  # the pause's transaction, answering
        self.device_state_via = "migrate"
        self._keeper = subprocess.Popen(
            [sys.executable, "-m", "vmckpt.engine.qemu.keeper", str(qmp_path), str(pid)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    @classmethod
    async def on(cls, qmp: Qmp, qmp_path: str | os.PathLike[str], pid: int, ram_length: int, *,
                 name: str = "qemu", argv: Sequence[str] | None = None,
                 disks: bool = True) -> QemuTarget:
        """The target behind an open QMP connection (closed with the target). disks False:
        checkpoints leave the writable disks out, and their records say so."""
        await qmp.set_ignore_shared()
        target = cls(qmp, qmp_path, pid, ram_length, name, argv)
        try:
            found, skipped = await find_disks(qmp, argv or [])
            target.skipped_disks = [asdict(s) for s in skipped]
            if disks and found:
                target.disks = place_disks(ram_length, [d.as_record() for d in found])
                target._capture = DiskCapture(qmp, found, [d["first"] for d in target.disks])
                target.device_state_via = DEVICES_ONLY
                # A QEMU waiting for an incoming state (a restore) has its block nodes
                # inactive until the state is in: there the restore starts the capture.
                if (await qmp.cmd("query-status"))["status"] != "inmigrate":
                    await target.start_disks()
        except BaseException:
            await target.close()
            raise
        if not disks:
            target.uncaptured_disks = [d.as_record() for d in found]
        for d in found if not disks else ():
            log.warning("disk %s (%s) is not captured (--no-disks): a restore gives the guest "
                        "this disk as it is then, not as it was at the checkpoint",
                        d.device, d.file)
        return target

    async def start_disks(self) -> None:
        """The disks' tracking from now on (before the guest runs, for a restored branch: its
        first checkpoint then takes only what was written since)."""
        if self._capture and not self._capture.started:
            await self._capture.start()
            self._mark(b"F")  # the keeper takes our fleecing away if we die

    def _mark(self, state: bytes) -> None:
        assert self._keeper.stdin
        self._keeper.stdin.write(state)
        self._keeper.stdin.flush()

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """QEMU's refusals pass through; a lost connection is TargetGone if QEMU exited."""
        try:
            yield
        except QemuError:
            raise
        except Exception as e:
            if _exits(self.pid):
                raise TargetGone(f"QEMU (pid {self.pid}) exited") from None
            raise QemuError(f"{what} failed: {e}") from e

    async def _cmd(self, name: str) -> None:
        with self._failures(f"QMP {name}"):
            await self.qmp.cmd(name)

    async def pause(self, *, capture: bool = True) -> None:
        actions = self._capture.pause_actions() if capture and self._capture else None
        self._mark(b"P")  # before anything: the keeper must continue a guest we may stop
        sent = [self.qmp.cmd("query-status"), self.qmp.cmd("stop")]
        if actions:  # the disks' view of this instant, in the same round trip
            sent.append(self.qmp.cmd("transaction", actions=actions))
        # Sent together: QMP answers a monitor's commands in order, so the status is the one
        # just before our stop, at no extra round trip inside the pause. (qemu.qmp queues each
        # command when its task first runs, and tasks run in creation order.) The transaction's
        # answer is awaited only with the device state's (extra_state): QEMU runs it while the
        # cycle arms the tracker, on the other core.
        tasks = [asyncio.ensure_future(c) for c in sent]
        self._fleecing = tasks[2] if actions else None
        with self._failures("QMP stop"):
            status, stopped = await asyncio.gather(*tasks[:2], return_exceptions=True)
            for answer in (status, stopped):
                if isinstance(answer, BaseException):
                    await self._fleeced(quiet=True)
                    raise answer
        assert isinstance(status, dict)
        was = self._status
        self._stopped_by_us = bool(status.get("running"))
        self._status = status.get("status", "")
        if not self._stopped_by_us:
            self._mark(b"S")  # stopped by its user: nobody continues it but the user
            if was in ("", "running"):
                log.info("QEMU is not running (%s): checkpointed as it is and left stopped",
                         self._status)

    async def _fleeced(self, *, quiet: bool = False) -> None:
        """The pause's transaction answered; a refusal fails the checkpoint (the cycle's
        resume continues the guest)."""
        task, self._fleecing = self._fleecing, None
        if task is None:
            return
        try:
            await task
        except Exception as e:
            if not quiet:
                raise DiskCaptureError(f"QEMU refused the disks' point-in-time view: {e}") \
                    from None

    async def extra_state(self) -> bytes:
        with self._failures("saving device state"):
            if self._capture:  # see Qmp.save_devices_only: no migrate while disks are fleeced
                data = await self.qmp.save_devices_only(self._capture.state_file)
                await self._fleeced()
                return data
            if self._status == "postmigrate":  # not running: a round trip more costs it nothing
                return await self._unchanged_state()
            if self._prepared:
                await self._prepared
            data, self._outcome = await self.qmp.save_device_state()
        self._saving = data
        return data

    async def _unchanged_state(self) -> bytes:
        """The device state of a VM that has not run since our last save (QEMU refuses to
        migrate it again; only cont leaves postmigrate), if that migration was ours."""
        if self._saved and await self.qmp.cmd("query-migrate") == self._saved[1]:
            return self._saved[0]
        raise QemuError("QEMU is stopped after a migration vmckpt did not make (run state "
                        "postmigrate) and cannot save its device state again until it runs: "
                        "continue it (QMP cont)")

    async def resume(self) -> None:
        if self._stopped_by_us:
            await self._cmd("cont")
            self._stopped_by_us = False
            self._mark(b"R")

    async def settle(self) -> None:
        outcome, self._outcome = self._outcome, None
        if outcome:  # the device-state save's outcome: a failed one fails the checkpoint
            with self._failures("saving device state"):
                info = await outcome
            if self._saving is not None:
                self._saved, self._saving = (self._saving, info), None
            sent = info.get("ram", {}).get("total", 0)
            if sent >= self.ram_length:
                raise QemuError(
                    f"this QEMU puts guest RAM into its device state ({sent >> 20} MiB of RAM "
                    "blocks were not skipped by x-ignore-shared): vmckpt cannot checkpoint it; "
                    "use memory-backend-memfd (QEMU 7.x) or a shared memory-backend-file under "
                    "/dev/shm")
        # The next save's pipe goes to QEMU now, outside the pause that will use it.
        if not self._capture:
            self._prepared = asyncio.ensure_future(self.qmp.prepare_save())

    def disks_since_attach(self, incremental: bool) -> None:
        if self._capture:
            self._capture.base_on_attach(incremental)

    async def drain_disks(self, store: PageStore) -> list[DiskCopied]:
        if not self._capture:
            return []
        with self._failures("exporting the disks' view"):
            views = await self._capture.expose()
        return list(await asyncio.gather(*(asyncio.to_thread(drain_view, v, rec, store)
                                           for v, rec in zip(views, self.disks, strict=True))))

    async def release_disks(self, *, kept: bool) -> None:
        if self._capture:
            with self._failures("releasing the disks' view"):
                await self._capture.release(kept=kept)

    async def close(self) -> None:
        for pending in (self._outcome, self._prepared):  # a cycle that failed mid-way
            if pending:
                with contextlib.suppress(Exception):
                    await pending
        await self._fleeced(quiet=True)  # a cycle that failed inside its pause
        if self._capture:
            with contextlib.suppress(Exception):  # QEMU may be gone: then so is all of it
                await self._capture.close()
                self._mark(b"C")  # nothing left for the keeper to take away
        if self._keeper.stdin:
            self._keeper.stdin.close()
        self._keeper.wait()
        await self.qmp.close()
