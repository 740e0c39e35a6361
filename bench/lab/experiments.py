"""The experiments behind `vmckpt bench` and bench/: real guests under the engine, figures out.

Each experiment returns rows (dicts of plain numbers and strings) that the caller tabulates or
plots; all of one experiment runs in one process, side by side, because on a shared machine
only ratios measured together mean anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from asyncio.subprocess import PIPE
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.qmp import QemuError, Qmp
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import TrackedProgram, checkpoint_program
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

# A tracking, and "+pre-arm": its dirty-set work done ahead of each pause (the engine's auto
# lead; not with hybrid). "wp+pre-arm" is the engine's default.
STRATEGIES = ("wp", "wp+pre-arm", "async", "async+pre-arm", "hybrid")
DEFAULT_STRATEGY = "wp+pre-arm"
INTERVALS = (0.1, 0.25, 0.5, 1.0, 2.0)
# A row's interval "stretched" when its checkpoints came this much further apart than asked
# (a drain or commit ran past the next pause's time): such rows are not at their nominal interval.
STRETCHED = 1.5


def options(strategy: str, interval: float) -> EngineOptions:
    """The engine options of a strategy label at an interval."""
    tracking, _, pre = strategy.partition("+")
    return EngineOptions(interval=interval, tracking=tracking,
                         pre_arm=None if pre else 0.0)


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


async def _synth_run(workdir: Path, args: Sequence[str], options: EngineOptions | None,
                     max_checkpoints: int | None = None) -> tuple[float, list[dict]]:
    """Runs the synthetic guest to the end of its --duration (or of max_checkpoints: then it is
    stopped), checkpointed with options (or not at all); returns its own write rate (pages/s)
    and the checkpoint records."""
    if options is None:
        proc = await asyncio.create_subprocess_exec(*synth(*args), stdout=PIPE)
        out, _ = await proc.communicate()
        return json.loads(out.splitlines()[-1])["pages_per_s"], []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        prog = await TrackedProgram.start(synth(*args), Path(tmp) / "e.sock",
                                          copiers=options.copiers, tracking=options.tracking,
                                          priority=options.priority, min_ram=4 << 20,
                                          stdout=PIPE)
        assert prog.proc.stdout
        out = asyncio.ensure_future(prog.proc.stdout.read())
        with open_store(Path(tmp) / "store", create=True) as store:
            await checkpoint_program(prog, store, options, max_checkpoints=max_checkpoints)
            records = store.list_checkpoints()
        return json.loads((await out).splitlines()[-1])["pages_per_s"], records


def interval_kept(records: Sequence[dict], nominal: float, skip: int = 2) -> dict:
    """The interval asked for, the one kept (the mean time between successive pauses of the
    steady records, from their "time"), and whether it stretched (> STRETCHED x nominal)."""
    times = [r["time"] for r in records[skip:]]
    eff = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return {"interval_s": nominal, "interval_eff_s": eff,
            "interval_stretched": bool(eff > STRETCHED * nominal)}


def _pause_row(records: list[dict], skip: int = 2) -> dict:
    steady = records[skip:] or records  # the first two set tracking up (all RAM, the switch)
    pauses = [r["pause"] for r in steady]
    switches = [r["switch_pause"] for r in steady if r.get("switch_pause") is not None]
    return {"checkpoints": len(records), "pause_p50_ms": _ms(pauses, 50),
            "pause_p99_ms": _ms(pauses, 99),
            "switch_p50_ms": _ms(switches, 50),  # hybrid's second pause; nan for the others
            "dirtied_p50": statistics.median(r["pages_dirtied"] for r in steady),
            "drain_p50_ms": _ms([r["drain_time"] for r in steady], 50)}


async def _slowdown_rows(workdir: Path, args: Sequence[str],
                         points: Sequence[tuple[dict, EngineOptions]],
                         skip: int = 2) -> list[dict]:
    """One row per point (its labels, the guest checkpointed with its options), with the
    guest's own rate alone measured just before and just after it (the run after one point is
    the one before the next): slowdown = 1 - rate checkpointed / the mean of the two alone."""
    before, _ = await _synth_run(workdir, args, None)
    rows = []
    for label, opts in points:
        on, records = await _synth_run(workdir, args, opts)
        after, _ = await _synth_run(workdir, args, None)
        alone = (before + after) / 2
        rows.append({**label, **interval_kept(records, opts.interval, skip),
                     **_pause_row(records, skip), "guest_pages_per_s": on,
                     "guest_alone_before_pages_per_s": before,
                     "guest_alone_after_pages_per_s": after, "guest_off_pages_per_s": alone,
                     "slowdown": 1 - on / alone})
        before = after
    return rows


async def interval_experiment(workdir: Path, *, strategies: Sequence[str] = STRATEGIES,
                              intervals: Sequence[float] = INTERVALS, size: str = "256M",
                              duration: float = 6.0) -> list[dict]:
    """Pause and guest slowdown vs interval, per strategy. The guest writes random pages as
    fast as it can and reports its own rate; slowdown = 1 - rate(on) / rate(off), off measured
    before and after each point."""
    args = ("--size", size, "--fill", "0.5", "--rate", "0", "--partial", "0.3", "--dup", "0.1",
            "--zero", "0.1", "--seed", "1", "--duration", str(duration))
    return await _slowdown_rows(workdir, args, [
        ({"strategy": s}, options(s, i)) for s in strategies for i in intervals])


async def hugepage_experiment(workdir: Path, *, intervals: Sequence[float] = (0.5, 1.0, 2.0),
                              size: str = "256M", duration: float = 6.0) -> list[dict]:
    """4 KiB vs 2 MiB (hugetlb) guest RAM, wp tracking: pause and guest slowdown vs interval.
    Needs 2 MiB pages reserved in /proc/sys/vm/nr_hugepages (reserved here if root may)."""
    need = -(-int(size[:-1]) * {"M": 1, "G": 1024}[size[-1]] // 2)
    with _hugepages(need):
        rows = []
        for huge in (False, True):
            args = ("--size", size, "--fill", "0.5", "--rate", "0", "--seed", "5",
                    "--duration", str(duration), *(("--hugetlb",) if huge else ()))
            rows += await _slowdown_rows(workdir, args, [
                ({"pages": "2M" if huge else "4K"}, options("wp", i)) for i in intervals],
                skip=1)
    return rows


@contextlib.contextmanager
def _hugepages(count: int) -> Iterator[None]:
    """At least count free 2 MiB pages for the duration (as root), then the old reservation."""
    path = Path("/proc/sys/vm/nr_hugepages")
    old = int(path.read_text())
    path.write_text(str(old + count))
    try:
        yield
    finally:
        path.write_text(str(old))


async def dedup_experiment(workdir: Path, *, checkpoints: int = 100, interval: float = 0.1,
                           strategy: str = DEFAULT_STRATEGY) -> list[dict]:
    """Data per checkpoint over a run of a duplicate-heavy guest: one row per checkpoint."""
    args = ("--size", "256M", "--fill", "0.3", "--rate", "20000", "--dup", "0.4", "--zero",
            "0.2", "--seed", "2")
    _, records = await _synth_run(workdir, args, options(strategy, interval), checkpoints)
    # Each row's effective interval: since the previous checkpoint's pause (none for the first).
    return [{"id": r["id"], **interval_kept(records[max(0, n - 1):n + 1], interval, skip=0),
             "pages_dirtied": r["pages_dirtied"],
             "pages_stored_new": r["pages_stored_new"], "dedup_hits": r["dedup_hits"],
             "zero_pages": r["zero_pages"], "bytes_added": r["bytes_added"],
             "pause_ms": r["pause"] * 1e3} for n, r in enumerate(records)]


async def priority_experiment(workdir: Path, *, copiers: Sequence[int] = (1, 2),
                              interval: float = 0.5, duration: float = 6.0) -> list[dict]:
    """Copier count and copy priority (wp tracking): a guest rewriting its RAM in order as fast
    as it can, so that after each pause it writes into pages still owed; how many of those
    writes had to wait for a copy-on-write, and how fast the guest went."""
    args = ("--size", "128M", "--fill", "1", "--rate", "0", "--pattern", "seq", "--seed", "4",
            "--duration", str(duration))
    rows = []
    for n in copiers:
        for priority in (False, True):
            rate, records = await _synth_run(workdir, args, EngineOptions(
                interval=interval, copiers=n, priority=priority, pre_arm=0.0))
            steady = records[1:]
            rows.append({"copiers": n, "priority": priority,
                         **interval_kept(records, interval, skip=1),
                         "cow_copies": sum(r["cow_copies"] for r in steady),
                         "copier_copies": sum(r["copier_copies"] for r in steady),
                         "guest_pages_per_s": rate, **_pause_row(records, skip=1)})
    return rows


def dedup_summary(rows: list[dict]) -> dict:
    """Totals of a dedup_experiment: what was dirtied and how little of it was stored."""
    keys = ("pages_dirtied", "pages_stored_new", "dedup_hits", "zero_pages", "bytes_added")
    total = {k: sum(r[k] for r in rows) for k in keys}
    return {"checkpoints": len(rows), **total,
            "saved_share": 1 - total["pages_stored_new"] / max(1, total["pages_dirtied"])}


async def scaling_experiment(workdir: Path, *, sizes: Sequence[str] = ("256M", "1G", "4G"),
                             strategies: Sequence[str] = ("wp", "wp+pre-arm", "async",
                                                          "hybrid"),
                             rate: int = 20000,
                             interval: float = 0.5, duration: float = 5.0) -> list[dict]:
    """Pause and drain at several RAM sizes with the same dirty rate: cost follows the dirty
    pages, not the RAM."""
    rows = []
    for size in sizes:
        args = ("--size", size, "--fill", "0.1", "--rate", str(rate), "--seed", "3",
                "--duration", str(duration))
        for strategy in strategies:
            _, records = await _synth_run(
                workdir, args, options(strategy, interval))
            rows.append({"ram": size, "strategy": strategy,
                         **interval_kept(records, interval), **_pause_row(records)})
    return rows


async def _qemu_snapshot(qmp: Qmp, path: Path, *, background: bool) -> tuple[float, float, int]:
    """One of QEMU's own whole-VM snapshots into path: (pause, total time, bytes)."""
    await qmp.set_capability("x-ignore-shared", False)
    await qmp.set_capability("background-snapshot", background)
    # QEMU's best: no bandwidth cap (its default, 128 MiB/s, is meant for live migration).
    await qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await qmp.send_fd(fd, "snapshot")
    finally:
        os.close(fd)
    t0 = time.perf_counter()
    if not background:
        await qmp.cmd("stop")
    await qmp.cmd("migrate", uri="fd:snapshot")
    info = await qmp.wait_migration()
    if not background:
        await _cont_after_migrate(qmp)
    total = time.perf_counter() - t0
    await qmp.set_capability("background-snapshot", False)
    size = path.stat().st_size
    path.unlink()
    return (info["downtime"] / 1e3 if background else total), total, size


