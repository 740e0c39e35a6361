"""The checkpoint cycle: pause -> arm -> extra state -> resume -> drain -> commit."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from vmckpt.engine.targets.base import Target, TargetGone
from vmckpt.engine.tracker import PAGE, ArmStats, Tracker
from vmckpt.storage import MapDelta, PageMap, PageStore, put_blob

log = logging.getLogger("vmckpt")

# The default pre-arm lead: this, or a quarter of a shorter interval. On the QEMU test guest it
# takes the write-protect of most of the dirty set out of the pause (pause p50 11.7 -> 8.1 ms at
# 1 s, `vmckpt bench qemu`, 2026-12-01), and it did not slow the write-heavy synthetic guest
# (`vmckpt bench interval`): see the README's results.
PRE_ARM_AUTO = 0.1


@dataclass
class EngineOptions:
    interval: float = 1.0
    copiers: int = field(default_factory=lambda: os.cpu_count() or 1)
    buffer_bytes: int = 64 << 20
    tracking: str = "wp"  # wp | async | hybrid (engine/tracker.py)
    pre_arm: float | None = None  # seconds before each pause to do its dirty-set work (0: off;
    #                               None: auto, see __post_init__; not with hybrid: its arm moves
    #                               the range between uffds, which needs the target paused)
    priority: bool = True  # copiers first take the units after a copy-on-write fault

    def __post_init__(self) -> None:
        if self.pre_arm is None:  # auto: PRE_ARM_AUTO or a quarter of a shorter interval
            self.pre_arm = 0.0 if self.tracking == "hybrid" else min(PRE_ARM_AUTO,
                                                                     self.interval / 4)


@dataclass
class _Copied:
    """Pages of one checkpoint moved into the store, not yet in its map."""

    pfns: list[np.ndarray] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    new: int = 0
    dup: int = 0
    bytes: int = 0
    zero: int = 0
    dirtied: int = 0
    seconds: float = 0.0  # time of the pre-arm that began it


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
        if options.tracking == "hybrid" and options.pre_arm:
            raise ValueError("--pre-arm does not combine with hybrid tracking: its arm moves "
                             "guest RAM between uffds, which needs the target paused")
        if self.current.npages != tracker.npages:
            raise ValueError(f"checkpoint {parent} has {self.current.npages} pages, the guest "
                             f"{tracker.npages}")
        self.records: list[dict] = []
        self._pre: _Copied | None = None

    async def checkpoint(self, *, stretched: bool = False) -> dict:
        """One whole cycle; returns the committed record."""
        wall = time.time()
        log.debug("pausing %s", self.target.name)
        t0 = time.perf_counter()
        await self.target.pause()
        t1 = time.perf_counter()
        try:
            # Arm, then the extra state, one after the other: on two cores, arming in a thread
            # while QEMU saved its devices made both slower (pause median 15.7 vs 10.5 ms,
            # measured side by side on the QEMU test guest).
            arm, arm_secs = self._arm()
            t_arm = time.perf_counter()
            extra = await self.target.extra_state()
            t2 = time.perf_counter()
            at_arm = self.tracker.counters()
            if self.on_paused:
                self.on_paused(self)
            t3 = time.perf_counter()
        finally:
            await self.target.resume()
        t4 = time.perf_counter()
        self.tracker.release()
        await self.target.settle()
        log.debug("resumed after %.2f ms; draining %d owed pages", (t4 - t0) * 1e3,
                  arm.units_owed * (self.tracker.unit // PAGE))
        copied, self._pre = self._pre or _Copied(), None
        pre_pages = sum(len(p) for p in copied.pfns)
        device = await asyncio.to_thread(put_blob, self.store, extra) if extra else None
        await asyncio.to_thread(self._drain, copied)
        switch = None
        if self.options.tracking == "hybrid":
            try:
                switch = await self._switch_to_async()
            except TargetGone as e:  # commit what is drained; the next pause ends the run
                log.info("no switch back to async tracking: %s", e)
        delta = self._delta(copied)
        t5 = time.perf_counter()
        copies = self.tracker.counters() - at_arm  # this checkpoint's copies: all are done
        p50, p99 = self.tracker.take_fault_percentiles(0.5, 0.99)
        record = {
            "parent": self.parent, "time": wall, "ram_size": self.tracker.ram.length,
            "page_size": PAGE, "target": {"kind": self.target.kind, "name": self.target.name,
                                         "argv": self.target.argv},
            "pages_dirtied": copied.dirtied, "pages_stored_new": copied.new,
            "dedup_hits": copied.dup, "zero_pages": copied.zero, "bytes_added": copied.bytes,
            "pages_changed": len(delta.pfns), "device_state": device,
            "pre_armed": {"pages": pre_pages, "seconds": copied.seconds},
            "pause": t4 - t0,
            "pause_parts": {"stop": t1 - t0, "arm": arm_secs, "extra": t2 - t_arm,
                            "resume": t4 - t3},
            "wp_runs": arm.runs, "copied_in_pause": arm.copied_in_arm, "faults": arm.faults,
            "cow_copies": copies.cow_copies,
            "copier_copies": copies.copier_copies, "copier_waits": copies.copier_waits,
            "cow_waits": copies.cow_waits,
            "fault_service_p50": p50, "fault_service_p99": p99,
            "drain_time": t5 - t4, "interval_stretched": stretched,
            # hybrid: the second, short pause after the drain that moves tracking back to
            # async (seconds; "move": the unregister + register + protect-all inside it)
            "switch_pause": switch[0] if switch else None,
            "switch_move": switch[1] if switch else None,
            "strategy": asdict(self.options),
        }
        ckpt = await asyncio.to_thread(self.store.commit_checkpoint, record, delta)
        record["id"] = ckpt
        record["commit_time"] = time.perf_counter() - t5
        self.parent = ckpt
        self.records.append(record)
        return record

    def _arm(self) -> tuple[ArmStats, float]:
        t0 = time.perf_counter()
        return self.tracker.arm(), time.perf_counter() - t0

    async def _switch_to_async(self) -> tuple[float, float]:
        """Hybrid tracking, once the drain is complete (nothing owed is left, so nothing needs
        copy-on-write): back to async tracking for the rest of the interval. While the range
        moves between the uffds no write is tracked, so the target is paused for it (QMP
        stop/cont, SIGSTOP/SIGCONT). Returns (pause, move) in seconds."""
        t0 = time.perf_counter()
        await self.target.pause()
        try:
            move = self.tracker.to_async()  # ~10 ms per 256 MiB: not worth a thread hop
        finally:
            await self.target.resume()
        t1 = time.perf_counter()
        await self.target.settle()
        return t1 - t0, move

    def _drain(self, into: _Copied) -> None:
        """Moves every copied page of the armed checkpoint into the store."""
        while (got := self.tracker.collect()) is not None:
            res = self.store.put_pages(got.ids, got.pages)
            into.new, into.dup, into.bytes = into.new + res.new, into.dup + res.dup, \
                into.bytes + res.bytes
            into.zero += int(got.zero.sum())
            into.pfns.append(got.pfns.copy())
            into.ids.append(got.ids.copy())

    def _delta(self, copied: _Copied) -> MapDelta:
        """The map delta of the copied pages against the current map, applied to it."""
        pfns = np.concatenate(copied.pfns) if copied.pfns else np.empty(0, np.uint64)
        ids = np.concatenate(copied.ids) if copied.ids else np.empty((0, 32), np.uint8)
        # A pre-armed page written again before the pause was copied again: the later wins.
        _, last = np.unique(pfns[::-1], return_index=True)
        keep = len(pfns) - 1 - last
        pfns, ids = pfns[keep], ids[keep]
        copied.dirtied = len(pfns)
        # Owed pages rewritten with their old content change nothing in the map.
        changed = (self.current.ids[pfns.astype(np.int64)] != ids).any(axis=1)
        delta = MapDelta(pfns[changed], ids[changed])
        self.current.apply(delta)
        return delta

    async def pre_arm(self) -> None:
        """The next checkpoint's dirty-set work ahead of its pause, with the target running:
        arm (protect or scan the pages written so far) and drain them. The pause then handles
        only pages written since; any of these written again is copied again, and that copy
        wins (a write after the arm faults or is recorded, so it is never missed)."""
        if len(self.records) < 2 or self._pre:  # tracking is set up by the first two
            return
        t0 = time.perf_counter()
        self.tracker.arm()
        self.tracker.release()
        pre = _Copied()
        await asyncio.to_thread(self._drain, pre)
        pre.seconds = time.perf_counter() - t0
        self._pre = pre

    async def run(self, stop: asyncio.Event, max_checkpoints: int | None = None) -> None:
        """Checkpoints every interval until stop is set; the one in flight always completes."""
        next_at = time.monotonic()
        stretched = False
        while not stop.is_set():
            lead = self.options.pre_arm
            if lead and next_at - time.monotonic() > lead:
                try:
                    await asyncio.wait_for(stop.wait(), next_at - time.monotonic() - lead)
                    break
                except TimeoutError:
                    await self.pre_arm()
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
