"""Fault round trip as the writer sees it: the engine's tracker vs a bare uffd handler thread.

bench/faultprobe.c times first writes to write-protected, never-populated pages (so neither
handler copies anything): once with its own uffd and a bare handler thread (read the message,
un-protect), once handed over to the engine through the preload library. Alternated within one
run; the engine's own service time (fault read to un-protect) is reported next to them.

    .venv/bin/pytest bench/bench_fault.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
from asyncio.subprocess import PIPE
from pathlib import Path

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.storage import open_store

MIB, NPAGES, ROUNDS = 256, 20000, 5


def build_probe(out: Path) -> Path:
    src = Path(__file__).with_name("faultprobe.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(src)], check=True)
    return out


def test_fault_round_trip(benchmark, tmp_path):
    probe = build_probe(tmp_path / "faultprobe")
    got: dict[str, list[int]] = {}

    def bare() -> None:
        out = subprocess.run([probe, "bare", str(MIB), str(NPAGES)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out)
        got.setdefault("bare_p50", []).append(r["p50_ns"])
        got.setdefault("bare_p99", []).append(r["p99_ns"])

    async def engine(run: int) -> None:
        async with await TrackedProgram.start(
                [str(probe), "engine", str(MIB), str(NPAGES)], tmp_path / f"s{run}.sock",
                min_ram=4 << 20, stdin=PIPE, stdout=PIPE) as prog:
            assert (await prog.proc.stdout.readline()).strip() == b"READY"
            with open_store(tmp_path / f"store{run}", create=True) as store:
                await Engine(prog.target, prog.tracker, store, EngineOptions()).checkpoint()
                prog.tracker.take_fault_percentiles(0.5)  # only the probe's faults from here
                prog.proc.stdin.write(b"go\n")
                r = json.loads(await prog.proc.stdout.readline())
                assert r["n"] == NPAGES
                p50, p99 = prog.tracker.take_fault_percentiles(0.5, 0.99)
        got.setdefault("engine_p50", []).append(r["p50_ns"])
        got.setdefault("engine_p99", []).append(r["p99_ns"])
        got.setdefault("service_p50", []).append(int(p50 * 1e9))
        got.setdefault("service_p99", []).append(int(p99 * 1e9))

    runs = iter(range(100))

    def one_round() -> None:
        bare()
        asyncio.run(engine(next(runs)))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) / 1e3 for k, v in got.items()}  # µs
    benchmark.extra_info.update({f"{k}_us": v for k, v in med.items()})
    print(f"\nwriter-side fault round trip, medians of {ROUNDS} runs x {NPAGES} faults: engine "
          f"p50 {med['engine_p50']:.1f} µs, p99 {med['engine_p99']:.1f} µs; bare uffd thread "
          f"p50 {med['bare_p50']:.1f} µs, p99 {med['bare_p99']:.1f} µs; ratio p50 "
          f"{med['engine_p50'] / med['bare_p50']:.2f}, p99 "
          f"{med['engine_p99'] / med['bare_p99']:.2f}; engine service time (log2 bucket "
          f"bounds) p50 <= {med['service_p50']:.1f} µs, p99 <= {med['service_p99']:.1f} µs")
