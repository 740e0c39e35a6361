"""Runs `vmckpt run`'s engine on a program and saves the SHA-256 of guest RAM at every pause
into REFDIR (N.sha256).

The crash tests kill this process with SIGKILL; the saved references tell what each
checkpoint that made it into the store must restore to. VMCKPT_TEST_INTERVAL sets the
interval (seconds, default 0.05).

Test-only hold: with VMCKPT_TEST_HOLD=PHASE:N the engine stops for good at that point of
checkpoint N, after printing `HELD PHASE N`, so that a kill lands exactly there:
  pause      inside the pause (the target stopped, RAM saved as the reference)
  drain      in the drain (its pre-arm's or its own), at its first batch into the store
  commit     drained, at the commit, before its record is written
  committed  after the commit returned
With VMCKPT_TEST_HOLD_ON_SIGNAL=1, N counts from the first pause after SIGUSR1 (a QEMU guest
is held once it has booted, whatever its boot took).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import run_program
from vmckpt.storage import open_store

PHASES = ("pause", "drain", "commit", "committed")


class Holding:
    """The engine's store, holding at the drain or commit of the checkpoint hold() names."""

    def __init__(self, store: Any, hold: Any) -> None:
        self._store, self._hold = store, hold
        self.committed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_pages(self, *args: Any) -> Any:
        # The first batch of checkpoint N's pages, in its pre-arm or after its pause, whichever
        # comes first: a pause whose drain finds nothing left (a starved guest) cannot skip it.
        self._hold("drain", self.committed + 1)
        return self._store.put_pages(*args)

    def commit_checkpoint(self, *args: Any) -> int:
        self._hold("commit", self.committed + 1)
        ckpt = self._store.commit_checkpoint(*args)
        self.committed = ckpt
        self._hold("committed", ckpt)
        return ckpt


def main() -> None:
    store_path, refdir, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    phase, _, n = os.environ.get("VMCKPT_TEST_HOLD", ":0").partition(":")
    assert phase in PHASES or not phase, phase
    seen, base = 0, None if os.environ.get("VMCKPT_TEST_HOLD_ON_SIGNAL") else 0

    def arm(*_: object) -> None:
        nonlocal base
        base = seen if base is None else base

    signal.signal(signal.SIGUSR1, arm)

    def hold(at: str, ckpt: int) -> None:
        # A drain from checkpoint n on: a checkpoint may copy nothing at all (the guest has not
        # started writing yet), and its drain then never reaches the store. HELD says which.
        if base is None or at != phase:
            return
        if ckpt == base + int(n) or at == "drain" and ckpt > base + int(n):
            print(f"HELD {at} {ckpt}", flush=True)
            threading.Event().wait()  # until the test's SIGKILL

    def save(engine: Engine) -> None:
        nonlocal seen
        seen += 1
        tmp = refdir / f".{seen}"
        tmp.write_bytes(hashlib.sha256(engine.tracker.ram_view()).digest())
        os.rename(tmp, refdir / f"{seen}.sha256")
        hold("pause", seen)

    def hook(engine: Engine) -> None:
        engine.on_paused = save
        engine.store = Holding(engine.store, hold)  # type: ignore[assignment]

    async def go() -> None:
        with open_store(store_path, create=True) as store:
            print("STARTED", flush=True)
            await run_program(argv, store, EngineOptions(
                interval=float(os.environ.get("VMCKPT_TEST_INTERVAL", "0.05")), copiers=2),
                              on_engine=hook, min_ram=4 << 20, detach_on_exit=True)

    asyncio.run(go())


if __name__ == "__main__":
    main()
