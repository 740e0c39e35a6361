"""The contract between the checkpoint cycle and whatever runs the guest."""

from __future__ import annotations

from typing import Protocol


class TargetGone(Exception):
    """The target exited: the cycle stops."""


class Target(Protocol):
    kind: str
    name: str

    async def pause(self) -> None:
        """Returns once no guest thread can write guest RAM."""

    async def extra_state(self) -> bytes | None:
        """State beyond RAM taken while paused (QEMU's devices); None for a plain process."""

    async def resume(self) -> None: ...
