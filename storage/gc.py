"""Reclaiming pages no checkpoint needs: mark (the pages the stored maps and device states
name) and sweep (the store deletes the rest, sparing pages of a checkpoint in flight)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from vmckpt.storage.errors import StoreError
from vmckpt.storage.inspect import Problem, as_ids, decode_map, device_ids
from vmckpt.storage.interface import PageStore


@dataclass
class GcResult:
    dry_run: bool
    checkpoints: int
    pages_stored: int  # before
    pages_freed: int
    bytes_freed: int  # page bytes, before compression
    disk_bytes_before: int  # the pages' table files
    disk_bytes_after: int
    seconds: float


def referenced(store: PageStore) -> set[bytes]:
    """Every page id a committed checkpoint's restore reads. The union of the stored map
    blobs is exactly that, without building any whole map: each id in a checkpoint's full map
    or delta is in its own map, and each frame of its map comes from a blob of its chain, all
    of which are stored (prune rewrites a map whose chain it breaks)."""
    rows = []
    for rec in store.list_checkpoints():
        delta = decode_map(store, rec)
        if isinstance(delta, Problem):  # what it named is unknown: nothing may go
            raise StoreError(f"{delta.message}; gc refuses a damaged store (see vmckpt check)")
        rows.append(delta.ids)
        if rec.get("device_state"):
            device = device_ids(rec, store.page_size)
            if device is None:
                raise StoreError(f"checkpoint {rec['id']} has a malformed device state "
                                 "reference; gc refuses a damaged store (see vmckpt check)")
            rows.append(device)
    if not rows:
        return set()
    ids = np.concatenate(rows)
    return {pid.tobytes() for pid in np.unique(as_ids(ids[ids.any(axis=1)]))}


def collect_garbage(store: PageStore, *, dry_run: bool = False) -> GcResult:
    t0 = time.monotonic()
    before = store.disk_usage()["pages"]
    swept = store.sweep(lambda: referenced(store), dry_run=dry_run)
    return GcResult(dry_run, len(store.list_checkpoints()), swept.stored, swept.freed,
                    swept.freed * store.page_size, before, store.disk_usage()["pages"],
                    time.monotonic() - t0)