async def _cont_after_migrate(qmp: Qmp) -> None:
    """QMP cont after a paused migrate. QEMU says "completed" a moment before it leaves run
    state finish-migrate, and refuses cont until it has ("Migration is not finalized yet";
    seen once in 30 paused migrates here): ask again until it takes it."""
    while True:
        try:
            await qmp.cmd("cont")
            return
        except QemuError as e:
            if "not finalized" not in str(e):
                raise
        await asyncio.sleep(0.0005)


async def qemu_experiment(workdir: Path, *, mems: Sequence[str] = ("256M",),
                          works: Sequence[str] = ("dirty",), **kw: object) -> list[dict]:
    """qemu_comparison for each guest size and workload (idle, dirty)."""
    return [row for mem in mems for work in works
            for row in await qemu_comparison(workdir, mem=mem, work=work, **kw)]


# QEMU's own snapshots, and the guests they are taken on: wp's (no pre-arm: the engine's
# plainest mode) and the default strategy's, each after its vmckpt run.
QEMU_KINDS = (("qemu migrate (paused)", False), ("qemu background-snapshot", True))
QEMU_GUESTS = ("wp", DEFAULT_STRATEGY)


async def qemu_comparison(workdir: Path, *, mem: str = "256M", work: str = "dirty",
                          strategies: Sequence[str] = STRATEGIES, interval: float = 1.0,
                          checkpoints: int = 15, snapshots: int = 15) -> list[dict]:
    """The test guest under vmckpt (each strategy, one guest each), then on the guests of
    QEMU_GUESTS QEMU's paused `migrate` to a file and its `background-snapshot`, snapshots of
    each at the same interval: pause (p50, p99, min, max), total time, bytes per checkpoint.
    Each row's "guest" is the strategy whose guest it ran on."""
    qemu_on = [s for s in QEMU_GUESTS if s in strategies] or list(strategies[:1])
    rows = []
    for strategy in strategies:
        async with await _booted(workdir, mem, strategy, work) as prog:
            with open_store(workdir / f"store-{mem}-{work}-{strategy}", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store, options(strategy, interval))
                kept: list[dict] = []
                engine.on_committed = kept.append
                await engine.run(asyncio.Event(), max_checkpoints=checkpoints + 2)
            steady = kept[2:]
            done = [(r["pause"], r["pause"] + r["drain_time"] + r["commit_time"],
                     r["bytes_added"] + r["device_state"]["size"]) for r in steady]
            default = " (default)" if strategy == DEFAULT_STRATEGY else ""
            rows.append({"guest": strategy, **_snapshot_row(f"vmckpt {strategy}{default}", done),
                         **interval_kept(steady, interval, skip=0), **_pause_parts(steady)})
            if strategy not in qemu_on:
                continue
            prog.tracker.close()  # QEMU's background snapshot registers guest RAM itself
            qmp = prog.target.qmp  # type: ignore[attr-defined]
            for kind, background in QEMU_KINDS:
                taken, starts, broke = await _qemu_snapshots(qmp, workdir / "snap", snapshots,
                                                             interval, background=background)
                rows.append({"guest": strategy, **_snapshot_row(kind, taken),
                             **interval_kept([{"time": t} for t in starts], interval, skip=0),
                             **_pause_parts([]), "qemu_broke": broke})
    # Target 3's ratios, side by side: QEMU's paused migrate's pause over each row's, and
    # background-snapshot's bytes over each row's (>= 10 and >= 5 are the aims), QEMU's taken
    # on the row's own guest, or (strategies QEMU did not run beside) on the default's.
    fallback = DEFAULT_STRATEGY if DEFAULT_STRATEGY in qemu_on else qemu_on[0]
    for r in rows:
        on = r["guest"] if r["guest"] in qemu_on else fallback
        migrate, background = (next(q for q in rows if q["kind"] == k and q["guest"] == on)
                               for k, _ in QEMU_KINDS)
        r["ratios_vs_guest"] = on
        r["migrate_pause_x"] = migrate["pause_p50_ms"] / r["pause_p50_ms"]
        r["bgsnap_bytes_x"] = background["MB_per_checkpoint"] / r["MB_per_checkpoint"]
    return [{"ram": mem, "work": work, **r} for r in rows]


