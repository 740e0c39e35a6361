"""Materialise a checkpoint's RAM into a sparse file, bit-exact, readable by its owner only."""

from __future__ import annotations

import contextlib
import errno
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
from vmckpt.storage.regions import ram_region, region_named

CHUNK = 1024  # distinct pages per read


@dataclass
class RestoreStats:
    pages: int
    unique_pages: int
    bytes: int
    seconds: float


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite may write less than asked (a signal, a full file system): go on, or fail."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"wrote nothing at offset {offset}")
        view, offset = view[n:], offset + n


def _create(path: str | Path) -> tuple[int, bool]:
    """fd of path, made private (guest RAM, whatever the umask), and whether it was created
    here (then a failed restore removes it)."""
    try:
        return open_private(path, os.O_WRONLY | os.O_EXCL), True
    except FileExistsError:
        return open_private(path), False


def restore_image(store: PageStore, ckpt: int | str, path: str | Path | int, *, workers: int = 4,
                  progress: bool | None = None, disk: str | None = None) -> RestoreStats:
    """Writes checkpoint ckpt's RAM (or, given its device, one disk) into path (a file, created
    0600 and removed again if the restore fails or is interrupted), or into an open fd (the
    caller's, left as it is)."""
    t0 = time.perf_counter()
    rec = store.get_record(ckpt)
    region = ram_region(rec) if disk is None else region_named(rec, disk)
    pmap = store.read_map(rec["id"])
    pfns = pmap.nonzero_pfns()
    pfns = pfns[(pfns >= region.first) & (pfns < region.first + region.pages)]
    # Each distinct page is read once, wherever it appears.
    uniq, inverse = np.unique(pmap.ids[pfns], axis=0, return_inverse=True)
    pfns = pfns - region.first
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    size = store.page_size
    if progress is None:
        progress = sys.stderr.isatty() and region.size >= 256 << 20
    fd, created = (path, False) if isinstance(path, int) else _create(path)
    try:
        os.ftruncate(fd, region.size)  # holes read as zeros: zero pages cost nothing

        def write_chunk(lo: int) -> int:
            hi = min(lo + CHUNK, len(uniq))
            pages = store.get_pages([bytes(u) for u in uniq[lo:hi]])
            for k, page in enumerate(pages):
                for j in order[starts[lo + k]:starts[lo + k + 1]]:
                    at = int(pfns[j]) * size  # a disk's last block may be partial
                    _pwrite_all(fd, page[:region.size - at], at)
            return int(starts[hi] - starts[lo])

        pool = ThreadPoolExecutor(workers)
        try:
            with tqdm(total=len(pfns), unit="page", disable=not progress, desc="restore") as bar:
                for n in pool.map(write_chunk, range(0, len(uniq), CHUNK)):
                    bar.update(n)
        except Damaged as e:
            raise Damaged(e.store, f"checkpoint {rec['id']} cannot be restored: {e.what}",
                          (rec["id"],)) from None
        except MissingPage as e:
            raise MissingPage(f"checkpoint {rec['id']} cannot be restored: {e}") from None
        finally:  # on Ctrl-C too: no chunk starts after this, none is left writing
            pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        if not isinstance(path, int):
            os.close(fd)
    return RestoreStats(len(pfns), len(uniq), len(pfns) * size, time.perf_counter() - t0)
