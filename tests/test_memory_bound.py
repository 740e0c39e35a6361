"""The engine's memory stays within --buffer however fast the guest writes (issue 12)."""

from __future__ import annotations

import asyncio
import re
import time
from asyncio.subprocess import PIPE
from pathlib import Path

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store


def anon_rss() -> int:
    """This process's anonymous resident memory, bytes (the tracker's batches live there)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", text).group(1)) << 10


def test_copy_on_write_waits_for_buffer_space_instead_of_allocating(tmp_path):
    # A 128 MiB guest, all of it owed, rewriting random pages unpaced while nothing is
    # collected for 3 s: a store a whole buffer behind. Copy-on-write used to allocate a batch
    # for every page the guest reached first (up to the whole owed set, kept for good); now
    # the fault thread takes the pool's reserve, then the guest's write waits for space.
    async def go() -> tuple[int, int, int]:
        async with await TrackedProgram.start(
                synth("--size", "128M", "--fill", "1", "--rate", "0", "--seed", "2"),
                tmp_path / "s.sock", copiers=1, buffer_bytes=1 << 20, min_ram=4 << 20,
                stdout=PIPE) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            tracker = prog.tracker
            before = anon_rss()
            owed = tracker.arm().units_owed
            tracker.release()
            t0 = tracker.counters()
            time.sleep(3)  # the stalled store: no collect
            grown = anon_rss() - before
            waits = (tracker.counters() - t0).cow_waits
            while tracker.collect() is not None:  # the checkpoint still drains whole
                pass
            return owed, grown, waits

    owed, grown, waits = asyncio.run(go())
    assert owed == 32768
    assert waits > 0
    assert grown < 16 << 20, f"the engine grew by {grown >> 20} MiB with a 1 MiB buffer"


def test_async_stop_and_copy_stays_within_the_buffer(tmp_path):
    # Async tracking copies the written set inside the pause. It used to copy all of it into
    # batches allocated outside the pool: 12,000 writes over a 64 MiB guest took ~8,500 pages
    # (~33 MiB) however small --buffer. Now a written set the pool cannot hold is drained as
    # under wp tracking (protected, copy-on-write), and a small one is still copied in the
    # pause. Every checkpoint still restores to the RAM at its pause.
    from test_consistency import check_all

    writes = [b"r 50 1\n", b"r 60 2\n", b"r 12000 3\n", b"r 40 4\n", b"r 12000 5\n"]
    refs: list[bytes] = []
    grown: list[int] = []

    def paused(engine: Engine) -> None:
        grown.append(anon_rss() - before)  # the stop-and-copy's batches are all held here
        refs.append(bytes(engine.tracker.ram_view()))

    async def go() -> list[dict]:
        nonlocal before
        async with await TrackedProgram.start(
                synth("--size", "64M", "--fill", "1", "--control", "--seed", "4"),
                tmp_path / "s.sock", copiers=1, buffer_bytes=1 << 20, tracking="async",
                min_ram=4 << 20, stdin=PIPE, stdout=PIPE) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            with open_store(tmp_path / "store", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store,
                                EngineOptions(copiers=1, buffer_bytes=1 << 20,
                                              tracking="async", pre_arm=0.0),
                                on_paused=paused)
                records = [await engine.checkpoint()]
                for line in writes:
                    prog.proc.stdin.write(line)
                    assert (await prog.proc.stdout.readline()).strip() == b"ok"
                    before = anon_rss()
                    records.append(await engine.checkpoint())
                return records

    before = 0
    records = asyncio.run(go())
    check_all(tmp_path / "store", refs, tmp_path)
    in_pause = [r["copied_in_pause"] for r in records[1:]]
    dirtied = [r["pages_dirtied"] for r in records[1:]]
    assert [c > 0 for c in in_pause] == [True, True, False, True, False], (in_pause, dirtied)
    assert min(dirtied[2], dirtied[4]) > 8000, dirtied
    assert max(grown[1:]) < 8 << 20, f"the pause grew the engine by {max(grown) >> 20} MiB"
