"""The checkpoint cycle: pause -> arm -> extra state -> resume -> drain -> commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from vmckpt.engine.targets.base import DiskCopied, Target, TargetGone
from vmckpt.engine.tracker import PAGE, ArmStats, Tracker
from vmckpt.storage import MapDelta, PageMap, PageStore, StoreFull, map_pages, put_blob

log = logging.getLogger("vmckpt")

# The default pre-arm lead: this, or a quarter of a shorter interval. On the QEMU test guest it
# takes the write-protect of most of the dirty set out of the pause (the arm's share of the
# pause, wp against the default: `vmckpt bench qemu`, the README's table from its JSON).
PRE_ARM_AUTO = 0.1
ON_FULL = ("wait", "stop")
# While the store is full (--on-full wait): the first look for space this long after the drop,
# doubling with each checkpoint dropped since, up to the cap.
FULL_RETRY = 1.0
FULL_RETRY_MAX = 30.0


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
    on_full: str = "wait"  # the store cannot take more: wait for space, or stop checkpointing
    disks: bool = True  # capture the writable disks at each pause (False: RAM only, recorded)

    def __post_init__(self) -> None:
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full is one of {', '.join(ON_FULL)}, not {self.on_full!r}")
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
    failed: StoreFull | None = None  # the store refused a put: dropped, collected only


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
        if options.tracking == "hybrid" and options.pre_arm:
            raise ValueError("--pre-arm does not combine with hybrid tracking: its arm moves "
                             "guest RAM between uffds, which needs the target paused")
        self.layout = {"ram_size": tracker.ram.length, "disks": target.disks}
        self.current = self._start_map(parent)
        self.on_committed: Callable[[dict], None] | None = None  # experiments keep records
        # Of what it committed, only the count and the last record: a run can be long.
        self.committed = 0
        self.last: dict | None = None
        self.gave_up = False  # the store was full with on_full "stop": the target runs on
        self._pre: _Copied | None = None
        self._full: tuple[float, int] | None = None  # while full: since when, drops since

    def _start_map(self, parent: int | None) -> PageMap:
        """The map new checkpoints are deltas against: the parent's, when it holds RAM and
        disks laid out as now (a branch of it: its first checkpoint takes only what was
        written since the attach); else its RAM with the disks to be taken whole."""
        current = PageMap.empty(map_pages(self.layout))
        same = False
        if parent:
            rec = self.store.get_record(parent)
            if rec["ram_size"] != self.tracker.ram.length:
                raise ValueError(f"checkpoint {parent} has {rec['ram_size'] >> 20} MiB of RAM, "
                                 f"the guest {self.tracker.ram.length >> 20} MiB")
            held = self.store.read_map(parent)
            same = _layout(rec) == _layout(self.layout)
            frames = held.npages if same else self.tracker.npages
            current.ids[:frames] = held.ids[:frames]
        self.target.disks_since_attach(same)
        return current

    async def checkpoint(self, *, stretched: bool = False,
                         slack: float | None = None) -> dict:
        """One whole cycle; returns the committed record."""
        wall = time.time()
        log.debug("pausing %s", self.target.name)
        t0 = time.perf_counter()
        await self.target.pause()
        t1 = time.perf_counter()
        try:
            # Arm, then the extra state, one after the other: on two cores, arming in a thread
            # while QEMU saves its devices leaves them competing for the same two CPUs.
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
        device = None
        if extra and not copied.failed:
            try:
                device = await asyncio.to_thread(put_blob, self.store, extra)
            except StoreFull as e:
                copied.failed = e
        try:
            _, disks = await asyncio.gather(asyncio.to_thread(self._drain, copied),
                                            self.target.drain_disks(self.store))
        except BaseException:
            with contextlib.suppress(Exception):  # the next checkpoint takes its blocks again
                await self.target.release_disks(kept=False)
            raise
        copied.failed = copied.failed or next((d.failed for d in disks if d.failed), None)
        switch = None
        if self.options.tracking == "hybrid":
            try:
                switch = await self._switch_to_async()
            except TargetGone as e:  # commit what is drained; the next pause ends the run
                log.info("no switch back to async tracking: %s", e)
        if copied.failed:
            await self._drop(copied)
        delta = self._delta(copied)
        disk_delta, disk_figures = self._disk_delta(disks)
        t5 = time.perf_counter()
        copies = self.tracker.counters() - at_arm  # this checkpoint's copies: all are done
        p50, p99 = self.tracker.take_fault_percentiles(0.5, 0.99)
        record = {
            "parent": self.parent, "time": wall, "ram_size": self.tracker.ram.length,
            "disks": disk_figures, "disks_skipped": self.target.skipped_disks,
            "disks_not_captured": self.target.uncaptured_disks,
            "page_size": PAGE, "target": {"kind": self.target.kind, "name": self.target.name,
                                         "argv": self.target.argv},
            "pages_dirtied": copied.dirtied, "pages_stored_new": copied.new,
            "dedup_hits": copied.dup, "zero_pages": copied.zero, "bytes_added": copied.bytes,
            "pages_changed": len(delta.pfns), "device_state": device,
            "device_state_via": self.target.device_state_via if device else None,
            "pre_armed": {"pages": pre_pages, "seconds": copied.seconds},
            "pause": t4 - t0,
            "pause_parts": {"stop": t1 - t0, "arm": arm_secs, "extra": t2 - t_arm,
                            "resume": t4 - t3},
            "wp_runs": arm.runs, "copied_in_pause": arm.copied_in_arm, "faults": arm.faults,
            "cow_copies": copies.cow_copies,
            "copier_copies": copies.copier_copies, "copier_waits": copies.copier_waits,
            "cow_waits": copies.cow_waits,
            "fault_service_p50": p50, "fault_service_p99": p99,
            "drain_time": t5 - t4, "interval_stretched": stretched, "interval_slack": slack,
            # hybrid: the second, short pause after the drain that moves tracking back to
            # async (seconds; "move": the unregister + register + protect-all inside it)
            "switch_pause": switch[0] if switch else None,
            "switch_move": switch[1] if switch else None,
            "strategy": asdict(self.options),
        }
        delta = MapDelta(np.concatenate([delta.pfns, disk_delta.pfns]),
                         np.concatenate([delta.ids, disk_delta.ids]))
        try:
            ckpt = await asyncio.to_thread(self.store.commit_checkpoint, record, delta)
        except StoreFull as e:
            copied.failed = e
            await self._drop(copied)
        self.current.apply(delta)
        # After the commit (it does not wait on QEMU): the view's export, job and scratch go.
        await self.target.release_disks(kept=True)
        record["id"] = ckpt
        record["commit_time"] = time.perf_counter() - t5
        self.parent = ckpt
        self.committed += 1
        self.last = record
        if self.on_committed:
            self.on_committed(record)
        return record

    async def _drop(self, copied: _Copied) -> None:
        """Drops a checkpoint the store could not take, once it is collected whole: its
        pages are owed again by the next arm (this arm took them out of the dirty set), and
        its disk blocks by the next view, so the next checkpoint stores their content then,
        against the last committed map."""
        if copied.pfns:
            self.tracker.redirty(np.concatenate(copied.pfns))
        await self.target.release_disks(kept=False)
        assert copied.failed
        raise copied.failed

    def _arm(self) -> tuple[ArmStats, float]:
        t0 = time.perf_counter()
        return self.tracker.arm(), time.perf_counter() - t0

    async def _switch_to_async(self) -> tuple[float, float]:
        """Hybrid tracking, once the drain is complete (nothing owed is left, so nothing needs
        copy-on-write): back to async tracking for the rest of the interval. While the range
        moves between the uffds no write is tracked, so the target is paused for it (QMP
        stop/cont, SIGSTOP/SIGCONT). Returns (pause, move) in seconds."""
        t0 = time.perf_counter()
        await self.target.pause(capture=False)
        try:
            move = self.tracker.to_async()  # recorded as switch_move: short, not worth a thread hop
        finally:
            await self.target.resume()
        t1 = time.perf_counter()
        await self.target.settle()
        return t1 - t0, move

    def _drain(self, into: _Copied) -> None:
        """Moves every copied page of the armed checkpoint into the store. Once the store
        refuses one, the rest are collected (the tracker arms again only after) and dropped."""
        while (got := self.tracker.collect()) is not None:
            into.pfns.append(got.pfns.copy())
            if into.failed:
                continue
            try:
                res = self.store.put_pages(got.ids, got.pages)
            except StoreFull as e:
                into.failed = e
                continue
            into.new, into.dup, into.bytes = into.new + res.new, into.dup + res.dup, \
                into.bytes + res.bytes
            into.zero += int(got.zero.sum())
            into.ids.append(got.ids.copy())

    def _delta(self, copied: _Copied) -> MapDelta:
        """The map delta of the copied pages against the current map (the last committed
        one: the delta is applied to it once committed)."""
        pfns = np.concatenate(copied.pfns) if copied.pfns else np.empty(0, np.uint64)
        ids = np.concatenate(copied.ids) if copied.ids else np.empty((0, 32), np.uint8)
        # A pre-armed page written again before the pause was copied again: the later wins.
        _, last = np.unique(pfns[::-1], return_index=True)
        keep = len(pfns) - 1 - last
        pfns, ids = pfns[keep], ids[keep]
        copied.dirtied = len(pfns)
        # Owed pages rewritten with their old content change nothing in the map.
        changed = (self.current.ids[pfns.astype(np.int64)] != ids).any(axis=1)
        return MapDelta(pfns[changed], ids[changed])

    def _disk_delta(self, disks: list[DiskCopied]) -> tuple[MapDelta, list[dict]]:
        """The disks' blocks that changed against the current map, and each disk's figures."""
        pfns, ids, figures = [], [], []
        for d in disks:
            changed = (self.current.ids[d.pfns.astype(np.int64)] != d.ids).any(axis=1)
            pfns.append(d.pfns[changed])
            ids.append(d.ids[changed])
            figures.append({**d.disk, "blocks_dirty": len(d.pfns), "blocks_new": d.new,
                            "blocks_dedup": d.dup, "blocks_zero": d.zero,
                            "blocks_changed": int(changed.sum()), "bytes_added": d.bytes})
        if not disks:
            return MapDelta(np.empty(0, np.uint64), np.empty((0, 32), np.uint8)), []
        return MapDelta(np.concatenate(pfns), np.concatenate(ids)), figures

    async def pre_arm(self) -> None:
        """The next checkpoint's dirty-set work ahead of its pause, with the target running:
        arm (protect or scan the pages written so far) and drain them. The pause then handles
        only pages written since; any of these written again is copied again, and that copy
        wins (a write after the arm faults or is recorded, so it is never missed)."""
        if self.committed < 2 or self._pre:  # tracking is set up by the first two
            return
        t0 = time.perf_counter()
        self.tracker.arm(paused=False)
        self.tracker.release()
        pre = _Copied()
        await asyncio.to_thread(self._drain, pre)
        if pre.failed:
            if pre.pfns:  # no disk view is taken before the pause: only RAM to give back
                self.tracker.redirty(np.concatenate(pre.pfns))
            raise pre.failed
        pre.seconds = time.perf_counter() - t0
        self._pre = pre

    async def run(self, stop: asyncio.Event, max_checkpoints: int | None = None) -> None:
        """Checkpoints every interval until stop is set; the one in flight always completes,
        or is dropped whole if the store cannot take it (then see _store_full)."""
        next_at = time.monotonic()
        stretched, slack = False, None
        while not stop.is_set():
            try:
                lead = self.options.pre_arm
                if lead and slack is not None and slack > lead:
                    try:
                        await asyncio.wait_for(stop.wait(), next_at - time.monotonic() - lead)
                        break
                    except TimeoutError:
                        await self.pre_arm()
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        if not self._pre:
                            break
                        # Stopped after this checkpoint's pre-arm: it is in flight (its pages
                        # are drained), so it is taken now and committed like any other.
                    except TimeoutError:
                        pass
                rec = await self.checkpoint(stretched=stretched, slack=slack)
            except StoreFull as e:
                if not await self._store_full(e, stop):
                    break
                next_at, stretched, slack = time.monotonic(), True, None
                continue
            log.info("checkpoint %d: pause %.2f ms, %d pages dirtied, %d new, %.1f MiB, "
                     "drain %.0f ms", rec["id"], rec["pause"] * 1e3, rec["pages_dirtied"],
                     rec["pages_stored_new"], rec["bytes_added"] / 2**20,
                     rec["drain_time"] * 1e3)
            if self._full:
                since, dropped = self._full
                log.warning("the store takes checkpoints again: checkpoint %d committed, after "
                            "%d dropped in %.0f s", rec["id"], dropped, time.monotonic() - since)
                self._full = None
            if max_checkpoints and self.committed >= max_checkpoints:
                break
            # The next one starts only after this one is committed: if that ran past its
            # time, the interval stretches and the next record says so.
            next_at += self.options.interval
            slack = next_at - time.monotonic()
            stretched = slack < 0
            next_at = max(next_at, time.monotonic())

    def _last_committed(self) -> str:
        return f"checkpoint {self.parent}" if self.parent else "none"

    async def _store_full(self, e: StoreFull, stop: asyncio.Event) -> bool:
        """A checkpoint was dropped: the store cannot take more. The target runs on either
        way. on_full "stop": says so and gives up (False). "wait": says so once, then waits
        until the store takes writes again (True), or stop is set (False)."""
        if self.options.on_full == "stop":
            log.error("%s: checkpoint dropped; checkpointing stops, the VM runs on untracked "
                      "(last committed: %s)", e, self._last_committed())
            self.gave_up = True
            return False
        since, dropped = self._full or (time.monotonic(), 0)
        if not dropped:
            log.warning("%s: checkpoint dropped; the VM runs on, checkpoints resume once the "
                        "store takes writes again (last committed: %s)", e,
                        self._last_committed())
        self._full = since, dropped + 1
        delay = min(FULL_RETRY * 2 ** dropped, FULL_RETRY_MAX)
        while True:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return False
            except TimeoutError:
                pass
            if await asyncio.to_thread(self.store.recover):
                return True


def _layout(record: dict) -> list[tuple]:
    """What must match for a map to be reused: the RAM size and every disk's place and size."""
    return [record["ram_size"], *((d["device"], d["first"], d["size"])
                                  for d in record.get("disks", ()))]
