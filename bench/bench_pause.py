"""Pause is O(dirty pages), not O(RAM); and how close it is to the bare minimum.

For each RAM size the guest dirties the same set of pages between checkpoints. Side by side in
one run: the engine's pause (SIGSTOP -> arm -> SIGCONT) and the bare cost of SIGSTOP/SIGCONT
plus write-protecting that same dirty set in coalesced runs on the same uffd.

    .venv/bin/pytest bench/bench_pause.py --benchmark-only
    VMCKPT_BENCH_SIZES=256M,1G,4G ... for the full sizes (default 256M,1G)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from asyncio.subprocess import PIPE

import numpy as np
import pytest
from vmckpt.engine._native import ffi, lib
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.engine.synthguest import command as synth
from vmckpt.storage import open_store

DIRTY = 26214  # 10 % of 1 GiB in 4 KiB pages
SIZES = os.environ.get("VMCKPT_BENCH_SIZES", "256M,1G").split(",")
ROUNDS = 7


def _bytes(size: str) -> int:
    return int(size[:-1]) << {"M": 20, "G": 30}[size[-1]]


@pytest.mark.parametrize("size", SIZES)
def test_pause_vs_bare(benchmark, tmp_path, size):
    loop = asyncio.new_event_loop()
    npages = _bytes(size) // 4096
    dirty = min(DIRTY, npages // 2)
    pfns = np.sort(np.random.default_rng(1).choice(npages, dirty, replace=False))
    pause, bare = [], []
    units = ffi.from_buffer("uint64_t[]", pfns.astype(np.uint64))
    nruns = ffi.new("uint64_t *")

    async def setup():
        prog = await TrackedProgram.start(
            synth("--size", size, "--fill", "0.2", "--control"), tmp_path / "s.sock",
            min_ram=4 << 20, stdin=PIPE, stdout=PIPE)
        await prog.proc.stdout.readline()
        store = open_store(tmp_path / "store", create=True)
        engine = Engine(prog.target, prog.tracker, store, EngineOptions())
        await engine.checkpoint()
        return prog, store, engine

    prog, store, engine = loop.run_until_complete(setup())
    proc, target, tracker = prog.proc, prog.target, prog.tracker

    async def dirty_pages():
        # A partial write to each page of the same set, every round, in one pipe write.
        proc.stdin.write(b"".join(f"p {p} 0 {os.urandom(8).hex()}\n".encode() for p in pfns))
        await proc.stdin.drain()
        for _ in pfns:
            await proc.stdout.readline()

    async def bare_pause() -> float:
        # Runs of consecutive pfns, as the tracker coalesces them.
        t0 = time.perf_counter()
        await target.pause()
        lib.trk_wp_units(tracker.uffd, tracker.ram.addr, units, len(pfns), 4096, nruns)
        await target.resume()
        return time.perf_counter() - t0

    def one_round():
        loop.run_until_complete(dirty_pages())
        rec = loop.run_until_complete(engine.checkpoint())
        pause.append(rec["pause"])
        loop.run_until_complete(dirty_pages())
        bare.append(loop.run_until_complete(bare_pause()))
        loop.run_until_complete(engine.checkpoint())  # take the baseline's writes too

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(prog.close())
        store.close()
        loop.close()
    med_p, med_b = statistics.median(pause), statistics.median(bare)
    benchmark.extra_info.update({
        "ram": size, "dirty_pages": int(dirty), "pause_median_ms": med_p * 1e3,
        "bare_stop_wp_cont_median_ms": med_b * 1e3, "ratio": med_p / med_b})
    print(f"\n{size}: dirty {dirty} pages, pause median {med_p * 1e3:.2f} ms, bare "
          f"SIGSTOP+wp+SIGCONT {med_b * 1e3:.2f} ms, ratio {med_p / med_b:.2f}")
