"""The contract between the checkpoint cycle and whatever runs the guest."""

from __future__ import annotations

from typing import Protocol


def pid_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):
        return False


class TargetGone(Exception):
    """The target exited: the cycle stops."""


class Target(Protocol):
    kind: str
    name: str
    argv: list[str] | None  # how it was started (recorded: a restore needs the same machine)
    uncaptured_disks: list[dict]  # writable disks the checkpoints leave out (recorded)

    async def pause(self) -> None:
        """Returns once no guest thread can write guest RAM."""

    async def extra_state(self) -> bytes | None:
        """State beyond RAM taken while paused (QEMU's devices); None for a plain process."""

    async def resume(self) -> None:
        """Lets the guest run again; returns as soon as it does (the pause ends here)."""

    async def settle(self) -> None:
        """After resume: confirms that the extra state taken in the pause is whole (QEMU
        reports its save's outcome only after the guest may run); raises if it is not."""

    async def close(self) -> None:
        """Lets go of the target; it runs on."""
