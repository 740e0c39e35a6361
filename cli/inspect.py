"""`vmckpt ls/show/diff/stats`: looking into a store. Every store command (these, check,
export, plot) opens it read-only, so they work while an engine checkpoints into it. --json
output is documented in docs/json-schema.md."""

from __future__ import annotations

import shlex
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
from vmckpt.cli.main import _fail, main, store_option
from vmckpt.cli.text import (
    SHORT_ID,
    age,
    checkpoint_arg,
    emit_json,
    glyphs,
    json_option,
    local_time,
    ms_text,
    reading,
    size_text,
    table,
)
from vmckpt.storage import PageMap
from vmckpt.storage.inspect import changes, map_chain, ram_and_disk_diffs, runs, store_stats

GRID_COLUMNS, GRID_ROWS = 64, 16
# Record fields that hold seconds or bytes, shown with units by `show`.
SECONDS = {"pause", "drain_time", "stop", "arm", "extra", "resume", "fault_service_p50",
           "fault_service_p99", "seconds", "interval", "pre_arm", "commit_time",
           "switch_pause", "switch_move"}
BYTES = {"ram_size", "page_size", "bytes_added", "buffer_bytes", "size", "bytes"}


# ---------------------------------------------------------------------------- ls


def since_time(text: str) -> float:
    """--since: a local ISO date/time, or an age like 90s, 10m, 2h, 3d."""
    seconds = age(text)
    if seconds is not None:
        return time.time() - seconds
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        _fail(f"--since takes a date/time (2026-11-22 14:00) or an age (10m, 2h), not {text!r}")


def tree_order(records: list[dict]) -> list[tuple[str, dict]]:
    """Records (in id order) as a tree: (prefix, record). A line of checkpoints goes straight
    down; a branch (a checkpoint whose parent is not the one before it, from `restore
    --checkpoint`) hangs indented right under the checkpoint it forks from, and the line it
    forks from carries on below the branch."""
    g = glyphs()
    ids = {r["id"] for r in records}
    children: dict[int, list[dict]] = defaultdict(list)
    roots = []
    for r in records:
        (children[r["parent"]] if r.get("parent") in ids else roots).append(r)
    out: list[tuple[str, dict]] = []

    def line(node: dict | None, head: str, lead: str) -> None:
        while node is not None:
            out.append((head, node))
            head = lead
            kids = children[node["id"]]
            for branch in kids[1:]:  # the first child, the oldest, continues the line
                line(branch, lead + g["fork"], lead + g["bar"])
            node = kids[0] if kids else None

    for root in roots:
        line(root, "", "")
    return out


def count_text(r: dict, key: str) -> str:
    return "-" if r.get(key) is None else str(r[key])


LS_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("parent", lambda r: count_text(r, "parent")),
    ("time", lambda r: local_time(r["time"])),
    ("VM", lambda r: (r.get("target") or {}).get("name") or "-"),
    ("RAM", lambda r: size_text(r.get("ram_size"))),
    ("dirtied", lambda r: count_text(r, "pages_dirtied")),
    ("new", lambda r: count_text(r, "pages_stored_new")),
    ("dedup", lambda r: count_text(r, "dedup_hits")),
    ("zero", lambda r: count_text(r, "zero_pages")),
    ("added", lambda r: size_text(r.get("bytes_added"))),
    ("disks", lambda r: "-" if r.get("disks") is None else str(len(r["disks"]))),
    ("disk new", lambda r: "-" if not r.get("disks") else
     str(sum(d.get("blocks_new") or 0 for d in r["disks"]))),
    ("pause ms", lambda r: ms_text(r.get("pause"))),
    ("drain ms", lambda r: ms_text(r.get("drain_time"), 0)),
]


@main.command("ls")
@store_option
@click.option("--last", type=int, help="Only the last N checkpoints.")
@click.option("--since", help="Only checkpoints taken since then: 2026-11-22T14:00, 10m, 2h.")
@json_option
def ls(store_path: Path, last: int | None, since: str | None, as_json: bool) -> None:
    """List the checkpoints with their figures; branches are drawn as a tree."""
    if last is not None and last < 1:
        _fail("--last takes a number of checkpoints, 1 or more")
    start = since_time(since) if since is not None else None
    with reading(store_path) as store:
        records = store.list_checkpoints()
    if start is not None:
        records = [r for r in records if r["time"] >= start]
    if last is not None:
        records = records[-last:]
    if as_json:
        emit_json(records)
        return
    rows = [["id", *(h for h, _ in LS_COLUMNS)]]
    rows += [[f"{prefix}{r['id']}", *(cell(r) for _, cell in LS_COLUMNS)]
             for prefix, r in tree_order(records)]
    table(rows, left=4)


