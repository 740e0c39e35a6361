"""Copying checkpoints from one store into another (vmckpt push/pull), whatever their
backends: only the pages the destination lacks travel, found by batched existence checks.
Each checkpoint's pages go first and its record last, so an interrupted copy leaves only pages
behind, which the next one finds there; a checkpoint already copied is known by its origin."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vmckpt.storage.errors import StoreError, UnknownCheckpoint
from vmckpt.storage.inspect import device_ids, differing_ids
from vmckpt.storage.interface import PageStore
from vmckpt.storage.pagemap import ID_BYTES, MapDelta

BATCH = 4096  # ids per existence check, pages per read/put


@dataclass
class CopyResult:
    checkpoints: list[int] = field(default_factory=list)  # source ids copied now
    already: list[int] = field(default_factory=list)  # source ids the destination had
    ids: dict[int, int] = field(default_factory=dict)  # source id -> destination id
    pages_sent: int = 0
    pages_there: int = 0  # pages the destination already had
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Pages looked at a second."""
        return (self.pages_sent + self.pages_there) / self.seconds if self.seconds else 0.0


def origin(store: PageStore, rec: dict) -> tuple:
    """What names a checkpoint wherever it is copied: the store it was taken in, its id and
    its time there (kept through every copy)."""
    where = store.path.resolve() if isinstance(store.path, Path) else store.path
    o = rec.get("origin") or {"store": str(where), "id": rec["id"], "time": rec["time"]}
    return o["store"], o["id"], o["time"]


def needed_ids(rec: dict, ids: np.ndarray, page_size: int) -> np.ndarray:
    """The distinct non-zero page ids of a map's rows and the record's device state."""
    rows = [ids]
    if rec.get("device_state"):
        device = device_ids(rec, page_size)
        if device is None:
            raise StoreError(f"checkpoint {rec['id']} has a malformed device state reference")
        rows.append(device)
    allids = np.concatenate(rows)
    allids = allids[allids.any(axis=1)]
    return np.unique(allids.view(f"V{ID_BYTES}")).view(np.uint8).reshape(-1, ID_BYTES)


def copy_checkpoints(src: PageStore, dst: PageStore, which: Sequence[int] | None = None, *,
                     progress: Callable[[int], None] | None = None, batch: int = BATCH
                     ) -> CopyResult:
    """Copies the checkpoints which (all by default; ids of src) into dst, each as a delta on
    its parent where dst has that parent, else as a root. progress(n): n more pages looked
    at."""
    t0 = time.monotonic()
    records = src.list_checkpoints()
    by_id = {r["id"]: r for r in records}
    for ckpt in which or ():
        if ckpt not in by_id:
            raise UnknownCheckpoint(f"no checkpoint {ckpt} in {src.path}")
    chosen = sorted(which) if which else [r["id"] for r in records]
    there = {origin(dst, r): r["id"] for r in dst.list_checkpoints()}
    result = CopyResult()
    for ckpt in chosen:
        rec = by_id[ckpt]
        if (got := there.get(origin(src, rec))) is not None:
            result.already.append(ckpt)
            result.ids[ckpt] = got
            continue
        pmap = src.read_map(rec["id"])
        parent = rec.get("parent")
        dst_parent = result.ids.get(parent) if parent is not None else None
        if dst_parent is None and parent is not None:
            dst_parent = there.get(origin(src, by_id[parent])) if parent in by_id else None
        held = dst.read_map(dst_parent) if dst_parent is not None else None
        if held is not None and held.npages == pmap.npages:
            # Against the parent as dst holds it: every frame, RAM's and the disks'.
            frames = differing_ids(held.ids, pmap.ids)
            delta = MapDelta(frames.astype(np.uint64), pmap.ids[frames])
        else:  # its parent is not there: the whole map, a root in dst
            dst_parent, delta = None, pmap.sparse()
        _send(src, dst, needed_ids(rec, pmap.ids[pmap.nonzero_pfns()], src.page_size),
              result, progress, batch)
        new = {k: v for k, v in rec.items() if k not in ("id", "map", "parent")}
        o = origin(src, rec)
        new.update(parent=dst_parent, origin={"store": o[0], "id": o[1], "time": o[2]})
        result.ids[ckpt] = dst.commit_checkpoint(new, delta)
        there[o] = result.ids[ckpt]
        result.checkpoints.append(ckpt)
    result.seconds = time.monotonic() - t0
    return result


def _send(src: PageStore, dst: PageStore, ids: np.ndarray, result: CopyResult,
          progress: Callable[[int], None] | None, batch: int) -> None:
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        missing = chunk[~dst.has_pages(chunk)]
        if len(missing):
            pages = src.get_pages([row.tobytes() for row in missing])
            data = np.frombuffer(b"".join(pages), np.uint8).reshape(-1, src.page_size)
            put = dst.put_pages(missing, data)
            result.pages_sent += put.new
            result.bytes_sent += put.bytes
            result.pages_there += len(chunk) - put.new  # put.dup: arrived meanwhile
        else:
            result.pages_there += len(chunk)
        if progress:
            progress(len(chunk))
