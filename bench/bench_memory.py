"""Engine memory under a guest that dirties faster than the store ingests (issue 12, target 3).

`vmckpt run` checkpoints a 512 MiB synthetic guest rewriting its RAM unpaced, every 0.1 s, with
`--buffer 64M`; the engine process's resident memory is sampled every 0.5 s for 60 s
(VMCKPT_BENCH_SECONDS), three times: on a fresh store, then on the store each run filled. The
engine maps guest RAM read-only, so its RSS also counts the guest's pages it has read
(RssShmem, shared with the guest): the engine's own memory is RssAnon plus RssFile, reported
apart.

    .venv/bin/pytest bench/bench_memory.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmckpt.lab.synthguest import command as synth

SECONDS = float(os.environ.get("VMCKPT_BENCH_SECONDS", "60"))
RUNS = 3  # into one store: fresh, then as each run left it
VMCKPT = Path(sys.executable).with_name("vmckpt")
FIELDS = ("RssAnon", "RssFile", "RssShmem")


def rss(pid: int) -> dict[str, int]:
    """The RSS parts of pid, MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {f: int(re.search(rf"{f}:\s+(\d+) kB", text).group(1)) >> 10 for f in FIELDS}


def store_mib(store: Path) -> int:
    return sum(f.stat().st_size for f in store.iterdir() if f.is_file()) >> 20


def sample(argv: list[str]) -> list[tuple[float, dict[str, int]]]:
    """One run of SECONDS, its RSS every 0.5 s."""
    samples = []
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while (t := time.monotonic() - t0) < SECONDS and proc.poll() is None:
            samples.append((t, rss(proc.pid)))
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)  # commits the checkpoint in flight, stops the guest
        proc.wait(timeout=120)
    return samples


def test_engine_memory_stays_bounded(benchmark, tmp_path):
    # RUNS runs into the same store, each starting on the store the last one filled, so that a
    # bound that held only for a small store would show.
    store = tmp_path / "store"
    argv = [str(VMCKPT), "run", "--interval", "0.1", "--buffer", "64M", "--store", str(store),
            "--", *synth("--size", "512M", "--fill", "1", "--rate", "0", "--partial", "0.3",
                         "--seed", "1")]
    runs: list[dict] = []

    def run() -> None:
        for _ in range(RUNS):
            before = store_mib(store) if store.exists() else 0
            samples = sample(argv)
            own = [(t, s["RssAnon"] + s["RssFile"]) for t, s in samples]
            half = [m for t, m in own if t >= SECONDS / 2]
            runs.append({
                "store_mib_at_start": before,
                "own_mib_max": max(m for _, m in own), "own_mib_last": own[-1][1],
                "own_mib_second_half": [min(half), max(half)],
                "shmem_mib_max": max(s["RssShmem"] for _, s in samples),
                "series": [(round(t, 1), m) for t, m in own[::10]],
            })

    benchmark.pedantic(run, rounds=1, iterations=1)
    ls = subprocess.run([str(VMCKPT), "ls", "--json", "--store", str(store)],
                        capture_output=True, text=True, check=True)
    records = json.loads(ls.stdout)
    info = {
        "seconds": SECONDS, "checkpoints": len(records),
        "stretched": sum(bool(r.get("interval_stretched")) for r in records),
        "pages_dirtied": sum(r.get("pages_dirtied", 0) for r in records),
        "store_mib_at_end": store_mib(store), "runs": runs,
    }
    benchmark.extra_info.update(info)
    print(f"\n{info['checkpoints']} checkpoints in {RUNS} x {SECONDS:g} s ({info['stretched']} "
          f"stretched: the store is the bound), {info['pages_dirtied']} pages dirtied, store "
          f"{info['store_mib_at_end']} MiB at the end")
    for i, r in enumerate(runs, 1):
        lo, hi = r["own_mib_second_half"]
        print(f"run {i} (store {r['store_mib_at_start']} MiB at start): engine's own memory "
              f"(RssAnon+RssFile) max {r['own_mib_max']} MiB, second half {lo}-{hi} MiB, last "
              f"{r['own_mib_last']} MiB; guest RAM read through its view (RssShmem, shared) "
              f"max {r['shmem_mib_max']} MiB")
        print("  t (s), MiB:", " ".join(f"{t}:{m}" for t, m in r["series"]))
