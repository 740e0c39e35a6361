"""Python face of the native tracker: arm a checkpoint, collect its copied pages, read figures."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import astuple, dataclass

import numpy as np
from vmckpt.engine._native import ffi, lib
from vmckpt.engine.handoff import GuestRam
from vmckpt.engine.targets.base import TargetGone

PAGE = 4096
ID_BYTES = 32
TRACKING = {"wp": lib.TRK_WP, "async": lib.TRK_ASYNC, "hybrid": lib.TRK_HYBRID}
USES_ASYNC_UFFD = ("async", "hybrid")
STALL_SECONDS = 60.0


class TrackerError(Exception):
    """The native tracker failed; the message says where."""


class RamGone(TrackerError, TargetGone):
    """The target unmapped its guest RAM (it is exiting, or dropped that memory): for the
    cycle, the target is gone, wherever the tracker finds it out (arm, pre-arm, switch)."""


@dataclass(frozen=True)
class ArmStats:
    units_owed: int
    runs: int
    faults: int
    dirty_units: int
    arm_ns: int
    copied_in_arm: int


@dataclass(frozen=True)
class Counters:
    """Running totals since the tracker started; differences give one checkpoint's share."""

    faults: int
    cow_copies: int     # owed units the fault thread copied before letting a write through
    copier_copies: int
    copier_waits: int   # times a copier waited for buffer space
    cow_waits: int      # times a guest write waited for buffer space (the store a buffer behind)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class Collected:
    """Pages handed over by one collect(): views valid until the next collect()."""

    pfns: np.ndarray   # uint64[n]
    ids: np.ndarray    # uint8[n, 32], zero rows for all-zero pages
    zero: np.ndarray   # bool[n]
    pages: np.ndarray  # uint8[n, 4096], rows of zero pages are not filled


