"""The contract between the checkpoint cycle and whatever runs the guest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from vmckpt.storage import PageStore, StoreFull
from vmckpt.storage.pagemap import ID_BYTES


def pid_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class DiskCopied:
    """One disk's blocks of one checkpoint, in the store, not yet in its map."""

    disk: dict  # its record
    pfns: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    ids: np.ndarray = field(default_factory=lambda: np.empty((0, ID_BYTES), np.uint8))
    new: int = 0
    dup: int = 0
    bytes: int = 0
    zero: int = 0
    failed: StoreFull | None = None


class TargetGone(Exception):
    """The target exited: the cycle stops."""


class Target(Protocol):
    kind: str
    name: str
    argv: list[str] | None  # how it was started (recorded: a restore needs the same machine)
    uncaptured_disks: list[dict]  # writable disks the checkpoints leave out (recorded)
    disks: list[dict]  # the disks each checkpoint captures: records, each with its first frame
    skipped_disks: list[dict]  # drives that need no capture, and why (recorded)
    device_state_via: str | None  # how extra_state is taken, for the restore (recorded)

    async def pause(self, *, capture: bool = True) -> None:
        """Returns once no guest thread can write guest RAM (capture: and the disks' view of
        this instant is taken, for drain_disks)."""

    async def extra_state(self) -> bytes | None:
        """State beyond RAM taken while paused (QEMU's devices); None for a plain process."""

    async def resume(self) -> None:
        """Lets the guest run again; returns as soon as it does (the pause ends here)."""

    async def settle(self) -> None:
        """After resume: confirms that the extra state taken in the pause is whole (QEMU
        reports its save's outcome only after the guest may run); raises if it is not."""

    def disks_since_attach(self, incremental: bool) -> None:
        """Whether the first checkpoint's disks are what was written since the attach (its
        parent holds them as they were then), or all of them."""

    async def drain_disks(self, store: PageStore) -> list[DiskCopied]:
        """After resume: the blocks of the last pause's disk view, into the store."""

    async def release_disks(self, *, kept: bool) -> None:
        """The last pause's disk view is done with (kept False: its checkpoint was dropped,
        so the next one takes its blocks again)."""

    async def close(self) -> None:
        """Lets go of the target; it runs on."""
