"""Pause of the test guest under vmckpt (each strategy), next to QEMU's own snapshots on the same
guest in the same run: a paused full `migrate` to a file, and `background-snapshot`.

256 MiB and 1 GiB guests, idle and dirtying (5,000 pages/s over 64 MiB), 1 s interval. The
first two checkpoints of a run (all of RAM; the switch to async tracking) are not counted.
15 checkpoints of each strategy; QEMU's snapshots on wp's guest and on the default strategy's,
15 of each kind on each.
Pause (p50, p99, min, max), total time, bytes written per checkpoint and the interval kept.

    .venv/bin/pytest bench/bench_qemu.py --benchmark-only -s    # VMCKPT_BENCH_SIZES=256M,1G
"""

from __future__ import annotations

import asyncio
import os

import pytest
from vmckpt.lab.experiments import qemu_comparison

SIZES = os.environ.get("VMCKPT_BENCH_SIZES", "256M,1G").split(",")


@pytest.mark.parametrize("work", ["idle", "dirty"])
@pytest.mark.parametrize("size", SIZES)
def test_pause_vs_qemu_snapshots(benchmark, tmp_path, size, work):
    rows: list[dict] = []
    benchmark.pedantic(lambda: rows.extend(asyncio.run(qemu_comparison(
        tmp_path, mem=size, work=work))), rounds=1, iterations=1)
    print(f"\n{size} guest, {work}: (pause median / p99 (min-max), total time median, MB per "
          "checkpoint, interval kept; QEMU's paused migrate pause / this pause, "
          "background-snapshot bytes / these bytes, QEMU's on the guest named)")
    for row in rows:
        kind = row["kind"] + (f" on {row['guest']}" if row["kind"].startswith("qemu") else "")
        benchmark.extra_info[kind] = row
        print(f"  {kind:36s} pause {row['pause_p50_ms']:7.1f} / {row['pause_p99_ms']:7.1f} "
              f"({row['pause_min_ms']:.1f}-{row['pause_max_ms']:.1f}) ms  total "
              f"{row['total_p50_ms']:7.1f} ms  {row['MB_per_checkpoint']:7.2f} MB  every "
              f"{row['interval_eff_s']:.2f} s{' (stretched)' * row['interval_stretched']}  "
              f"x{row['migrate_pause_x']:5.1f}  x{row['bgsnap_bytes_x']:5.1f} "
              f"(QEMU on {row['ratios_vs_guest']})  (n={row['n']})")
