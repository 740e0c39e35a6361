"""Runs `vmckpt run`'s engine on a program and saves guest RAM at every pause into REFDIR.

The crash test kills this process with SIGKILL; the saved references tell what each
checkpoint that made it into the store must restore to.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import run_program
from vmckpt.storage import open_store


def main() -> None:
    store_path, refdir, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    seen = 0

    def save(engine: Engine) -> None:
        nonlocal seen
        seen += 1
        tmp = refdir / f".{seen}"
        tmp.write_bytes(engine.tracker.ram_view())
        os.rename(tmp, refdir / f"{seen}.ref")

    def hook(engine: Engine) -> None:
        engine.on_paused = save

    async def go() -> None:
        with open_store(store_path, create=True) as store:
            print("STARTED", flush=True)
            await run_program(argv, store, EngineOptions(interval=0.05, copiers=2),
                              on_engine=hook, min_ram=4 << 20, detach_on_exit=True)

    asyncio.run(go())


if __name__ == "__main__":
    main()
