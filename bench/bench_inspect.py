"""The inspector on a big store: `vmckpt ls`, `show`, `stats` on 1,000 checkpoints of a 1 GiB
guest, each timed as a user runs it (a fresh `vmckpt` process, interpreter start included).

The store is made through the store's own API, not by a 20-minute engine run: a first full
checkpoint of all 262,144 frames and 999 deltas of 1,000 random frames each, over a pool of
20,000 distinct stored pages (a full map every 16 checkpoints, as the engine writes).

    .venv/bin/pytest bench/bench_inspect.py --benchmark-only -s
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from vmckpt.storage import MapDelta, open_store
from vmckpt.storage.pagemap import page_ids

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))
CHECKPOINTS, FRAMES, POOL, DIRTY = 1000, (1 << 30) // 4096, 20_000, 1000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "store"
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, (POOL, 4096), np.uint8)
    ids = page_ids(pages)
    with open_store(path, create=True) as store:
        store.put_pages(ids, pages)
        parent = None
        for n in range(CHECKPOINTS):
            pfns = np.arange(FRAMES) if n == 0 else np.unique(rng.integers(0, FRAMES, DIRTY))
            delta = MapDelta(pfns.astype(np.uint64), ids[rng.integers(0, POOL, len(pfns))])
            record = {"parent": parent, "time": time.time() - (CHECKPOINTS - n),
                      "ram_size": FRAMES * 4096, "page_size": 4096,
                      "target": {"kind": "process", "name": "bench", "argv": None},
                      "pages_dirtied": len(pfns), "pages_stored_new": POOL if n == 0 else 0,
                      "dedup_hits": 0 if n == 0 else len(pfns), "zero_pages": 0,
                      "bytes_added": POOL * 4096 if n == 0 else 0,
                      "pages_changed": len(pfns), "device_state": None,
                      "pause": 0.005 + rng.random() * 0.01, "drain_time": 0.05,
                      "interval_stretched": False, "strategy": {}}
            parent = store.commit_checkpoint(record, delta)
    return path


@pytest.mark.parametrize("command", [["ls"], ["ls", "--json"], ["show", "latest"],
                                     ["show", "500"], ["stats"], ["stats", "--json"]])
def test_inspector_answers_fast(benchmark, big_store, command):
    def run() -> None:
        r = subprocess.run([VMCKPT, *command, "--store", str(big_store)], capture_output=True)
        assert r.returncode == 0, r.stderr
    benchmark.pedantic(run, rounds=3, iterations=1)
    print(f"\nvmckpt {' '.join(command)} on {CHECKPOINTS} checkpoints of a 1 GiB guest: "
          f"median {benchmark.stats.stats.median:.2f} s")