async def _qemu_snapshots(qmp: Qmp, path: Path, count: int, interval: float, *,
                          background: bool
                          ) -> tuple[list[tuple[float, float, int]], list[float], str | None]:
    """count of QEMU's snapshots, one every interval as the engine schedules its checkpoints
    (start to start; one that runs past the next start delays it): each one's (pause, total,
    bytes), the wall times they started at, and why QEMU stopped taking them before count
    (None: it did not). QEMU 7.2's background-snapshot now and then ends with
    "bg_migration_iteration_finish: Unknown ending state" on its stderr and leaves its
    migration state behind: every later migrate is refused ("duplicate yank instance"), so
    that guest takes no more."""
    taken, starts = [], []
    next_at = time.monotonic()
    for _ in range(count):
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at, time.monotonic())
        starts.append(time.time())
        try:
            taken.append(await _qemu_snapshot(qmp, path, background=background))
        except QemuError as e:
            if "duplicate yank instance" not in str(e) or not taken:
                raise
            starts.pop()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return taken, starts, f"{e} after {len(taken)} of {count}"
    return taken, starts, None


async def _booted(workdir: Path, mem: str, strategy: str,
                  work: str = "dirty") -> TrackedProgram:
    """The test guest (dirtying: 5,000 pages/s over 64 MiB) under a tracker, once it counts."""
    log = workdir / f"serial-{mem}-{strategy}-{work}.log"
    argv = qemu_argv(mem=mem, work=work, rate=5000, mb=64, serial=f"file:{log}")
    prog = await TrackedProgram.start(argv, workdir / "e.sock",
                                      tracking=options(strategy, 1.0).tracking)
    while not (log.exists() and ticks(log.read_bytes())):
        await asyncio.sleep(0.1)
    return prog


