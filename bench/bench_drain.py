"""Drain throughput (copy + hash + store) next to its two limits, measured in the same run.

A 256 MiB guest full of distinct pages: its first checkpoint owes every page. Every round
measures, side by side: the engine's drain with 1 and with 2 copier threads, a plain C memcpy +
SHA-256 of the same pages on one thread, a bare RocksDB ingest of the same pages with the
store's options (no WAL, flush at the end), and the disk's raw write bandwidth. Every ratio
divides a drain by a limit of the same round, and is printed with both.

    .venv/bin/pytest bench/bench_drain.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import os
import time
from asyncio.subprocess import PIPE

import numpy as np
from rocksdict import Rdict, WriteBatch, WriteOptions
from vmckpt.engine._native import ffi, lib
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store
from vmckpt.storage.rocks import _options

SIZE = "256M"
ROUNDS = 3


def bare_ingest(path, pages: np.ndarray, ids: np.ndarray) -> float:
    db = Rdict(str(path), _options())
    nowal = WriteOptions()
    nowal.disable_wal = True
    raw, raw_ids = memoryview(pages).cast("B"), ids.tobytes()
    t0 = time.perf_counter()
    for lo in range(0, len(pages), 2048):
        batch = WriteBatch(raw_mode=True)
        for i in range(lo, min(lo + 2048, len(pages))):
            batch.put(raw_ids[i * 32:(i + 1) * 32], raw[i * 4096:(i + 1) * 4096].tobytes())
        db.write(batch, nowal)
    db.flush()
    secs = time.perf_counter() - t0
    db.close()
    return secs


def memcpy_hash(pages: np.ndarray) -> float:
    ids = np.empty((len(pages), 32), np.uint8)
    zero = np.empty(len(pages), np.uint8)
    copy = np.empty_like(pages)
    t0 = time.perf_counter()
    np.copyto(copy, pages)
    lib.trk_hash_pages(ffi.from_buffer("uint8_t[]", copy), len(copy),
                       ffi.from_buffer("uint8_t[]", ids), ffi.from_buffer("uint8_t[]", zero))
    return time.perf_counter() - t0


def disk_write(path, nbytes: int) -> float:
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(nbytes >> 20):
            os.write(fd, chunk)
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


COPIERS = (1, 2)
LIMITS = {"ingest": "bare RocksDB ingest", "memcpy_hash": "memcpy+SHA-256 (1 thread)"}


async def drain(tmp_path, name: str, copiers: int) -> tuple[float, np.ndarray]:
    """The engine's first checkpoint of a guest full of distinct pages (it owes every page):
    drain + commit seconds, and the pages (the guest's RAM after it)."""
    async with await TrackedProgram.start(
            synth("--size", SIZE, "--fill", "1", "--control"), tmp_path / f"{name}.sock",
            copiers=copiers, min_ram=4 << 20, stdin=PIPE, stdout=PIPE) as prog:
        await prog.proc.stdout.readline()
        with open_store(tmp_path / f"store-{name}", create=True) as store:
            rec = await Engine(prog.target, prog.tracker, store,
                               EngineOptions(copiers=copiers)).checkpoint()
        pages = np.frombuffer(bytes(prog.tracker.ram_view()), np.uint8).reshape(-1, 4096)
    return rec["drain_time"] + rec["commit_time"], pages


def one_round(tmp_path, run: int) -> dict[str, float]:
    """One round, every figure side by side: the drain with each copier count, then the limits
    on the same pages; MB/s each, and each drain's ratio to each limit of this round."""
    secs = {}
    for n in COPIERS[::-1] if run % 2 else COPIERS:  # each goes first in turn
        secs[f"drain_{n}"], pages = asyncio.run(drain(tmp_path, f"{run}-{n}", n))
    size = pages.nbytes
    ids = np.frombuffer(os.urandom(32 * len(pages)), np.uint8).reshape(-1, 32)
    secs["memcpy_hash"] = memcpy_hash(pages)
    secs["ingest"] = bare_ingest(tmp_path / f"bare{run}", pages, ids)
    secs["disk"] = disk_write(tmp_path / "raw", size)
    mbs = {k: size / v / 1e6 for k, v in secs.items()}
    for n in COPIERS:
        for limit in LIMITS:
            mbs[f"drain_{n}_over_{limit}"] = mbs[f"drain_{n}"] / mbs[limit]
    return mbs


def test_drain_vs_limits(benchmark, tmp_path):
    rounds: list[dict[str, float]] = []
    runs = iter(range(100))
    benchmark.pedantic(lambda: rounds.append(one_round(tmp_path, next(runs))), rounds=ROUNDS,
                       iterations=1)
    print(f"\n{SIZE} of distinct pages, {ROUNDS} rounds; each ratio divides by the limit "
          "measured in the same round:")
    for i, r in enumerate(rounds, 1):
        print(f"  round {i}: " + "; ".join(
            f"drain, {n} copier{'s' * (n > 1)}, {r[f'drain_{n}']:.0f} MB/s / bare RocksDB "
            f"ingest {r['ingest']:.0f} MB/s = ×{r[f'drain_{n}_over_ingest']:.2f}"
            for n in COPIERS) + f"; memcpy+SHA-256 (1 thread) {r['memcpy_hash']:.0f} MB/s; "
            f"raw disk write {r['disk']:.0f} MB/s")
    median = {}
    for n in COPIERS:
        # The round whose ratio is the median: its drain and its limit, never two rounds' mix.
        mid = sorted(rounds, key=lambda r: r[f"drain_{n}_over_ingest"])[len(rounds) // 2]
        median[n] = {"drain_MBps": mid[f"drain_{n}"], "bare_rocksdb_ingest_MBps": mid["ingest"],
                     "memcpy_sha256_1thread_MBps": mid["memcpy_hash"],
                     "disk_write_MBps": mid["disk"],
                     "drain_over_bare_ingest": mid[f"drain_{n}_over_ingest"],
                     "drain_over_memcpy_sha256": mid[f"drain_{n}_over_memcpy_hash"]}
        m = median[n]
        print(f"  median round, {n} copier{'s' * (n > 1)}: drain {m['drain_MBps']:.0f} MB/s / "
              f"bare RocksDB ingest {m['bare_rocksdb_ingest_MBps']:.0f} MB/s in that round = "
              f"×{m['drain_over_bare_ingest']:.2f}; / memcpy+SHA-256 "
              f"{m['memcpy_sha256_1thread_MBps']:.0f} MB/s = ×{m['drain_over_memcpy_sha256']:.2f}"
              + ("  (above 1: bare ingest was not this drain's bound)"
                 if m["drain_over_bare_ingest"] > 1 else ""))
    benchmark.extra_info.update({"size": SIZE, "rounds": rounds,
                                 "median_round": {str(n): m for n, m in median.items()}})
