"""Looking into a store without changing it: map chains, what differs between maps, store-wide
figures, the consistency check, and export. The CLI presents what these return."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from vmckpt.storage.blob import get_blob
from vmckpt.storage.errors import Damaged, MissingPage, id_ranges
from vmckpt.storage.interface import PageStore
from vmckpt.storage.pagemap import ID_BYTES, MapDelta, PageMap, page_ids
from vmckpt.storage.private import private_dir, write_private
from vmckpt.storage.regions import Region, disk_file_name, disk_regions, map_pages, ram_region
from vmckpt.storage.restore import RestoreStats, restore_image

# A page id as one numpy value: sortable and comparable, so sets of ids stay vectorised.
ID = np.dtype((np.void, ID_BYTES))
BATCH = 1024  # pages hashed at a time
MAX_LISTED = 10  # bad pages listed one by one; more that share what is wrong share a line


def as_ids(rows: np.ndarray) -> np.ndarray:
    """uint8[n, 32] page ids -> ID[n]."""
    return np.ascontiguousarray(rows, np.uint8).view(ID).reshape(-1)


def map_chain(store: PageStore, rec: dict) -> list[dict]:
    """The map blobs a restore of rec reads, newest first: its own back to a full map. Only
    records are read."""
    chain = []
    while True:
        chain.append({"id": rec["id"], "kind": rec["map"]["kind"], "bytes": rec["map"]["bytes"]})
        if rec["map"]["kind"] == "full":
            return chain
        rec = store.get_record(rec["parent"])


def differing_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rows (ascending) whose id differs between two runs of page ids; rows beyond the
    shorter count as zero there."""
    n = min(len(a), len(b))
    longer = a if len(a) > len(b) else b
    return np.concatenate([np.flatnonzero((a[:n] != b[:n]).any(axis=1)),
                           n + np.flatnonzero(longer[n:].any(axis=1))])


def region_ids(pmap: PageMap, region: Region | None) -> np.ndarray:
    """The page ids of a region's frames (none for a region the checkpoint does not have)."""
    if region is None:
        return np.zeros((0, ID_BYTES), np.uint8)
    return pmap.ids[region.first:region.first + region.pages]


@dataclass
class DiskDiff:
    device: str
    blocks: int        # the larger of its two sizes, in blocks
    differing: np.ndarray  # block numbers (ascending) whose content differs
    present: str       # "both", or the only side that has it: "a" or "b"


def ram_and_disk_diffs(ra: dict, ma: PageMap, rb: dict, mb: PageMap
                       ) -> tuple[np.ndarray, list[DiskDiff]]:
    """What differs between two checkpoints: guest RAM's frames, and each disk's blocks (by
    device; a disk only one of them has differs wherever it holds data)."""
    ram = differing_ids(region_ids(ma, ram_region(ra)), region_ids(mb, ram_region(rb)))
    da = {r.name: r for r in disk_regions(ra)}
    db = {r.name: r for r in disk_regions(rb)}
    disks = []
    for name in [*da, *(n for n in db if n not in da)]:
        a, b = da.get(name), db.get(name)
        present = "both" if a and b else "a" if a else "b"
        disks.append(DiskDiff(name, max(r.pages for r in (a, b) if r),
                              differing_ids(region_ids(ma, a), region_ids(mb, b)), present))
    return ram, disks


def disk_changes(rec: dict, pmap: PageMap, before: PageMap) -> list[dict]:
    """Each disk's blocks that differ from the parent's map and those holding data."""
    out = []
    for region in disk_regions(rec):
        ids = region_ids(pmap, region)
        out.append({"device": region.name, "blocks": region.pages,
                    "changed_blocks": len(differing_ids(region_ids(before, region), ids)),
                    "data_blocks": int(ids.any(axis=1).sum())})
    return out