# -------------------------------------------------------------------------- show


def value_text(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "time":
        return local_time(value, millis=True)
    if key in SECONDS and isinstance(value, int | float):
        return f"{value * 1e3:.3f} ms"
    if key in BYTES and isinstance(value, int):
        return f"{value} ({size_text(value)})"
    if isinstance(value, bytes):
        return f"{len(value) // 32} page ids" if key == "ids" else value.hex()
    if isinstance(value, list):
        return shlex.join(map(str, value))
    return str(value)


# Record fields `show` presents as tables of their own.
DISK_FIELDS = ("disks", "disks_skipped", "disks_not_captured")


def record_lines(rec: dict, indent: str = "  ") -> Iterator[str]:
    width = max(map(len, rec), default=0)
    for key, value in rec.items():
        if isinstance(value, dict) and value:
            yield f"{indent}{key}"
            yield from record_lines(value, indent + "  ")
        else:
            yield f"{indent}{key:<{width}}  {value_text(key, value)}"


def cell_shares(mask: np.ndarray, per_cell: int) -> np.ndarray:
    """The share of True in each run of per_cell frames (the last may be shorter)."""
    starts = np.arange(0, len(mask), per_cell)
    sizes = np.diff(np.append(starts, len(mask)))
    return np.add.reduceat(mask.astype(np.int64), starts) / sizes


def grid(changed: np.ndarray, data: np.ndarray, g: dict[str, str]) -> list[str]:
    """One character a cell: zero (no page holds data, none changed), unchanged, or shaded by
    the share of its pages that changed."""
    shade = np.array(list(g["shades"]))[np.clip(np.ceil(changed * 4).astype(int) - 1, 0, 3)]
    cells = np.where(changed > 0, shade, np.where(data > 0, g["same"], g["zero"]))
    return ["".join(cells[i:i + GRID_COLUMNS]) for i in range(0, len(cells), GRID_COLUMNS)]


def regions(pfns: np.ndarray, page_size: int) -> list[dict]:
    return [{"start": first * page_size, "end": (first + n) * page_size, "first_pfn": first,
             "pages": n} for first, n in runs(pfns)]


@main.command()
@store_option
@json_option
@click.argument("ckpt")
def show(store_path: Path, as_json: bool, ckpt: str) -> None:
    """Show checkpoint CKPT (an id, or 'latest'): its record, its device state, the maps a
    restore reads, and a map of the guest RAM it changed since its parent."""
    which = checkpoint_arg(ckpt, store_path)
    with reading(store_path) as store:
        rec = store.get_record(which)
        chain = map_chain(store, rec)
        pmap, changed, disk_changed = changes(store, rec)
    size = rec["page_size"]
    pages = rec["ram_size"] // size  # the grid is guest RAM's; disks have their own lines
    mask = np.zeros(pages, bool)
    mask[changed] = True
    data = pmap.ids[:pages].any(axis=1)
    per = max(1, -(-pages // (GRID_COLUMNS * GRID_ROWS)))
    disks = [{**{k: d.get(k) for k in ("device", "size", "format", "file", "blocks_dirty",
                                       "blocks_new", "blocks_dedup")}, **c}
             for d, c in zip(rec.get("disks") or (), disk_changed, strict=True)]
    changed_share, data_share = cell_shares(mask, per), cell_shares(data, per)
    device = rec.get("device_state")
    if as_json:
        emit_json({"record": rec, "device_state_bytes": device["size"] if device else None,
                   "map_chain": chain, "disks": disks,
                   "dirty": {"parent": rec.get("parent"), "pages": pages,
                             "changed_pages": len(changed),
                             "zero_pages": int(pages - data.sum()),
                             "cell_pages": per, "changed_share": changed_share.tolist(),
                             "data_share": data_share.tolist(),
                             "regions": regions(changed, size)}})
        return
    g = glyphs()
    click.echo(f"checkpoint {rec['id']}")
    click.echo("record")
    for line in record_lines({k: v for k, v in rec.items() if k not in DISK_FIELDS}):
        click.echo(line)
    click.echo("device state  " + (f"{size_text(device['size'])} ({device['size']} bytes, "
                                   f"{len(device['ids']) // 32} pages)" if device else "none"))
    click.echo(f"map chain     a restore reads {len(chain)} map(s), "
               f"{size_text(sum(m['bytes'] for m in chain))}, newest first:")
    table([["", "id", "kind", "bytes"]]
          + [["", str(m["id"]), m["kind"], size_text(m["bytes"])] for m in chain], left=1)
    since = ("its parent, checkpoint " + str(rec["parent"]) if rec.get("parent") is not None
             else "empty RAM (a first checkpoint)")
    show_disks(rec, disks)
    click.echo(f"dirty map     {len(changed)} of {pages} pages changed since {since} "
               f"({size_text(len(changed) * size)}); {int(pages - data.sum())} pages "
               "are zero")
    click.echo(f"              one cell = {size_text(per * size)} ({per} page"
               f"{'s' if per > 1 else ''}), {GRID_COLUMNS} cells a row; "
               f"'{g['zero']}' all zero, '{g['same']}' unchanged, "
               + ", ".join(f"'{c}' up to {25 * (i + 1)} %" for i, c in enumerate(g["shades"]))
               + " changed")
    digits = len(f"{pages * size - 1:x}")
    for i, row in enumerate(grid(changed_share, data_share, g)):
        click.echo(f"  {i * GRID_COLUMNS * per * size:#0{digits + 2}x} |{row}|")


def show_disks(rec: dict, disks: list[dict]) -> None:
    """The checkpoint's disks: one line each with its figures; those skipped or left out."""
    if disks:
        click.echo(f"disks         {len(disks)} captured (blocks of 4 KiB: dirty = read at "
                   "this checkpoint, new = stored, dedup = already stored; changed since the "
                   "parent; holding data):")
        table([["", "device", "size", "format", "dirty", "new", "dedup", "changed", "data",
                "file"]]
              + [["", d["device"], size_text(d["size"]), str(d["format"]),
                  *(count_text(d, k) for k in ("blocks_dirty", "blocks_new", "blocks_dedup",
                                               "changed_blocks", "data_blocks")),
                  str(d["file"])] for d in disks], left=2)
    elif "disks" in rec:
        click.echo("disks         none captured")
    for d in rec.get("disks_skipped") or ():
        click.echo(f"              skipped: {d['device']} ({d['why']})")
    for d in rec.get("disks_not_captured") or ():
        click.echo(f"              not captured: {d['device']} ({d.get('file')}): a restore "
                   "gives the guest this disk as it is then")


# -------------------------------------------------------------------------- diff


def region_table(found: list[dict], digits: int, size: int, unit: str = "pages") -> None:
    table([["", "from", "to", unit, "size"]]
          + [["", f"{r['start']:#0{digits}x}", f"{r['end'] - 1:#0{digits}x}", str(r["pages"]),
              size_text(r["pages"] * size)] for r in found], left=3)


def id_at(pmap: PageMap, pfn: int) -> bytes | None:
    """The page id of a frame, None for a zero frame (or one beyond the map)."""
    if pfn >= pmap.npages or not pmap.ids[pfn].any():
        return None
    return pmap.ids[pfn].tobytes()


@main.command()
@store_option
@click.option("--pages", "list_pages", is_flag=True,
              help="Also list every differing page frame with both page ids.")
@json_option
@click.argument("a")
@click.argument("b")
def diff(store_path: Path, list_pages: bool, as_json: bool, a: str, b: str) -> None:
    """Show which guest pages differ between checkpoints A and B (ids or 'latest'), by
    guest-physical region, and which blocks of each disk, by offset in the disk."""
    which_a, which_b = checkpoint_arg(a, store_path), checkpoint_arg(b, store_path)
    with reading(store_path) as store:
        ra, rb = store.get_record(which_a), store.get_record(which_b)
        ma, mb = store.read_map(ra["id"]), store.read_map(rb["id"])
    size = ra["page_size"]
    pfns, disk_diffs = ram_and_disk_diffs(ra, ma, rb, mb)
    pages = max(ra["ram_size"], rb["ram_size"]) // size
    found = regions(pfns, size)
    disks = [{"device": d.device, "present": d.present, "blocks": d.blocks,
              "differing_blocks": len(d.differing),
              "differing_bytes": len(d.differing) * size,
              "regions": regions(d.differing, size)} for d in disk_diffs]
    listed = [{"pfn": int(p), "a": id_at(ma, int(p)), "b": id_at(mb, int(p))}
              for p in pfns] if list_pages else None
    if as_json:
        emit_json({"a": ra["id"], "b": rb["id"], "pages": pages,
                   "differing_pages": len(pfns), "differing_bytes": len(pfns) * size,
                   "regions": found, "page_list": listed, "disks": disks})
        return
    click.echo(f"checkpoints {ra['id']} and {rb['id']}: {len(pfns)} of {pages} pages differ "
               f"({size_text(len(pfns) * size)}), in {len(found)} "
               f"region{'s' if len(found) != 1 else ''}")
    digits = len(f"{pages * size - 1:x}") + 2
    region_table(found, digits, size)
    for d in disks:
        only = "" if d["present"] == "both" else \
            f" (only checkpoint {ra['id'] if d['present'] == 'a' else rb['id']} has it)"
        click.echo(f"disk {d['device']}{only}: {d['differing_blocks']} of {d['blocks']} blocks "
                   f"differ ({size_text(d['differing_bytes'])}), in {len(d['regions'])} "
                   f"region{'s' if len(d['regions']) != 1 else ''}")
        if d["regions"]:
            region_table(d["regions"], len(f"{d['blocks'] * size - 1:x}") + 2, size, "blocks")
    if listed:
        click.echo("")
        table([["", "pfn", "address", str(ra["id"]), str(rb["id"])]]
              + [["", f"{p['pfn']:#x}", f"{p['pfn'] * size:#0{digits}x}",
                  *(pid.hex()[:SHORT_ID] if pid else "zero" for pid in (p["a"], p["b"]))]
                 for p in listed], left=5)


# ------------------------------------------------------------------------- stats


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def share_text(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def spread_text(p: dict | None) -> str:
    return "-" if p is None else "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in p.items())


@main.command()
@store_option
@click.option("--top", type=int, default=10, show_default=True,
              help="How many of the most duplicated pages to list.")
@json_option
def stats(store_path: Path, top: int, as_json: bool) -> None:
    """Store-wide figures: logical vs stored vs on-disk bytes, dedup, zero pages, compression,
    the most duplicated pages, pause and drain percentiles."""
    with reading(store_path) as store:
        s = store_stats(store, top=top)
    if as_json:
        emit_json(s)
        return
    disk, fmt, newest = s["disk_bytes"], s["format"], s["newest"]
    rows = [
        ["checkpoints", f"{s['checkpoints']} (store format v{fmt['version']}, a full map "
                        f"every {fmt['full_every']})"],
        ["logical", f"{size_text(s['logical_bytes'])} (the RAM of every checkpoint)"
                    + (f" + {size_text(s['disk_logical_bytes'])} (its disks)"
                       if s["disk_logical_bytes"] else "")],
        ["stored", f"{size_text(s['stored_bytes'])} ({s['stored_pages']} pages)"],
        ["on disk", f"{size_text(disk['total'])} in all: pages {size_text(disk['pages'])}, "
                    f"maps {size_text(disk['maps'])}, records {size_text(disk['records'])}"],
        ["logical/stored", ratio_text(s["logical_to_stored"])],
        ["dedup", f"{ratio_text(s['dedup_ratio'])} ({s['pages_copied']} non-zero pages "
                  f"copied, {s['pages_stored_new']} stored)"],
        ["compression", f"{ratio_text(s['compression_ratio'])} (page bytes / pages on disk)"],
        ["disk blocks", f"{s['disk_blocks_dirty']} read, {s['disk_blocks_stored_new']} "
                        f"stored new, {s['disk_blocks_dedup']} already stored (dedup)"],
        ["zero pages", f"{share_text(s['zero_share_copied'])} of the pages copied"
                       + (f"; {share_text(s['zero_share_newest'])} of the frames of checkpoint "
                          f"{newest['id']}" if newest else "")],
        ["pause", spread_text(s["pause"])],
        ["drain", spread_text(s["drain_time"])],
    ]
    table(rows, left=2)
    if newest and newest["top_pages"]:
        click.echo(f"most duplicated pages in checkpoint {newest['id']} (the newest), by the "
                   "frames holding each:")
        table([["", "page", "frames", "share"]]
              + [["", p["id"][:SHORT_ID], str(p["frames"]),
                  share_text(p["frames"] / newest["pages"])] for p in newest["top_pages"]],
              left=2)
