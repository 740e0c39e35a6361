"""Reads the blocks a disk view names (engine/qemu/fleece.py) through NBD with the guest
running, and puts them into the store like RAM pages: 4 KiB blocks, hashed by the tracker's own
hash, all-zero ones left as holes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from vmckpt.engine._native import ffi, lib
from vmckpt.engine.qemu.fleece import View
from vmckpt.engine.qemu.nbd import NbdExport
from vmckpt.engine.targets.base import DiskCopied
from vmckpt.storage import PageStore, StoreFull
from vmckpt.storage.pagemap import ID_BYTES

BLOCK = 4096
CHUNK = 256       # blocks a read (1 MiB)
CONNECTIONS = 2   # per disk: libnbd serialises one handle's requests
THREADS = "vmckpt-disk"  # the reading threads' names (seen in a debugger, and by the tests)


def chunks(extents: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(first block, blocks) reads covering the extents, on 4 KiB blocks, at most CHUNK each."""
    last = -(-size // BLOCK)
    out = []
    for off, length in extents.tolist():
        b, end = off // BLOCK, min(-(-(off + length) // BLOCK), last)
        if out and out[-1][0] + out[-1][1] > b:  # two extents within one block
            b = out[-1][0] + out[-1][1]
        while b < end:
            n = min(CHUNK, end - b)
            out.append((b, n))
            b += n
    return out


def hash_blocks(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty((len(pages), ID_BYTES), np.uint8)
    zero = np.empty(len(pages), np.uint8)
    lib.trk_hash_pages(ffi.from_buffer("uint8_t[]", pages), len(pages),
                       ffi.from_buffer("uint8_t[]", ids), ffi.from_buffer("uint8_t[]", zero))
    return ids, zero.astype(bool)


def drain_view(view: View, record: dict, store: PageStore) -> DiskCopied:
    """Every block the view names, into the store. A full store ends it with failed set (the
    checkpoint is then dropped); any other failure raises."""
    out = DiskCopied(record)
    with NbdExport(view.socket, view.export, view.context) as nbd:
        reads = chunks(nbd.written(), view.disk.size)
        if not reads:
            return out
        conns = [nbd] + [NbdExport(view.socket, view.export, view.context)
                         for _ in range(min(CONNECTIONS, len(reads)) - 1)]
        try:
            with ThreadPoolExecutor(len(conns), thread_name_prefix=THREADS) as pool:
                parts = list(pool.map(lambda k: _read_part(conns[k], reads[k::len(conns)],
                                                           view, record, store),
                                       range(len(conns))))
        finally:
            for c in conns[1:]:
                c.close()
    for part in parts:
        out.new, out.dup, out.bytes, out.zero = (out.new + part.new, out.dup + part.dup,
                                                 out.bytes + part.bytes, out.zero + part.zero)
        out.failed = out.failed or part.failed
    if not out.failed:
        out.pfns = np.concatenate([p.pfns for p in parts])
        out.ids = np.concatenate([p.ids for p in parts])
    return out


def _read_part(nbd: NbdExport, reads: list[tuple[int, int]], view: View, record: dict,
               store: PageStore) -> DiskCopied:
    out = DiskCopied(record)
    pfns, ids = [], []
    buf = np.zeros((CHUNK, BLOCK), np.uint8)
    size = view.disk.size
    for b, n in reads:
        pages = buf[:n]
        nbytes = min(n * BLOCK, size - b * BLOCK)  # a disk's last block may be partial
        if nbytes < n * BLOCK:
            pages[-1] = 0
        nbd.read_into(pages.reshape(-1)[:nbytes], b * BLOCK)
        got, zero = hash_blocks(pages)
        try:
            res = store.put_pages(got, pages)
        except StoreFull as e:
            out.failed = e
            return out
        out.new, out.dup, out.bytes = out.new + res.new, out.dup + res.dup, out.bytes + res.bytes
        out.zero += int(zero.sum())
        pfns.append(np.arange(view.first + b, view.first + b + n, dtype=np.uint64))
        ids.append(got)
    if pfns:
        out.pfns, out.ids = np.concatenate(pfns), np.concatenate(ids)
    return out
