"""Materialise a checkpoint's RAM into a sparse file, bit-exact, readable by its owner only."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from vmckpt.storage.errors import Damaged, MissingPage
from vmckpt.storage.interface import PageStore
from vmckpt.storage.private import open_private

CHUNK = 1024  # distinct pages per read


@dataclass
class RestoreStats:
    pages: int
    unique_pages: int
    bytes: int
    seconds: float


def restore_image(store: PageStore, ckpt: int | str, path: str | Path, *, workers: int = 4,
                  progress: bool | None = None, exclusive: bool = False) -> RestoreStats:
    """Writes the RAM of checkpoint ckpt into path, a file only its owner can read (made so
    before any page goes in). exclusive: path must not exist yet, and is not followed if it
    is a symlink (a predictable name in a shared directory such as /dev/shm)."""
    t0 = time.perf_counter()
    rec = store.get_record(ckpt)
    pmap = store.read_map(rec["id"])
    pfns = pmap.nonzero_pfns()
    # Each distinct page is read once, wherever it appears.
    uniq, inverse = np.unique(pmap.ids[pfns], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    size = store.page_size
    if progress is None:
        progress = sys.stderr.isatty() and rec["ram_size"] >= 256 << 20
    fd = open_private(path, os.O_WRONLY | (os.O_EXCL | os.O_NOFOLLOW if exclusive else os.O_TRUNC))
    try:
        os.ftruncate(fd, rec["ram_size"])  # holes read as zeros: zero pages cost nothing

        def write_chunk(lo: int) -> int:
            hi = min(lo + CHUNK, len(uniq))
            pages = store.get_pages([bytes(u) for u in uniq[lo:hi]])
            for k, page in enumerate(pages):
                for j in order[starts[lo + k]:starts[lo + k + 1]]:
                    os.pwrite(fd, page, int(pfns[j]) * size)
            return int(starts[hi] - starts[lo])

        with ThreadPoolExecutor(workers) as pool, tqdm(
                total=len(pfns), unit="page", disable=not progress, desc="restore") as bar:
            try:
                for n in pool.map(write_chunk, range(0, len(uniq), CHUNK)):
                    bar.update(n)
            except Damaged as e:
                raise Damaged(e.store, f"checkpoint {rec['id']} cannot be restored: {e.what}",
                              (rec["id"],)) from None
            except MissingPage as e:
                raise MissingPage(f"checkpoint {rec['id']} cannot be restored: {e}") from None
    finally:
        os.close(fd)
    return RestoreStats(len(pfns), len(uniq), len(pfns) * size, time.perf_counter() - t0)
