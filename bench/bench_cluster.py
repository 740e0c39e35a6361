"""The Redis Cluster store next to the RocksDB store, side by side in one run: the engine's
drain of a guest full of distinct pages (its first checkpoint owes every page), a full restore
of that checkpoint, `push` of it from RocksDB into an empty cluster (pages/s), and the
cluster's server memory per stored page. The cluster is three masters of redis-server on
loopback started here (tests/redis_cluster.py), on the same cores as the engine.

    .venv/bin/pytest bench/bench_cluster.py --benchmark-only -s      (VMCKPT_BENCH_SIZE=256M)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import redis
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.engine.units import parse_size
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store, restore_image
from vmckpt.storage.transfer import copy_checkpoints

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from redis_cluster import Cluster  # noqa: E402 (the tests' cluster)

SIZE = os.environ.get("VMCKPT_BENCH_SIZE", "1G")


async def drain(tmp_path: Path, store_at: str) -> dict:
    async with await TrackedProgram.start(
            synth("--size", SIZE, "--fill", "1", "--control"), tmp_path / "guest.sock",
            copiers=2, min_ram=4 << 20, stdin=PIPE, stdout=PIPE) as prog:
        await prog.proc.stdout.readline()
        with open_store(store_at, create=True) as store:
            return await Engine(prog.target, prog.tracker, store,
                                EngineOptions(copiers=2)).checkpoint()


def restore_seconds(store_at: str, image: Path) -> float:
    with open_store(store_at, readonly=True) as s:
        t0 = time.perf_counter()
        restore_image(s, 1, image, progress=False)
        secs = time.perf_counter() - t0
    image.unlink()
    return secs


def used_memory(cluster: Cluster) -> int:
    return sum(int(redis.Redis(cluster.host, p).info("memory")["used_memory"])
               for p in cluster.ports)


def one_run(tmp_path: Path, cluster: Cluster) -> dict:
    pages = parse_size(SIZE) // 4096
    out: dict = {"size": SIZE, "pages": pages}
    stores = {"rocksdb": str(tmp_path / "store"), "cluster": cluster.url("bench")}
    base = used_memory(cluster)
    for name, at in stores.items():
        rec = asyncio.run(drain(tmp_path, at))
        secs = rec["drain_time"] + rec["commit_time"]
        out[f"{name}_drain_pages_per_s"] = pages / secs
        out[f"{name}_drain_s"] = secs
        if name == "cluster":
            out["server_bytes_per_page"] = (used_memory(cluster) - base) / pages
        out[f"{name}_restore_s"] = restore_seconds(at, tmp_path / "img")
    cluster.flush()  # an empty cluster: push sends every page
    with open_store(stores["rocksdb"], readonly=True) as src, \
            open_store(cluster.url("pushed"), create=True) as dst:
        done = copy_checkpoints(src, dst)
    out["push_pages_per_s"] = done.pages_sent / done.seconds
    out["push_pages_sent"] = done.pages_sent
    return out


def test_cluster_vs_rocksdb(benchmark, tmp_path):
    cluster = Cluster(tmp_path / "redis").start()
    runs: list[dict] = []
    try:
        benchmark.pedantic(lambda: runs.append(one_run(tmp_path, cluster)), rounds=1,
                           iterations=1)
    finally:
        cluster.stop()
    r = runs[0]
    print(f"\n{SIZE} guest of distinct pages ({r['pages']:,} pages), one run, 2 copiers, "
          "3-master cluster on loopback, same 2 cores:")
    print(f"  drain:   RocksDB {r['rocksdb_drain_pages_per_s']:,.0f} pages/s "
          f"({r['rocksdb_drain_s']:.2f} s), cluster {r['cluster_drain_pages_per_s']:,.0f} "
          f"pages/s ({r['cluster_drain_s']:.2f} s)")
    print(f"  restore: RocksDB {r['rocksdb_restore_s']:.2f} s, cluster "
          f"{r['cluster_restore_s']:.2f} s")
    print(f"  push RocksDB -> empty cluster: {r['push_pages_per_s']:,.0f} pages/s "
          f"({r['push_pages_sent']:,} pages)")
    print(f"  cluster server memory: {r['server_bytes_per_page']:,.0f} B per stored page")
    benchmark.extra_info.update(r)