async def qemu_interval_experiment(workdir: Path, *, mem: str = "256M",
                                   strategies: Sequence[str] = STRATEGIES,
                                   intervals: Sequence[float] = INTERVALS,
                                   checkpoints: int = 8) -> list[dict]:
    """Pause vs interval on the QEMU test guest with a steady dirtying workload: one guest
    and one store per strategy, the interval changed between runs of checkpoints."""
    rows = []
    for strategy in strategies:
        async with await _booted(workdir, mem, strategy) as prog:
            with open_store(workdir / f"store-{mem}-{strategy}", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store,
                                options(strategy, intervals[0]))
                await engine.run(asyncio.Event(), max_checkpoints=2)  # tracking set up
                for interval in intervals:
                    engine.options = options(strategy, interval)
                    kept: list[dict] = []
                    engine.on_committed = kept.append
                    await engine.run(asyncio.Event(),
                                     max_checkpoints=engine.committed + checkpoints)
                    rows.append({"strategy": strategy,
                                 **interval_kept(kept, interval, skip=0),
                                 **_pause_row(kept, skip=0)})
    return rows


def _pause_parts(records: list[dict]) -> dict:
    """Medians of the parts of vmckpt's pause (QMP stop, arm, device-state save, QMP cont:
    engine/cycle.py times each) in ms; nan for QEMU's snapshots, which are not split."""
    return {f"{part}_p50_ms": _ms([r["pause_parts"][part] for r in records], 50)
            for part in ("stop", "arm", "extra", "resume")}


