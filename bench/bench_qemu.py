"""Pause of the test guest under vmckpt, next to QEMU's own snapshots on the same guest in the
same run: a paused full `migrate` to a file, and `background-snapshot`.

For 256 MiB and 1 GiB guests, idle and dirtying (5,000 pages/s over 64 MiB): boot the guest
under the engine, take checkpoints at a 1 s interval (the first, which owes all populated RAM,
is not counted), then let go of the guest (QEMU's background snapshot needs the userfaultfd
registration itself) and take QEMU's two kinds of snapshot, each a few times, 1 s apart.
Pause, total time and bytes written per checkpoint for each.

    .venv/bin/pytest bench/bench_qemu.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import numpy as np
import pytest
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.qmp import Qmp
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import TrackedProgram
from vmckpt.storage import open_store

CHECKPOINTS, QEMU_SNAPSHOTS = 10, 3
SIZES = os.environ.get("VMCKPT_BENCH_SIZES", "256M,1G").split(",")


async def qemu_snapshot(qmp: Qmp, path, *, background: bool) -> tuple[float, float, int]:
    """One QEMU snapshot of the whole VM into path: (pause, total time, bytes)."""
    await qmp.set_capability("x-ignore-shared", False)
    await qmp.set_capability("background-snapshot", background)
    # QEMU's best: no bandwidth limit (the default, 128 MiB/s, is meant for live migration).
    await qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await qmp.send_fd(fd, "snapshot")
    finally:
        os.close(fd)
    t0 = time.perf_counter()
    if not background:
        await qmp.cmd("stop")
    await qmp.cmd("migrate", uri="fd:snapshot")
    info = await qmp.wait_migration()
    if not background:
        await qmp.cmd("cont")
    total = time.perf_counter() - t0
    await qmp.set_capability("background-snapshot", False)
    pause = info["downtime"] / 1e3 if background else total
    size = os.path.getsize(path)
    os.unlink(path)
    return pause, total, size


async def measure(tmp_path, size: str, work: str) -> dict[str, list[tuple[float, float, int]]]:
    log = tmp_path / f"serial-{size}-{work}.log"
    argv = qemu_argv(mem=size, work=work, rate=5000, mb=64, serial=f"file:{log}")
    out: dict[str, list[tuple[float, float, int]]] = {}
    async with await TrackedProgram.start(argv, tmp_path / "e.sock") as prog:
        while not (log.exists() and ticks(log.read_bytes())):
            await asyncio.sleep(0.1)
        with open_store(tmp_path / f"store-{size}-{work}", create=True) as store:
            engine = Engine(prog.target, prog.tracker, store, EngineOptions(interval=1.0))
            await engine.run(asyncio.Event(), max_checkpoints=CHECKPOINTS + 1)
        out["vmckpt"] = [(r["pause"], r["pause"] + r["drain_time"] + r["commit_time"],
                          r["bytes_added"] + r["device_state"]["size"])
                         for r in engine.records[1:]]
        prog.tracker.close()  # QEMU's background snapshot registers guest RAM itself
        qmp = prog.target.qmp  # type: ignore[attr-defined]
        for kind, background in (("qemu migrate (paused)", False),
                                 ("qemu background-snapshot", True)):
            for _ in range(QEMU_SNAPSHOTS):
                await asyncio.sleep(1.0)
                out.setdefault(kind, []).append(
                    await qemu_snapshot(qmp, tmp_path / "snap", background=background))
    return out


@pytest.mark.parametrize("work", ["idle", "dirty"])
@pytest.mark.parametrize("size", SIZES)
def test_pause_vs_qemu_snapshots(benchmark, tmp_path, size, work):
    results = {}
    benchmark.pedantic(lambda: results.update(asyncio.run(measure(tmp_path, size, work))),
                       rounds=1, iterations=1)
    print(f"\n{size} guest, {work}: (pause median / p99, total time median, MB per checkpoint)")
    for kind, rows in results.items():
        pauses = [p for p, _, _ in rows]
        row = {"pause_median_ms": statistics.median(pauses) * 1e3,
               "pause_p99_ms": float(np.percentile(pauses, 99)) * 1e3,
               "total_median_ms": statistics.median(t for _, t, _ in rows) * 1e3,
               "MB_per_checkpoint": statistics.median(b for _, _, b in rows) / 1e6}
        benchmark.extra_info[kind] = row
        print(f"  {kind:26s} pause {row['pause_median_ms']:8.1f} / {row['pause_p99_ms']:8.1f} ms"
              f"  total {row['total_median_ms']:8.1f} ms  {row['MB_per_checkpoint']:8.2f} MB"
              f"  (n={len(rows)})")
