"""One side of test_cluster_netns, run as its own program inside a network namespace (a host
that reaches the cluster only over the namespaces' bridge):

    netns_host.py checkpoint URL WORKDIR   the test guest checkpointed into URL; writes
                                           WORKDIR/pauses.json (RAM digest, tick at each pause)
    netns_host.py restore URL CKPT WORKDIR a new QEMU from CKPT; prints its RAM digest at
                                           load and the guest's serial output, as JSON
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

from test_qemu import restore_and_watch
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import run_program
from vmckpt.storage import open_store

CHECKPOINTS = 8


def checkpoint(url: str, workdir: Path) -> None:
    log = workdir / "serial.log"
    pauses: list[dict] = []
    enough = asyncio.Event()

    def paused(engine: Engine) -> None:
        found = ticks(log.read_bytes())
        pauses.append({"digest": hashlib.sha256(engine.tracker.ram_view()).hexdigest(),
                       "tick": found[-1][0] if found else 0,
                       "said": log.read_bytes().decode("latin-1")})
        if len(pauses) >= CHECKPOINTS and pauses[len(pauses) // 2]["tick"] >= 1:
            enough.set()

    async def run() -> None:
        with open_store(url, create=True) as s:
            await run_program(qemu_argv(mem="128M", work="dirty", rate=5000, mb=48,
                                        serial=f"file:{log}"),
                              s, EngineOptions(interval=0.5), max_checkpoints=80, stop=enough,
                              on_engine=lambda e: setattr(e, "on_paused", paused))

    asyncio.run(run())
    (workdir / "pauses.json").write_text(json.dumps(pauses))


def restore(url: str, ckpt: int, workdir: Path) -> None:
    loaded, said = restore_and_watch(url, ckpt, workdir)
    print(json.dumps({"digest": loaded.hex(), "said": said.decode("latin-1")}))


if __name__ == "__main__":
    if sys.argv[1] == "checkpoint":
        checkpoint(sys.argv[2], Path(sys.argv[3]))
    else:
        restore(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