def changes(store: PageStore, rec: dict) -> tuple[PageMap, np.ndarray, list[dict]]:
    """A checkpoint's map, the frames of guest RAM that differ from its parent's (for a first
    checkpoint, every frame that holds data), and each disk's changed blocks (disk_changes)."""
    pmap = store.read_map(rec["id"])
    parent = rec.get("parent")
    before = store.read_map(parent) if parent is not None else PageMap.empty(pmap.npages)
    ram = ram_region(rec)
    return (pmap, differing_ids(region_ids(before, ram), region_ids(pmap, ram)),
            disk_changes(rec, pmap, before))


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    """Ascending pfns as contiguous runs: (first pfn, number of pages)."""
    if not len(pfns):
        return []
    cuts = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(pfns)]])
    return [(int(pfns[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(values))}


def store_stats(store: PageStore, top: int = 10) -> dict:
    """Store-wide figures from the records, the page and disk counts, and the newest
    checkpoint's map (the only map read: zero share and duplicated pages come from it)."""
    records = store.list_checkpoints()
    size = store.page_size
    disk = store.disk_usage()
    pages = store.page_count()

    def total(key: str) -> int:
        return sum(r.get(key) or 0 for r in records)

    logical, new, dup = total("ram_size"), total("pages_stored_new"), total("dedup_hits")
    dirtied, zero = total("pages_dirtied"), total("zero_pages")

    def disk_total(key: str) -> int:
        return sum(d.get(key) or 0 for r in records for d in r.get("disks") or ())

    disk_logical = disk_total("size")
    newest = None
    if records:
        last = records[-1]["id"]
        pmap = store.read_map(last)
        used = pmap.ids[pmap.nonzero_pfns()]
        uniq, counts = np.unique(as_ids(used), return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        newest = {"id": last, "pages": pmap.npages, "zero_pages": pmap.npages - len(used),
                  "distinct_pages": len(uniq),
                  "top_pages": [{"id": uniq[i].tobytes().hex(), "frames": int(counts[i])}
                                for i in order if counts[i] > 1]}
    return {
        "format": store.format_info(),
        "checkpoints": len(records),
        "logical_bytes": logical,
        "stored_pages": pages,
        "stored_bytes": pages * size,
        "disk_bytes": disk,
        "disk_logical_bytes": disk_logical,
        "disk_blocks_dirty": disk_total("blocks_dirty"),
        "disk_blocks_stored_new": disk_total("blocks_new"),
        "disk_blocks_dedup": disk_total("blocks_dedup"),
        "logical_to_stored": (logical + disk_logical) / (pages * size) if pages else None,
        "pages_copied": new + dup,
        "pages_stored_new": new,
        "dedup_ratio": (new + dup) / new if new else None,
        "compression_ratio": pages * size / disk["pages"] if disk["pages"] else None,
        "zero_share_copied": zero / dirtied if dirtied else None,
        "zero_share_newest": newest["zero_pages"] / newest["pages"] if newest else None,
        "newest": newest,
        "pause": percentiles([r["pause"] for r in records if r.get("pause") is not None]),
        "drain_time": percentiles([r["drain_time"] for r in records
                                   if r.get("drain_time") is not None]),
    }


@dataclass
class Problem:
    kind: str  # store, truncated_table, bad_record, missing_map, bad_map, broken_chain,
    #            long_chain, bad_device_state, missing_page, unreadable_page, corrupt_page,
    #            damaged_pages
    message: str
    checkpoint: int | None = None
    pfn: int | None = None
    page: str | None = None  # hex page id
    checkpoints: list[int] = field(default_factory=list)  # those whose restore needs the page


# Problems that leave the checkpoints they name restorable (a chain longer than the store's
# limit restores; only restores get slower).
HARMLESS = {"long_chain"}


@dataclass
class CheckReport:
    read_data: bool
    checkpoints: int = 0
    maps_checked: int = 0
    pages_checked: int = 0  # stored pages hashed
    pages_stored: int = 0
    complete: bool = True
    seconds: float = 0.0
    format_version: int | None = None
    problems: list[Problem] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)  # checkpoints that cannot be restored
    intact: list[int] = field(default_factory=list)  # the others: restorable bit-exact

    @property
    def sound(self) -> bool:
        return self.complete and not self.problems


def decode_map(store: PageStore, rec: dict) -> MapDelta | Problem:
    """A record's map blob, decoded and checked against the record; or what is wrong with it."""
    ckpt = rec["id"]
    try:
        blob = store.map_blob(ckpt)
    except Damaged as e:
        return Problem("bad_map", f"checkpoint {ckpt}: {damage_text(e)}", ckpt)
    if blob is None:
        return Problem("missing_map", f"checkpoint {ckpt} has no map", ckpt)
    meta = rec.get("map") or {}
    if len(blob) != meta.get("bytes"):
        why = (f"is {len(blob)} bytes where its record says {meta.get('bytes')} "
               "(truncated or overwritten)")
    else:
        try:
            kind, delta = MapDelta.decode(blob)
        except (ValueError, KeyError, TypeError) as e:
            why = f"cannot be decoded ({e})"
        else:
            npages = map_pages(rec)
            if kind != meta["kind"]:
                why = f"is a {kind} map where its record says {meta['kind']}"
            elif len(delta.ids) != len(delta.pfns) or (len(delta.pfns)
                                                      and delta.pfns.max() >= npages):
                why = f"names frames that do not fit the checkpoint's {npages} pages"
            else:
                return delta
    return Problem("bad_map", f"checkpoint {ckpt}: its map {why}", ckpt)


def damage_text(e: Damaged) -> str:
    """What a Damaged error says is wrong, about the checkpoint it names first ("its map ..."):
    a check report names the store and gives the advice once."""
    text = e.what
    if e.checkpoints:
        ckpt = e.checkpoints[0]
        text = text.replace(f"the map of checkpoint {ckpt}", "its map").replace(
            f"the record of checkpoint {ckpt}", "its record")
    return text


def device_ids(rec: dict, page_size: int) -> np.ndarray | None:
    """The page ids of a record's device state, None if its reference is malformed."""
    ref = rec["device_state"]
    raw = ref["ids"]
    if len(raw) % ID_BYTES or len(raw) // ID_BYTES != -(-ref["size"] // page_size):
        return None
    return np.frombuffer(raw, np.uint8).reshape(-1, ID_BYTES)


def check_store(store: PageStore, *, read_data: bool = False, max_seconds: float | None = None,
                progress: bool = False) -> CheckReport:
    """Verifies every record reads back whole and has a readable map, every map chain reaches a
    full map within full_every deltas, every page a map or device state names is stored and
    reads back (RocksDB verifies its block checksums), and with read_data that every stored
    page hashes to its id. Stops after max_seconds (the report says it is incomplete); problems
    found are always located, by checkpoint and frame, and the report says which checkpoints
    are damaged (cannot be restored) and which are intact."""
    t0 = time.monotonic()
    records, unreadable = store.read_records()
    fmt = store.format_info()
    full_every = fmt["full_every"]
    report = CheckReport(read_data, len(records) + len(unreadable),
                         pages_stored=store.page_count(), format_version=fmt.get("version"))
    bad: dict[bytes, tuple[str, str]] = {}  # page id -> (problem kind, what is wrong)
    deltas: dict[int, int] = {}  # checkpoint -> deltas above its full map (chain intact)
    broken: dict[int, int] = {ckpt: ckpt for ckpt in unreadable}  # -> where its chain breaks
    needed: list[np.ndarray] = []  # the page ids checkpoints name (unique in parts)
    for why in store.truncated_tables():
        report.problems.append(Problem(
            "truncated_table", f"{why}: what it holds cannot be read, nor what older table "
                               "files hold under the same keys, until `vmckpt check --repair` "
                               "sets it aside"))
    for ckpt, why in sorted(unreadable.items()):
        report.problems.append(Problem("bad_record", f"checkpoint {ckpt}: its record {why}",
                                       ckpt))

    def late() -> bool:
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            report.complete = False
        return not report.complete

    for rec in tqdm(records, desc="maps", unit="ckpt", disable=not progress):
        if late():
            break
        ckpt, parent = rec["id"], rec.get("parent")
        delta = decode_map(store, rec)
        if isinstance(delta, Problem):
            report.problems.append(delta)
            broken[ckpt] = ckpt
        elif rec["map"]["kind"] == "full":
            deltas[ckpt] = 0
        elif parent in deltas:
            deltas[ckpt] = deltas[parent] + 1
            if deltas[ckpt] > full_every:
                report.problems.append(Problem(
                    "long_chain", f"checkpoint {ckpt} is {deltas[ckpt]} deltas from a full "
                                  f"map; the store keeps at most {full_every}", ckpt))
        else:
            cause = broken.get(parent)
            broken[ckpt] = ckpt if cause is None else cause
            report.problems.append(Problem("broken_chain", (
                f"checkpoint {ckpt} cannot be restored: its map is a delta against checkpoint "
                f"{parent}, which does not exist" if cause is None else
                f"checkpoint {ckpt} cannot be restored: its map chain breaks at checkpoint "
                f"{cause}"), ckpt))
        rows = [delta.ids] if isinstance(delta, MapDelta) else []
        if rec.get("device_state"):
            device = device_ids(rec, store.page_size)
            if device is None:
                report.problems.append(Problem(
                    "bad_device_state", f"checkpoint {ckpt} has a device state reference whose "
                                        "page ids do not match its size", ckpt))
            else:
                rows.append(device)
        if rows:
            ids = np.concatenate(rows)
            needed.append(np.unique(as_ids(ids[ids.any(axis=1)])))  # zero frames: no page
        if len(needed) > 64:
            needed = [np.unique(np.concatenate(needed))]
        report.maps_checked += 1

    seen: set[bytes] = set()  # pages read and hashed by the scan of every stored page
    if read_data and report.complete:
        with tqdm(total=report.pages_stored, desc="pages", unit="page",
                  disable=not progress) as bar:
            try:
                for batch in _batches(store.iter_pages(), BATCH):
                    if late():
                        break
                    bad.update(_verify(batch, store.page_size))
                    seen.update(pid for pid, _ in batch)
                    report.pages_checked += len(batch)
                    bar.update(len(batch))
            except Damaged as e:  # the pages a checkpoint needs are each read below
                report.problems.append(Problem(
                    "damaged_pages", f"the scan of the stored pages stopped at a bad block "
                                     f"({e.what.split(' (', 1)[-1]}; the pages checkpoints need "
                                     "were then read one by one"))
    if report.complete and needed:
        wanted = [pid.tobytes() for pid in np.unique(np.concatenate(needed))]
        for lo in range(0, len(wanted), BATCH):
            if late():
                break
            chunk = [pid for pid in wanted[lo:lo + BATCH] if pid not in seen and pid not in bad]
            got = store.fetch_pages(chunk)
            whole = []
            for pid, page in zip(chunk, got, strict=True):
                if page is None:
                    bad[pid] = ("missing_page", "is missing")
                elif isinstance(page, Damaged):
                    bad[pid] = ("unreadable_page",
                                damage_text(page).removeprefix(f"page {pid.hex()} "))
                else:
                    whole.append((pid, page))
            if read_data:
                bad.update(_verify(whole, store.page_size))
                report.pages_checked += len(whole)

    if bad:
        _locate(store, records, bad, report)
    known = sorted([*(r["id"] for r in records), *unreadable])
    hit = {c for p in report.problems if p.kind not in HARMLESS
           for c in (p.checkpoints or ([p.checkpoint] if p.checkpoint is not None else []))}
    report.damaged = [c for c in known if c in hit]
    report.intact = [c for c in known if c not in hit] if report.complete else []
    report.seconds = time.monotonic() - t0
    return report


def plural(what: str) -> str:
    """'is missing' -> 'are missing', 'holds data ...' -> 'hold data ...'."""
    verb, _, rest = what.partition(" ")
    verb = {"is": "are", "holds": "hold", "does": "do"}.get(verb, verb)
    return f"{verb} {rest}"


def _batches(items: Iterator[tuple[bytes, bytes]], n: int) -> Iterator[list[tuple[bytes, bytes]]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _verify(batch: list[tuple[bytes, bytes]], size: int) -> dict[bytes, tuple[str, str]]:
    """The pages of batch that are not what their id says."""
    wrong = {pid: ("corrupt_page", f"is {len(page)} bytes, not {size}")
             for pid, page in batch if len(page) != size}
    whole = [(pid, page) for pid, page in batch if len(page) == size]
    if whole:
        got = page_ids(np.frombuffer(b"".join(p for _, p in whole), np.uint8).reshape(-1, size))
        for (pid, _), h in zip(whole, got, strict=True):
            if h.tobytes() != pid:
                wrong[pid] = ("corrupt_page",
                              f"holds data whose SHA-256 is {h.tobytes().hex()}")
    return wrong


def frame_text(rec: dict, pfn: int) -> str:
    """Where a frame of a checkpoint's map is: a page of guest RAM, or a disk's block."""
    for region in disk_regions(rec):
        if pfn in region.frames():
            return f"disk {region.name} block {pfn - region.first}"
    return f"pfn {pfn:#x}"


def _locate(store: PageStore, records: list[dict], bad: dict[bytes, tuple[str, str]],
            report: CheckReport) -> None:
    """One problem per bad page, naming the first checkpoint and frame that hold it and every
    checkpoint whose restore needs it. Replays the maps, keeping only the bad frames of each
    checkpoint, so it costs one decode of every map and no whole map."""
    wanted = np.unique(np.frombuffer(b"".join(bad), ID))
    held: dict[int, dict[int, bytes]] = {}  # checkpoint -> its frames holding a bad page
    where: dict[bytes, list[tuple[int, int | None]]] = {pid: [] for pid in bad}
    for rec in records:
        ckpt, parent = rec["id"], rec.get("parent")
        delta = decode_map(store, rec)
        if isinstance(delta, MapDelta):
            # Below a broken chain (reported already) only a delta's own frames are known.
            mine = held[parent].copy() if rec["map"]["kind"] == "delta" and parent in held \
                else {}
            for pfn in set(mine).intersection(delta.pfns.tolist()):
                del mine[pfn]
            for i in np.flatnonzero(np.isin(as_ids(delta.ids), wanted)):
                mine[int(delta.pfns[i])] = delta.ids[i].tobytes()
            held[ckpt] = mine
            for pfn, pid in sorted(mine.items()):
                where[pid].append((ckpt, pfn))
        if rec.get("device_state") and (device := device_ids(rec, store.page_size)) is not None:
            for row in device:
                if row.tobytes() in bad:
                    where[row.tobytes()].append((ckpt, None))
    by_id = {r["id"]: r for r in records}
    groups: dict[tuple[str, str], list[bytes]] = {}
    for pid, problem in bad.items():
        groups.setdefault(problem, []).append(pid)
    for (kind, what), pids in groups.items():
        if len(pids) <= MAX_LISTED:
            continue
        # One line for many pages gone the same way (a lost table file), not one each.
        ckpts = sorted({c for pid in pids for c, _ in where[pid]})
        report.problems.append(Problem(
            kind, f"{len(pids)} pages {plural(what)}"
                  + (f"; checkpoints that need them: {id_ranges(ckpts)}" if ckpts else
                     "; no readable map names them"),
            ckpts[0] if ckpts else None, checkpoints=ckpts))
        for pid in pids:
            del bad[pid]
    for pid, (kind, what) in bad.items():
        refs = where[pid]
        if not refs:
            report.problems.append(Problem(kind, f"page {pid.hex()} {what}; no readable map "
                                                 "names it", page=pid.hex()))
            continue
        ckpt, pfn = refs[0]
        ckpts = sorted({c for c, _ in refs})
        frame = "device state" if pfn is None else frame_text(by_id[ckpt], pfn)
        report.problems.append(Problem(
            kind, f"checkpoint {ckpt} {frame}: page {pid.hex()} {what}; checkpoints that need "
                  f"it: {id_ranges(ckpts)}", ckpt, pfn, pid.hex(), ckpts))


@dataclass
class Export:
    record: dict
    ram_image: Path
    restore: RestoreStats
    device_state: Path | None  # None: the checkpoint has no device state
    disks: dict[str, tuple[Path, RestoreStats]] = field(default_factory=dict)  # by device


def export_checkpoint(store: PageStore, ckpt: int | str, out_dir: Path) -> Export:
    """Writes out_dir/ram.img (sparse), out_dir/disk-DEVICE.img (raw, sparse) for each disk
    it holds and out_dir/device-state.bin (if the checkpoint has device state; older ones
    there are removed, so the directory never mixes two exports), for their owner's eyes
    only: a directory it makes is 0700, the files 0600."""
    rec = store.get_record(ckpt)
    private_dir(out_dir, narrow=False)
    ram = out_dir / "ram.img"
    stats = restore_image(store, rec["id"], ram)
    disks = {d["device"]: out_dir / f"disk-{disk_file_name(d['device'])}.img"
             for d in rec.get("disks") or ()}
    for old in set(out_dir.glob("disk-*.img")) - set(disks.values()):
        old.unlink()
    written = {device: (path, restore_image(store, rec["id"], path, disk=device))
               for device, path in disks.items()}
    device = out_dir / "device-state.bin"
    if rec.get("device_state"):
        try:
            state = get_blob(store, rec["device_state"])
        except Damaged as e:
            raise Damaged(e.store, f"checkpoint {rec['id']}: its device state cannot be read: "
                          f"{e.what}", (rec["id"],)) from None
        except MissingPage as e:
            raise MissingPage(f"checkpoint {rec['id']}: its device state cannot be read: {e}"
                              ) from None
        write_private(device, state)
        return Export(rec, ram, stats, device, written)
    device.unlink(missing_ok=True)
    return Export(rec, ram, stats, None, written)
