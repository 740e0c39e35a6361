"""The checkpoint cycle: pause -> arm -> extra state -> resume -> drain -> commit."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from vmckpt.engine.targets.base import Target
from vmckpt.engine.tracker import PAGE, Tracker
from vmckpt.storage import MapDelta, PageMap, PageStore, put_blob

log = logging.getLogger("vmckpt")


@dataclass
class EngineOptions:
    interval: float = 1.0
    copiers: int = field(default_factory=lambda: os.cpu_count() or 1)
    buffer_bytes: int = 64 << 20
    tracking: str = "wp"


class Engine:
    """Checkpoints one target's guest RAM into a store, one committed checkpoint at a time.

    The native tracker serves faults and copies pages without Python; this class only decides
    when to checkpoint and moves the copied pages into the store.
    """

    def __init__(self, target: Target, tracker: Tracker, store: PageStore,
                 options: EngineOptions, *, parent: int | None = None,
                 on_paused: Callable[[Engine], None] | None = None) -> None:
        self.target = target
        self.tracker = tracker
        self.store = store
        self.options = options
        self.parent = parent
        self.on_paused = on_paused  # test hook: runs inside the pause (reference copies)
        self.current = store.read_map(parent) if parent else PageMap.empty(tracker.npages)
        if self.current.npages != tracker.npages:
            raise ValueError(f"checkpoint {parent} has {self.current.npages} pages, the guest "
                             f"{tracker.npages}")
        self.records: list[dict] = []

    async def checkpoint(self, *, stretched: bool = False) -> dict:
        """One whole cycle; returns the committed record."""
        wall = time.time()
        log.debug("pausing %s", self.target.name)
        t0 = time.perf_counter()
        await self.target.pause()
        t1 = time.perf_counter()
        try:
            arm = self.tracker.arm()
            at_arm = self.tracker.counters()
            t2 = time.perf_counter()
            if self.on_paused:
                self.on_paused(self)
            extra = await self.target.extra_state()
            t3 = time.perf_counter()
        finally:
            await self.target.resume()
        self.tracker.release()
        t4 = time.perf_counter()
        log.debug("resumed after %.2f ms; draining %d owed pages", (t4 - t0) * 1e3,
                  arm.units_owed * (self.tracker.unit // PAGE))
        drained = await asyncio.to_thread(self._drain, extra)
        delta = drained.pop("delta")
        t5 = time.perf_counter()
        copies = self.tracker.counters() - at_arm  # this checkpoint's copies: all are done
        p50, p99 = self.tracker.take_fault_percentiles(0.5, 0.99)
        record = {
            "parent": self.parent, "time": wall, "ram_size": self.tracker.ram.length,
            "page_size": PAGE, "target": {"kind": self.target.kind, "name": self.target.name,
                                         "argv": self.target.argv},
            "pages_dirtied": arm.units_owed * (self.tracker.unit // PAGE),
            **drained,
            "pause": t4 - t0,
            "pause_parts": {"stop": t1 - t0, "arm": t2 - t1, "extra": t3 - t2, "resume": t4 - t3},
            "wp_runs": arm.runs, "copied_in_pause": arm.copied_in_arm, "faults": arm.faults,
            "cow_copies": copies.cow_copies,
            "copier_copies": copies.copier_copies, "copier_waits": copies.copier_waits,
            "fault_service_p50": p50, "fault_service_p99": p99,
            "drain_time": t5 - t4, "interval_stretched": stretched,
            "strategy": asdict(self.options),
        }
        ckpt = await asyncio.to_thread(self.store.commit_checkpoint, record, delta)
        record["id"] = ckpt
        record["commit_time"] = time.perf_counter() - t5
        self.parent = ckpt
        self.records.append(record)
        return record

    def _drain(self, extra: bytes | None) -> dict:
        """Moves every owed page (and the device state) into the store; returns the figures
        and the map delta."""
        device = put_blob(self.store, extra) if extra else None
        pfns, ids = [], []
        new = dup = nbytes = zero = 0
        while (got := self.tracker.collect()) is not None:
            res = self.store.put_pages(got.ids, got.pages)
            new, dup, nbytes = new + res.new, dup + res.dup, nbytes + res.bytes
            zero += int(got.zero.sum())
            pfns.append(got.pfns.copy())
            ids.append(got.ids.copy())
        delta = MapDelta(np.concatenate(pfns) if pfns else np.empty(0, np.uint64),
                         np.concatenate(ids) if ids else np.empty((0, 32), np.uint8))
        # Owed pages rewritten with their old content change nothing in the map.
        changed = (self.current.ids[delta.pfns.astype(np.int64)] != delta.ids).any(axis=1)
        delta = MapDelta(delta.pfns[changed], delta.ids[changed])
        self.current.apply(delta)
        return {"device_state": device, "pages_stored_new": new, "dedup_hits": dup,
                "zero_pages": zero, "bytes_added": nbytes, "pages_changed": len(delta.pfns),
                "delta": delta}

    async def run(self, stop: asyncio.Event, max_checkpoints: int | None = None) -> None:
        """Checkpoints every interval until stop is set; the one in flight always completes."""
        next_at = time.monotonic()
        stretched = False
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            rec = await self.checkpoint(stretched=stretched)
            log.info("checkpoint %d: pause %.2f ms, %d pages dirtied, %d new, %.1f MiB, "
                     "drain %.0f ms", rec["id"], rec["pause"] * 1e3, rec["pages_dirtied"],
                     rec["pages_stored_new"], rec["bytes_added"] / 2**20,
                     rec["drain_time"] * 1e3)
            if max_checkpoints and len(self.records) >= max_checkpoints:
                break
            # The next one starts only after this one is committed: if that ran past its
            # time, the interval stretches and the next record says so.
            next_at += self.options.interval
            stretched = time.monotonic() > next_at
            next_at = max(next_at, time.monotonic())
