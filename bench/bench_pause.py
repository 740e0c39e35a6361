"""Pause is O(dirty pages), not O(RAM); and how close it is to the bare minimum.

For each RAM size the guest dirties the same set of pages between checkpoints (26,214 random
pages: 40 % of 256 MiB, 10 % of 1 GiB, 2.5 % of 4 GiB). Side by side in one run: the engine's
pause (SIGSTOP -> arm -> SIGCONT) and a bare baseline that shares none of the engine's code:
os.kill SIGSTOP, wait until every thread is stopped, one plain UFFDIO_WRITEPROTECT per run of
consecutive dirty pages (bench/barewp.c, no gap merging), os.kill SIGCONT, on the same uffd.

    .venv/bin/pytest bench/bench_pause.py --benchmark-only
    VMCKPT_BENCH_SIZES=256M,1G,4G ... for the full sizes (default 256M,1G)
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import statistics
import subprocess
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import numpy as np
import pytest
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

DIRTY = 26214  # 4 KiB pages: 40 % of 256 MiB, 10 % of 1 GiB
SIZES = os.environ.get("VMCKPT_BENCH_SIZES", "256M,1G").split(",")
ROUNDS = 7


def _bytes(size: str) -> int:
    return int(size[:-1]) << {"M": 20, "G": 30}[size[-1]]


def bare_wp(out: Path) -> ctypes.CDLL:
    """bench/barewp.c built into out: bare_wp_runs(uffd, base, pfns, n, page)."""
    src = Path(__file__).with_name("barewp.c")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.bare_wp_runs.restype = ctypes.c_int64
    lib.bare_wp_runs.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p,
                                 ctypes.c_uint64, ctypes.c_uint64]
    return lib


def all_stopped(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "tT":
            return False
    return True


@pytest.mark.parametrize("size", SIZES)
def test_pause_vs_bare(benchmark, tmp_path, size):
    loop = asyncio.new_event_loop()
    npages = _bytes(size) // 4096
    dirty = min(DIRTY, npages // 2)
    pfns = np.sort(np.random.default_rng(1).choice(npages, dirty, replace=False))
    pause, bare = [], []
    pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
    bare_lib = bare_wp(tmp_path / "barewp.so")
    runs: list[int] = []

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
    proc, tracker = prog.proc, prog.tracker

    async def dirty_pages():
        # A partial write to each page of the same set, every round, in one pipe write.
        proc.stdin.write(b"".join(f"p {p} 0 {os.urandom(8).hex()}\n".encode() for p in pfns))
        await proc.stdin.drain()
        for _ in pfns:
            await proc.stdout.readline()

    def bare_pause() -> float:
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGSTOP)
        while not all_stopped(proc.pid):
            pass
        n = bare_lib.bare_wp_runs(tracker.uffd, tracker.ram.addr, pfns.ctypes.data, len(pfns),
                                  4096)
        os.kill(proc.pid, signal.SIGCONT)
        took = time.perf_counter() - t0
        assert n > 0, f"UFFDIO_WRITEPROTECT failed: {os.strerror(-n)}"
        runs.append(n)
        return took

    def one_round():
        loop.run_until_complete(dirty_pages())
        rec = loop.run_until_complete(engine.checkpoint())
        pause.append(rec["pause"])
        loop.run_until_complete(dirty_pages())
        bare.append(bare_pause())
        loop.run_until_complete(engine.checkpoint())  # take the baseline's writes too

    try:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        loop.run_until_complete(prog.close())
        store.close()
        loop.close()
    med_p, med_b = statistics.median(pause), statistics.median(bare)
    benchmark.extra_info.update({
        "ram": size, "dirty_pages": int(dirty), "dirty_share": dirty / npages,
        "bare_wp_runs": runs[0], "pause_median_ms": med_p * 1e3,
        "bare_stop_wp_cont_median_ms": med_b * 1e3, "ratio": med_p / med_b})
    print(f"\n{size}: dirty {dirty} of {npages} pages ({100 * dirty / npages:.0f} %), engine "
          f"pause median {med_p * 1e3:.2f} ms, bare SIGSTOP + {runs[0]} UFFDIO_WRITEPROTECT + "
          f"SIGCONT {med_b * 1e3:.2f} ms, ratio {med_p / med_b:.2f} ({ROUNDS} rounds each)")
