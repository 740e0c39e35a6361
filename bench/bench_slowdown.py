"""Guest slowdown: the synthetic guest's own write throughput with checkpointing off and on.

Same guest, same seed, same duration, in one run: off, on (at 1 s, or 0.25 s), off again.
slowdown = 1 - on / the mean of the two offs (both reported, and the interval kept).

    .venv/bin/pytest bench/bench_slowdown.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess

import pytest
from vmckpt.engine.cycle import EngineOptions
from vmckpt.engine.session import run_program
from vmckpt.lab.experiments import interval_kept
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

GUEST = ("--size", "256M", "--fill", "0.5", "--rate", "0", "--partial", "0.3", "--dup", "0.1",
         "--zero", "0.1", "--seed", "1", "--duration", "8")


def pages_per_s(out: str) -> float:
    return json.loads(out.strip().splitlines()[-1])["pages_per_s"]


def alone() -> float:
    return pages_per_s(subprocess.run(synth(*GUEST), capture_output=True, text=True,
                                      check=True).stdout)


@pytest.mark.parametrize("interval", [1.0, 0.25])
def test_slowdown(benchmark, tmp_path, interval, capfd):
    before = alone()

    async def on() -> None:
        with open_store(tmp_path / "store", create=True) as store:
            await run_program(synth(*GUEST), store, EngineOptions(interval=interval),
                              min_ram=4 << 20)

    capfd.readouterr()
    benchmark.pedantic(lambda: asyncio.run(on()), rounds=1, iterations=1)
    on_rate = pages_per_s(capfd.readouterr().out)
    after = alone()
    off = (before + after) / 2
    with open_store(tmp_path / "store", readonly=True) as store:
        every = store.list_checkpoints()
    recs = [r for r in every if r["fault_service_p50"]]
    kept = interval_kept(every, interval)
    p50 = statistics.median(r["fault_service_p50"] for r in recs)
    p99 = max(r["fault_service_p99"] for r in recs)
    benchmark.extra_info.update({**kept, "off_before_pages_per_s": before,
                                 "off_after_pages_per_s": after, "off_pages_per_s": off,
                                 "on_pages_per_s": on_rate, "slowdown": 1 - on_rate / off,
                                 "fault_service_p50_us": p50 * 1e6,
                                 "fault_service_p99_us": p99 * 1e6})
    print(f"\ninterval {interval} s (kept {kept['interval_eff_s']:.2f} s"
          f"{', stretched' * kept['interval_stretched']}): off {before:.0f} pages/s before, "
          f"{after:.0f} after (mean {off:.0f}), on {on_rate:.0f} pages/s, "
          f"slowdown {1 - on_rate / off:.1%}; fault service (handler, log2 buckets) "
          f"p50 <= {p50 * 1e6:.1f} us, p99 <= {p99 * 1e6:.1f} us")
