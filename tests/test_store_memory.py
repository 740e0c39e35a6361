"""Issue 12 item 2 (the store's share): dedup asks the store, so the engine's memory does not
grow with the number of pages stored (it kept a Python set of every page id, ~120 B each,
read whole by the first put after an open)."""

from __future__ import annotations

import tracemalloc

import numpy as np
from vmckpt.storage import MapDelta, open_store
from vmckpt.storage.pagemap import page_ids

STORED = 16384  # 64 MiB of pages: the old set of their ids took ~2 MiB


def pages(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), np.uint8)


def test_dedup_memory_does_not_grow_with_the_store(tmp_path):
    path = tmp_path / "store"
    old = pages(1, STORED)
    ids = page_ids(old)
    with open_store(path, create=True) as s:
        for i in range(0, STORED, 2048):
            s.put_pages(ids[i:i + 2048], old[i:i + 2048])
        s.commit_checkpoint({"parent": None, "ram_size": STORED * 4096, "time": 0.0},
                            MapDelta(np.arange(STORED, dtype=np.uint64), ids))
    # After an open, one put of 64 pages: 32 stored long ago, 16 new, 16 repeats of those.
    new = pages(2, 16)
    mix = np.concatenate([old[::STORED // 32], new, new])
    mix_ids = page_ids(mix)
    with open_store(path) as s:
        tracemalloc.start()
        try:
            got = s.put_pages(mix_ids, mix)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (got.new, got.dup) == (16, 48)  # dedup stays exact
        assert s.has_pages(mix_ids).all()
        assert not s.has_pages(page_ids(pages(3, 4))).any()
    # The looked-up pages and the batch (~0.15 MiB here), nothing per stored page (the old
    # set: 1.5 MiB here).
    assert peak < 512 << 10, f"one put of 64 pages allocated {peak / 2**20:.1f} MiB"
