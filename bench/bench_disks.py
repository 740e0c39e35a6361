"""Disks (issue 13, target 4), side by side on the same test guest in one run:

1. Pause with one 1 GiB raw disk captured against the same guest with no disk: runs of each,
   alternating (ROUNDS of each, CHECKPOINTS checkpoints a run at 0.5 s, the first two of a run
   not counted). The guest dirties 5,000 pages/s over 64 MiB; with the disk it also writes its
   tick to the disk every 0.5 s (O_DIRECT).
2. The guest's own disk write rate (64 KiB O_DIRECT writes of fresh data, as fast as they go,
   over the second half of a 1 GiB disk) with checkpointing on (every 1 s, the disk captured)
   against off (the same QEMU, no vmckpt), alternating, from the bytes the guest says it wrote
   over WINDOW seconds once it runs.

    .venv/bin/pytest bench/bench_disks.py --benchmark-only -s
    VMCKPT_BENCH_ROUNDS=N (default 2), VMCKPT_BENCH_CHECKPOINTS=N (default 15)
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import TrackedProgram
from vmckpt.storage import open_store

ROUNDS = int(os.environ.get("VMCKPT_BENCH_ROUNDS", "2"))
CHECKPOINTS = int(os.environ.get("VMCKPT_BENCH_CHECKPOINTS", "15"))
WINDOW = 10.0  # seconds of disk writing measured
DISK = 1 << 30
WRITTEN = re.compile(rb"VMCKPT-TICK (\d+) .*disk_bytes=(\d+)")


def _raw(path: Path) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


async def _booted(log: Path) -> None:
    while not (log.exists() and ticks(log.read_bytes())):
        await asyncio.sleep(0.1)


async def _pauses(tmp: Path, run: int, disk: bool) -> list[dict]:
    log = tmp / f"pause-{run}.log"
    argv = qemu_argv(mem="256M", work="dirty", rate=5000, mb=64, serial=f"file:{log}",
                     disk=f"file={_raw(tmp / 'pause.raw')},format=raw,cache=none"
                     if disk else None)
    async with await TrackedProgram.start(argv, tmp / "e.sock") as prog:
        await _booted(log)
        with open_store(tmp / f"store-pause-{run}", create=True) as store:
            engine = Engine(prog.target, prog.tracker, store, EngineOptions(interval=0.5))
            kept: list[dict] = []
            engine.on_committed = kept.append
            await engine.run(asyncio.Event(), max_checkpoints=CHECKPOINTS + 2)
    assert all(bool(r["disks"]) == disk for r in kept)
    return kept[2:]


def _written(log: Path) -> int:
    """The bytes the guest says it has written, at its last tick."""
    return int(WRITTEN.findall(log.read_bytes())[-1][1])


async def _over_window(log: Path) -> float:
    """Bytes a second the guest writes over WINDOW seconds of host time (from its ticks, every
    0.5 s: a little of the window's ends is lost, the same for both sides)."""
    t0, b0 = time.monotonic(), _written(log)
    await asyncio.sleep(WINDOW)
    return (_written(log) - b0) / (time.monotonic() - t0)


async def _write_rate(tmp: Path, run: int, checkpointing: bool) -> float:
    log = tmp / f"write-{run}-{'on' if checkpointing else 'off'}.log"
    argv = qemu_argv(mem="256M", work="diskwrite", mb=16, serial=f"file:{log}",
                     disk=f"file={_raw(tmp / 'write.raw')},format=raw,cache=none")
    if not checkpointing:
        proc = subprocess.Popen(argv)
        try:
            await _booted(log)
            return await _over_window(log)
        finally:
            proc.kill()
            proc.wait()
    async with await TrackedProgram.start(argv, tmp / "e.sock") as prog:
        await _booted(log)
        with open_store(tmp / f"store-write-{run}", create=True) as store:
            engine = Engine(prog.target, prog.tracker, store, EngineOptions(interval=1.0))
            stop = asyncio.Event()
            task = asyncio.ensure_future(engine.run(stop))
            try:
                return await _over_window(log)
            finally:
                stop.set()
                await task


def _ms(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e3


def test_pause_with_a_1g_disk_and_the_guests_disk_write_rate(benchmark, tmp_path):
    results: dict = {}

    def measure() -> None:
        pauses: dict[bool, list[float]] = {True: [], False: []}
        rates: dict[bool, list[float]] = {True: [], False: []}
        for run in range(ROUNDS):
            for disk in (run % 2 == 0, run % 2 == 1):  # alternating which goes first
                pauses[disk] += [r["pause"] for r in asyncio.run(_pauses(tmp_path, run, disk))]
            for on in (run % 2 == 1, run % 2 == 0):
                rates[on].append(asyncio.run(_write_rate(tmp_path, run, on)))
        results.update({
            "pause_p50_ms": {"disk": _ms(pauses[True], 0.5), "none": _ms(pauses[False], 0.5)},
            "pause_p99_ms": {"disk": _ms(pauses[True], 0.99),
                             "none": _ms(pauses[False], 0.99)},
            "n": {"disk": len(pauses[True]), "none": len(pauses[False])},
            "write_MBps": {"on": statistics.median(rates[True]) / 1e6,
                           "off": statistics.median(rates[False]) / 1e6},
            "write_runs_MBps": {"on": [r / 1e6 for r in rates[True]],
                                "off": [r / 1e6 for r in rates[False]]},
        })

    t0 = time.perf_counter()
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    p50, p99, w = results["pause_p50_ms"], results["pause_p99_ms"], results["write_MBps"]
    print(f"\npause with a 1 GiB disk: p50 {p50['disk']:.2f} ms, p99 {p99['disk']:.2f} ms; "
          f"without: p50 {p50['none']:.2f} ms, p99 {p99['none']:.2f} ms "
          f"(+{p50['disk'] - p50['none']:.2f} ms at p50; n={results['n']})")
    print(f"guest disk writes: {w['on']:.1f} MB/s checkpointed every 1 s, {w['off']:.1f} MB/s "
          f"without ({w['on'] / w['off']:.2f}x; runs {results['write_runs_MBps']}); "
          f"{time.perf_counter() - t0:.0f} s")