def _snapshot_row(kind: str, taken: list[tuple[float, float, int]]) -> dict:
    pauses = [p for p, _, _ in taken]
    return {"kind": kind, "n": len(taken), "pause_p50_ms": _ms(pauses, 50),
            "pause_p99_ms": _ms(pauses, 99), "pause_min_ms": _ms(pauses, 0),
            "pause_max_ms": _ms(pauses, 100),
            "total_p50_ms": _ms([t for _, t, _ in taken], 50),
            "MB_per_checkpoint": statistics.median(b for _, _, b in taken) / 1e6}


# `vmckpt bench NAME` runs each with its defaults, reduced to fit in 10 minutes on a 2-core
# machine; `--full` with these (the sizes the research asks for; tens of minutes each).
FULL: dict[str, dict[str, object]] = {
    "interval": {"size": "1G", "duration": 20.0},
    "qemu-interval": {"mem": "1G", "checkpoints": 20},
    "dedup": {"checkpoints": 1000},
    "scaling": {"duration": 20.0},
    "priority": {"duration": 20.0},
    "hugepages": {"size": "1G", "duration": 20.0},
    "qemu": {"mems": ("256M", "1G"), "works": ("idle", "dirty"), "checkpoints": 40,
             "snapshots": 40},
}

EXPERIMENTS = {"interval": interval_experiment, "qemu-interval": qemu_interval_experiment,
               "dedup": dedup_experiment, "scaling": scaling_experiment,
               "priority": priority_experiment, "hugepages": hugepage_experiment,
               "qemu": qemu_experiment}
