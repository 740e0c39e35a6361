"""The engine's memory stays within --buffer however fast the guest writes (issue 12)."""

from __future__ import annotations

import asyncio
import re
import time
from asyncio.subprocess import PIPE
from pathlib import Path

from vmckpt.engine.session import TrackedProgram
from vmckpt.engine.synthguest import command as synth


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
