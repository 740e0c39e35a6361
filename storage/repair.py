"""Salvaging a damaged store, the way `borg check --repair` does: every checkpoint that
`vmckpt check --read-data` finds intact is kept, restorable bit-exact; the damaged ones are
dropped, and a kept checkpoint whose map chain went through a dropped one gets its map rewritten
as a full map (prune's plan). What is kept is copied into a new store, verified pages only, so
that no bad block, truncated table or corrupt page stays behind for later runs to deduplicate
against; the damaged store is kept aside, renamed, never deleted. A store RocksDB cannot open
(CURRENT or MANIFEST lost, a table file truncated) is first read through RocksDB's own repair,
run on a copy made of hard links (table files are never changed in place)."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rocksdict import Options, Rdict
from vmckpt.storage.errors import Damaged, NotAStore, StoreLocked
from vmckpt.storage.inspect import as_ids, check_store, device_ids
from vmckpt.storage.pagemap import ID_BYTES, MapDelta
from vmckpt.storage.private import private_dir
from vmckpt.storage.prune import PruneResult, plan
from vmckpt.storage.rocks import CFS, Budget, RocksStore, _options, looks_like_store

COPY = 1024  # pages copied at a time


@dataclass
class RepairResult:
    dry_run: bool
    checkpoints: int  # before
    problems: list[str] = field(default_factory=list)  # what check --read-data found
    kept: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    rewritten: list[int] = field(default_factory=list)  # kept; their map becomes a full map
    reparented: list[dict] = field(default_factory=list)  # {"id", "parent", "was"}
    rocksdb_repair: bool = False  # RocksDB's own repair was needed to read the store
    set_aside: list[str] = field(default_factory=list)  # files RocksDB's repair could not use
    pages: int = 0  # pages copied into the repaired store
    damaged_store: str | None = None  # where the damaged store is kept (None: not changed)

    @property
    def needed(self) -> bool:
        return bool(self.problems or self.rocksdb_repair)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Holds the store's RocksDB lock, as an engine holds it: no engine starts on the store
    while it is repaired, and one that runs already makes the repair refuse."""
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreLocked(f"store {path} is locked by another process (a running engine?): "
                              "stop it before repairing the store") from None
        yield
    finally:
        os.close(fd)


def staged(path: Path) -> tuple[Path, list[str]]:
    """A copy of the store (table files hard-linked, the small files copied) on which
    RocksDB's repair rebuilds a manifest from the table files it can read; returns it and the
    files it set aside."""
    stage = path.with_name(f".{path.name}.repair-source")
    shutil.rmtree(stage, ignore_errors=True)
    private_dir(stage)
    for f in path.iterdir():
        if f.name == "LOCK" or not f.is_file():
            continue
        if f.suffix == ".sst":
            os.link(f, stage / f.name)
        else:
            shutil.copy2(f, stage / f.name)
    Rdict.repair(str(stage), _options())
    lost = sorted(f.name for f in (stage / "lost").iterdir()) if (stage / "lost").is_dir() \
        else []
    # A family with no table file left is not recreated: open once to add it back, empty.
    families = set(Rdict.list_cf(str(stage), Options(raw_mode=True)))
    if not set(CFS) <= families:
        budget = Budget()
        db = Rdict(str(stage), _options(budget=budget),
                   column_families={c: _options(budget=budget) for c in CFS})
        db.close()
    return stage, [name for name in lost if name.endswith(".sst")]


def repair_store(path: str | Path, *, dry_run: bool = False,
                 announce: Callable[[RepairResult], None] | None = None) -> RepairResult:
    """Repairs the store at path (with dry_run, only plans); announce(plan) is called with the
    plan before anything is changed."""
    path = Path(path)
    if not path.is_dir() or not (looks_like_store(path) or (path / "CURRENT").exists()):
        raise NotAStore(f"no vmckpt store at {path}")
    with exclusive(path):
        stage = None
        try:
            src, stage, set_aside = open_source(path)
            with src:
                result, kept = plan_repair(src, dry_run)
                result.rocksdb_repair, result.set_aside = stage is not None, set_aside
                if announce:
                    announce(result)
                if not dry_run and result.needed:
                    rebuilt = path.with_name(f".{path.name}.repaired")
                    shutil.rmtree(rebuilt, ignore_errors=True)
                    result.pages = rebuild(src, rebuilt, result, kept)
                    aside = path.with_name(f"{path.name}.damaged-"
                                           f"{time.strftime('%Y%m%d-%H%M%S')}")
                    os.rename(path, aside)
                    os.rename(rebuilt, path)
                    result.damaged_store = str(aside)
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
    return result


def open_source(path: Path) -> tuple[RocksStore, Path | None, list[str]]:
    """The store opened to read what can be salvaged: as it is if RocksDB can, else through
    RocksDB's repair of a staged copy."""
    try:
        src = RocksStore(path, readonly=True)
    except Damaged:
        pass
    else:
        if not src.truncated_tables():
            return src, None, []
        src.close()  # a truncated table hides the older tables' keys: set it aside
    stage, set_aside = staged(path)
    return RocksStore(stage, readonly=True), stage, set_aside


def plan_repair(src: RocksStore, dry_run: bool) -> tuple[RepairResult, dict[int, dict]]:
    """What the repair does, and the records of the kept checkpoints as they will be."""
    report = check_store(src, read_data=True)
    records, unreadable = src.read_records()
    result = RepairResult(dry_run, report.checkpoints,
                          problems=[p.message for p in report.problems])
    keep = {r["id"] for r in records} - set(report.damaged)
    prune = PruneResult(dry_run, report.checkpoints)
    updates = plan(records, keep, prune)
    result.kept, result.rewritten, result.reparented = prune.kept, prune.rewritten, \
        prune.reparented
    result.dropped = sorted({*prune.dropped, *unreadable})
    return result, {r["id"]: updates.get(r["id"], r) for r in records if r["id"] in keep}


def rebuild(src: RocksStore, dest: Path, result: RepairResult, kept: dict[int, dict]) -> int:
    """Writes the kept checkpoints into a new store at dest; returns the pages copied."""
    maps: dict[int, bytes] = {}
    rows = []
    for ckpt in result.kept:
        rec = kept[ckpt]
        if ckpt in result.rewritten:
            maps[ckpt] = src.read_map(ckpt).sparse().encode("full")
            rec["map"]["bytes"] = len(maps[ckpt])
        else:
            maps[ckpt] = src.map_blob(ckpt)
        rows.append(MapDelta.decode(maps[ckpt])[1].ids)
        if rec.get("device_state"):
            rows.append(device_ids(rec, src.page_size))
    ids = np.concatenate(rows) if rows else np.zeros((0, ID_BYTES), np.uint8)
    wanted = np.unique(as_ids(ids[ids.any(axis=1)]))
    with RocksStore(dest, create=True, full_every=src.full_every) as new:
        for lo in range(0, len(wanted), COPY):
            chunk = [pid.tobytes() for pid in wanted[lo:lo + COPY]]
            pages = src.get_pages(chunk)  # every one verified by the check
            new.put_pages(np.frombuffer(b"".join(chunk), np.uint8).reshape(-1, ID_BYTES),
                          np.frombuffer(b"".join(pages), np.uint8).reshape(-1, src.page_size))
        new.flush()  # the pages on disk before any record names them
        new.reserve_ids(src._high)
        new.replace_checkpoints([], [kept[c] for c in result.kept], maps)
    return len(wanted)