class Tracker:
    """Owns the guest RAM handoff: the uffd (closing it lets the VMM run on untracked)."""

    def __init__(self, ram: GuestRam, *, copiers: int | None = None,
                 buffer_bytes: int = 64 << 20, collect_pages: int = 2048,
                 tracking: str = "wp", priority: bool = False) -> None:
        unit = ram.page_size if ram.page_size > PAGE else PAGE
        if ram.length % unit:
            raise TrackerError(f"guest RAM of {ram.length} bytes is not a whole number of "
                               f"{unit}-byte pages")
        self.ram = ram
        self.unit = unit
        self.npages = ram.length // PAGE
        self.copiers = copiers or os.cpu_count() or 1
        if tracking not in TRACKING:
            raise TrackerError(f"unknown tracking {tracking!r}: one of {', '.join(TRACKING)}")
        pagemap = -1
        uses_async = tracking in USES_ASYNC_UFFD
        if uses_async:
            if ram.async_uffd < 0:
                raise TrackerError(f"{tracking} tracking needs UFFD_FEATURE_WP_ASYNC and "
                                   "PAGEMAP_SCAN (Linux 6.7+); this kernel has no WP_ASYNC: use "
                                   "--tracking wp")
            pagemap = os.open(f"/proc/{ram.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.tracking = tracking
        cfg = ffi.new("struct trk_config *", {
            "uffd": ram.uffd, "ramfd": ram.ramfd, "target_base": ram.addr,
            "length": ram.length, "offset": ram.offset, "unit": unit,
            "copiers": self.copiers, "buffer_bytes": buffer_bytes, "owe_all": 0,
            "tracking": TRACKING[tracking], "priority": int(priority),
            "async_uffd": ram.async_uffd if uses_async else -1, "pagemap_fd": pagemap,
        })
        err = ffi.new("char[256]")
        self._t = lib.trk_create(cfg, err, len(err))
        if self._t == ffi.NULL:
            ram.uffd = -1  # closed by the native side
            if uses_async:
                ram.async_uffd = -1
            raise TrackerError(ffi.string(err).decode())
        self.uffd = ram.uffd  # for baselines measured on the same registration
        ram.uffd = -1  # the tracker closes them
        if uses_async:
            ram.async_uffd = -1
        cap = max(collect_pages, unit // PAGE)
        self._pages = np.empty((cap, PAGE), np.uint8)
        self._ids = np.empty((cap, ID_BYTES), np.uint8)
        self._pfns = np.empty(cap, np.uint64)
        self._zero = np.empty(cap, np.uint8)
        self._c = [ffi.from_buffer(f"{t}[]", a) for t, a in (
            ("uint8_t", self._pages), ("uint8_t", self._ids), ("uint64_t", self._pfns),
            ("uint8_t", self._zero))]
        self._done = ffi.new("int *")

    def arm(self, *, paused: bool = True) -> ArmStats:
        """owed <- dirty, write-protect it, dirty <- {} (see trk_arm). A pre-arm, with the target
        running, says paused=False."""
        st = ffi.new("struct trk_arm_stats *")
        self._check(lib.trk_arm(self._t, int(paused), st), "arming the checkpoint")
        return ArmStats(st.units_owed, st.runs, st.faults, st.dirty_units, st.arm_ns,
                        st.copied_in_arm)

    def to_async(self) -> float:
        """Hybrid tracking: call with the target paused once the armed checkpoint is drained;
        moves the range onto the async uffd (see trk_to_async). Returns the seconds it took."""
        t0 = time.perf_counter()
        self._check(lib.trk_to_async(self._t), "switching to async tracking")
        return time.perf_counter() - t0

    def _check(self, rc: int, what: str) -> None:
        """Raises for a native failure: RamGone if the target's mapping is gone (ENOENT: the
        range is no longer registered; EINVAL/ESRCH: an exiting target's range could not be
        registered again while moving between uffds; ENOMEM: the kernel's answer to a register
        in a process whose memory is already torn down), else TrackerError."""
        if rc == -errno.ENOENT or (rc in (-errno.EINVAL, -errno.ESRCH, -errno.ENOMEM)
                                   and not self._mapped()):
            raise RamGone("the program unmapped its guest RAM")
        if rc < 0:
            raise TrackerError(f"{what} failed: {os.strerror(-rc)}")

    def _mapped(self) -> bool:
        """Whether the target still maps guest RAM at the handed-over address."""
        try:
            with open(f"/proc/{self.ram.pid}/maps") as f:
                return any(int(line.split("-", 1)[0], 16) == self.ram.addr for line in f)
        except OSError:
            return False

    def release(self) -> None:
        """Lets the copiers start on the armed checkpoint (call once the target resumed)."""
        lib.trk_release(self._t)

    def redirty(self, pfns: np.ndarray) -> None:
        """The next arm owes these pages again (a dropped checkpoint's, once it is collected
        whole): its arm had taken them out of the dirty set."""
        pfns = np.ascontiguousarray(pfns, np.uint64)
        self._check(lib.trk_redirty(self._t, ffi.from_buffer("uint64_t[]", pfns), len(pfns)),
                    "owing a dropped checkpoint's pages again")

    def collect(self, timeout_ms: int = 200, stall: float = STALL_SECONDS) -> Collected | None:
        """Next copied pages of the checkpoint in flight; None once it is drained whole.
        Copiers need nothing but CPU once released, so a drain that yields nothing for
        `stall` seconds is a tracker bug: it is reported instead of waited on forever."""
        since = time.monotonic()
        while True:
            n = lib.trk_collect(self._t, *self._c, len(self._pfns), timeout_ms, self._done)
            if n < 0:
                raise TrackerError(f"collect: {os.strerror(-n)}")
            if n:
                return Collected(self._pfns[:n], self._ids[:n], self._zero[:n].view(bool),
                                 self._pages[:n])
            if self._done[0]:
                return None
            if time.monotonic() - since > stall:
                raise TrackerError(f"the drain made no progress for {stall:g} s "
                                   "(a tracker bug: please report it)")

    def ram_view(self) -> memoryview:
        """The engine's read-only view of guest RAM (tests take reference copies through it)."""
        return memoryview(ffi.buffer(lib.trk_ram(self._t), self.ram.length))

    def counters(self) -> Counters:
        st = self._stats()
        return Counters(st.faults, st.cow_copies, st.copier_copies, st.copier_waits,
                        st.cow_waits)

    def _stats(self) -> ffi.CData:
        st = ffi.new("struct trk_stats *")
        lib.trk_get_stats(self._t, st)
        return st

    def take_fault_percentiles(self, *qs: float) -> list[float | None]:
        """Fault service time percentiles (seconds, log2-bucket upper bounds) since the last
        call, then starts a new histogram; None where there was no fault."""
        st = self._stats()
        lib.trk_reset_hist(self._t)
        hist = list(st.fault_hist)
        total = sum(hist)
        out: list[float | None] = []
        for q in qs:
            seen, bound = 0, None
            for i, n in enumerate(hist):
                seen += n
                if total and seen >= q * total:
                    bound = 2.0 ** (i + 1) * 1e-9
                    break
            out.append(bound)
        return out

    def close(self) -> None:
        if self._t is not None:
            lib.trk_destroy(self._t)
            self._t = None
        self.ram.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
