"""Target 2: a checkpoint stores only what changed and is new; its figures say what happened."""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store


class Guest:
    """The synthetic guest in control mode: the test says exactly which pages it writes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def cmd(self, line: str) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        assert (await self.proc.stdout.readline()).strip() == b"ok"


async def scripted_run(store_path, script) -> list[dict]:
    with open_store(store_path, create=True) as store:
        async with await TrackedProgram.start(
                synth("--size", "16M", "--fill", "0", "--control"),
                store_path.parent / "s.sock", copiers=2, min_ram=4 << 20, stdin=PIPE,
                stdout=PIPE) as prog:
            assert prog.proc.stdout
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            engine = Engine(prog.target, prog.tracker, store, EngineOptions())
            await script(Guest(prog.proc), engine)
        return store.list_checkpoints()


def test_figures_follow_known_writes(tmp_path):
    async def script(g: Guest, engine: Engine) -> None:
        await engine.checkpoint()                       # 1: nothing populated yet
        for pfn in range(10):
            await g.cmd(f"w {pfn} {pfn + 1}")           # 10 unique pages
        for pfn in range(10, 15):
            await g.cmd(f"d {pfn} 0")                   # 5 copies of one popular page
        for pfn in range(15, 18):
            await g.cmd(f"z {pfn}")                     # 3 zero pages
        await engine.checkpoint()                       # 2
        for pfn in range(10):
            await g.cmd(f"w {pfn} {pfn + 1}")           # same content again
        await engine.checkpoint()                       # 3
        for pfn in range(100, 105):
            await g.cmd(f"w {pfn} 1")                   # content seen in checkpoint 2
        await g.cmd("p 0 100 ff")                       # one byte changes on page 0
        await engine.checkpoint()                       # 4
        await engine.checkpoint()                       # 5: idle

    recs = asyncio.run(scripted_run(tmp_path / "store", script))
    got = [(r["pages_dirtied"], r["pages_stored_new"], r["dedup_hits"], r["zero_pages"],
            r["pages_changed"], r["bytes_added"]) for r in recs]
    assert got == [
        (0, 0, 0, 0, 0, 0),
        (18, 11, 4, 3, 15, 11 * 4096),
        (10, 0, 10, 0, 0, 0),
        (6, 1, 5, 0, 6, 4096),
        (0, 0, 0, 0, 0, 0),
    ]
    assert [r["parent"] for r in recs] == [None, 1, 2, 3, 4]


def test_dedup_spans_all_history_not_only_the_parent(tmp_path):
    async def first(g: Guest, engine: Engine) -> None:
        for pfn in range(8):
            await g.cmd(f"w {pfn} {pfn + 100}")
        await engine.checkpoint()

    async def second(g: Guest, engine: Engine) -> None:
        for pfn in range(50, 58):                       # a new run (a new root): same content
            await g.cmd(f"w {pfn} {pfn + 50}")
        await engine.checkpoint()

    store = tmp_path / "store"
    assert asyncio.run(scripted_run(store, first))[0]["pages_stored_new"] == 8
    recs = asyncio.run(scripted_run(store, second))
    assert recs[1]["parent"] is None
    assert (recs[1]["pages_stored_new"], recs[1]["dedup_hits"]) == (0, 8)
