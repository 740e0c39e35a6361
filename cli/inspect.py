"""`vmckpt ls/show/diff/stats/check/export/plot`: looking into a store. All of them open it
read-only, so they work while an engine checkpoints into it. --json output is documented in
docs/json-schema.md."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
from vmckpt.cli.main import _ckpt, _fail, main, store_option
from vmckpt.engine.qemu.argv import QemuArgsError, for_restore
from vmckpt.engine.units import parse_duration
from vmckpt.storage import PageMap, PageStore, StoreError, open_store
from vmckpt.storage.inspect import (
    Export,
    changes,
    check_store,
    differing,
    export_checkpoint,
    map_chain,
    runs,
    store_stats,
)

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (docs/json-schema.md).")

GRID_COLUMNS, GRID_ROWS = 64, 16
SHORT_ID = 12  # hex digits of a page id in tables
# Record fields that hold seconds or bytes, shown with units by `show`.
SECONDS = {"pause", "drain_time", "stop", "arm", "extra", "resume", "fault_service_p50",
           "fault_service_p99", "seconds", "interval", "pre_arm", "commit_time",
           "switch_pause", "switch_move"}
BYTES = {"ram_size", "page_size", "bytes_added", "buffer_bytes", "size", "bytes"}
UNICODE = {"fork": "├─ ", "bar": "│  ", "zero": " ", "same": "·", "shades": "░▒▓█"}
ASCII = {"fork": "|- ", "bar": "|  ", "zero": " ", "same": ".", "shades": ":+*#"}


def glyphs() -> dict[str, str]:
    """Box-drawing and shading characters, or ASCII where stdout cannot encode them."""
    try:
        "".join(UNICODE.values()).encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def json_safe(value: Any) -> Any:
    """Records as JSON: bytes (page ids) as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(json_safe(value), indent=1))


@contextmanager
def store_errors(store_path: Path) -> Iterator[None]:
    """Any failure to open or read the store ends the command with one line."""
    try:
        yield
    except StoreError as e:
        _fail(str(e))
    except (KeyError, ValueError) as e:  # a record or map that is not what it should be
        _fail(f"cannot read store {store_path} ({type(e).__name__}: {e}); "
              "`vmckpt check` says what is damaged")


@contextmanager
def reading(store_path: Path) -> Iterator[PageStore]:
    """The store opened read-only."""
    with store_errors(store_path), open_store(store_path, readonly=True) as store:
        yield store


def checkpoint_arg(text: str, store_path: Path) -> int | str:
    """An id or 'latest'; ids a store cannot hold (keys are 64-bit) are refused here."""
    which = _ckpt(text)
    if isinstance(which, int) and not 0 < which < 1 << 64:
        _fail(f"no checkpoint {which} in {store_path}")
    return which


def size_text(n: float | None) -> str:
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    scale = 0
    while abs(n) >= 1024 and scale < len(units) - 1:
        n, scale = n / 1024, scale + 1
    return f"{n:.0f} {units[scale]}" if n == int(n) else f"{n:.1f} {units[scale]}"


def ms_text(seconds: float | None, decimals: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{decimals}f}"


def local_time(t: float, *, millis: bool = False) -> str:
    text = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{int(t * 1000) % 1000:03d}" if millis else text


def table(rows: list[list[str]], left: int = 0) -> None:
    """Prints rows (the first is the header) in aligned columns; the first `left` columns
    are left-aligned (text), the others right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


# ---------------------------------------------------------------------------- ls


def age(text: str) -> float | None:
    """An age like 90s, 10m, 2h, 3d in seconds; None if text is not one."""
    try:
        return parse_duration(text)
    except ValueError:
        return None


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
        pmap, changed = changes(store, rec)
    size = rec["page_size"]
    changed = changed[changed < pmap.npages]
    mask = np.zeros(pmap.npages, bool)
    mask[changed] = True
    data = pmap.ids.any(axis=1)
    per = max(1, -(-pmap.npages // (GRID_COLUMNS * GRID_ROWS)))
    changed_share, data_share = cell_shares(mask, per), cell_shares(data, per)
    device = rec.get("device_state")
    if as_json:
        emit_json({"record": rec, "device_state_bytes": device["size"] if device else None,
                   "map_chain": chain,
                   "dirty": {"parent": rec.get("parent"), "pages": pmap.npages,
                             "changed_pages": len(changed),
                             "zero_pages": int(pmap.npages - data.sum()),
                             "cell_pages": per, "changed_share": changed_share.tolist(),
                             "data_share": data_share.tolist(),
                             "regions": regions(changed, size)}})
        return
    g = glyphs()
    click.echo(f"checkpoint {rec['id']}")
    click.echo("record")
    for line in record_lines(rec):
        click.echo(line)
    click.echo("device state  " + (f"{size_text(device['size'])} ({device['size']} bytes, "
                                   f"{len(device['ids']) // 32} pages)" if device else "none"))
    click.echo(f"map chain     a restore reads {len(chain)} map(s), "
               f"{size_text(sum(m['bytes'] for m in chain))}, newest first:")
    table([["", "id", "kind", "bytes"]]
          + [["", str(m["id"]), m["kind"], size_text(m["bytes"])] for m in chain], left=1)
    since = ("its parent, checkpoint " + str(rec["parent"]) if rec.get("parent") is not None
             else "empty RAM (a first checkpoint)")
    click.echo(f"dirty map     {len(changed)} of {pmap.npages} pages changed since {since} "
               f"({size_text(len(changed) * size)}); {int(pmap.npages - data.sum())} pages "
               "are zero")
    click.echo(f"              one cell = {size_text(per * size)} ({per} page"
               f"{'s' if per > 1 else ''}), {GRID_COLUMNS} cells a row; "
               f"'{g['zero']}' all zero, '{g['same']}' unchanged, "
               + ", ".join(f"'{c}' up to {25 * (i + 1)} %" for i, c in enumerate(g["shades"]))
               + " changed")
    digits = len(f"{pmap.npages * size - 1:x}")
    for i, row in enumerate(grid(changed_share, data_share, g)):
        click.echo(f"  {i * GRID_COLUMNS * per * size:#0{digits + 2}x} |{row}|")


# -------------------------------------------------------------------------- diff


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
    guest-physical region."""
    which_a, which_b = checkpoint_arg(a, store_path), checkpoint_arg(b, store_path)
    with reading(store_path) as store:
        ra, rb = store.get_record(which_a), store.get_record(which_b)
        ma, mb = store.read_map(ra["id"]), store.read_map(rb["id"])
    size = ra["page_size"]
    pfns = differing(ma, mb)
    found = regions(pfns, size)
    listed = [{"pfn": int(p), "a": id_at(ma, int(p)), "b": id_at(mb, int(p))}
              for p in pfns] if list_pages else None
    if as_json:
        emit_json({"a": ra["id"], "b": rb["id"], "pages": max(ma.npages, mb.npages),
                   "differing_pages": len(pfns), "differing_bytes": len(pfns) * size,
                   "regions": found, "page_list": listed})
        return
    click.echo(f"checkpoints {ra['id']} and {rb['id']}: {len(pfns)} of "
               f"{max(ma.npages, mb.npages)} pages differ ({size_text(len(pfns) * size)}), "
               f"in {len(found)} region{'s' if len(found) != 1 else ''}")
    digits = len(f"{max(ma.npages, mb.npages) * size - 1:x}") + 2
    table([["", "from", "to", "pages", "size"]]
          + [["", f"{r['start']:#0{digits}x}", f"{r['end'] - 1:#0{digits}x}", str(r["pages"]),
              size_text(r["pages"] * size)] for r in found], left=3)
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
        ["logical", f"{size_text(s['logical_bytes'])} (the RAM of every checkpoint)"],
        ["stored", f"{size_text(s['stored_bytes'])} ({s['stored_pages']} pages)"],
        ["on disk", f"{size_text(disk['total'])} in all: pages {size_text(disk['pages'])}, "
                    f"maps {size_text(disk['maps'])}, records {size_text(disk['records'])}"],
        ["logical/stored", ratio_text(s["logical_to_stored"])],
        ["dedup", f"{ratio_text(s['dedup_ratio'])} ({s['pages_copied']} non-zero pages "
                  f"copied, {s['pages_stored_new']} stored)"],
        ["compression", f"{ratio_text(s['compression_ratio'])} (page bytes / pages on disk)"],
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


# ------------------------------------------------------------------------- check


EXIT_PROBLEMS, EXIT_INCOMPLETE = 1, 3


@main.command()
@store_option
@click.option("--read-data", is_flag=True,
              help="Also read every stored page and verify it hashes to its id.")
@click.option("--max-duration", help="Stop after this long (30s, 5m); the check is then "
                                     f"incomplete: exit status {EXIT_INCOMPLETE}.")
@json_option
def check(store_path: Path, read_data: bool, max_duration: str | None, as_json: bool) -> None:
    """Verify the store: every checkpoint has its map, every map chain resolves, every page a
    checkpoint needs is stored (and with --read-data, is what its id says). Exit status 0:
    sound; 1: problems (each listed, by checkpoint and page); 3: stopped by --max-duration
    before the end, no problem so far; 2: the check could not run."""
    try:
        seconds = parse_duration(max_duration) if max_duration is not None else None
    except ValueError:
        _fail(f"--max-duration takes a duration (30s, 5m), not {max_duration!r}")
    with reading(store_path) as store:
        report = check_store(store, read_data=read_data, max_seconds=seconds,
                             progress=sys.stderr.isatty())
    if as_json:
        emit_json({**asdict(report), "sound": report.sound})
    else:
        for p in report.problems:
            click.echo(p.message)
        pages = (f", {report.pages_checked} of {report.pages_stored} stored pages hashed"
                 if read_data else "")
        done = f"{report.maps_checked} of {report.checkpoints} checkpoints checked{pages}"
        verdict = ("sound" if report.sound else f"{len(report.problems)} problem(s)"
                   if report.problems else "incomplete")
        stopped = "" if report.complete else f", stopped by --max-duration {max_duration}"
        click.echo(f"{verdict}: {done} in {report.seconds:.1f} s{stopped}")
    if not report.sound:
        sys.exit(EXIT_PROBLEMS if report.problems else EXIT_INCOMPLETE)


# ------------------------------------------------------------------------ export


def without_qmp(argv: list[str]) -> list[str]:
    """argv without its QMP monitors: the engine's (its socket is gone) and any that vmckpt
    serve owned; the export's hint adds its own."""
    out, skip = [], False
    for arg in argv:
        flag = arg.lstrip("-") if arg.startswith("-") else ""
        if skip:
            skip = False
        elif flag == "qmp":
            skip = True
        elif not flag.startswith("qmp="):
            out.append(arg)
    return out


def qemu_hint(argv: list[str], done: Export, out: Path) -> dict:
    """How to start a QEMU from the export by hand (what `vmckpt restore` does by itself)."""
    assert done.device_state is not None
    qmp = out / "qmp.sock"
    qemu_argv = [*for_restore(without_qmp(argv), done.ram_image, done.record["ram_size"]),
                 "-qmp", f"unix:{qmp},server=on,wait=off"]
    uri = f"exec:cat {shlex.quote(str(done.device_state))}"
    return {
        "argv": qemu_argv,
        "command": shlex.join(qemu_argv),
        "qmp_socket": str(qmp),
        "qmp_commands": [
            {"execute": "qmp_capabilities"},
            {"execute": "migrate-set-capabilities", "arguments": {
                "capabilities": [{"capability": "x-ignore-shared", "state": True}]}},
            {"execute": "migrate-incoming", "arguments": {"uri": uri}},
            {"execute": "cont"},
        ],
        "hmp_commands": ["migrate_set_capability x-ignore-shared on",
                         f"migrate_incoming {json.dumps(uri)}", "cont"],
        "howto": "Start QEMU with argv: it waits, paused, for its device state (-incoming "
                 "defer -S; guest RAM is ram.img, shared). Send qmp_commands in order on "
                 "qmp_socket, and cont only once query-migrate says \"completed\" (the "
                 "loaded state is 'paused', so an earlier cont is lost). x-ignore-shared must "
                 "be on before the state loads, which is why -incoming exec:... on the "
                 "command line does not work. ram.img must stay while QEMU runs. `vmckpt "
                 "restore CKPT -- ARGV...` does all of this itself.",
    }


@main.command()
@store_option
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for ram.img, device-state.bin and manifest.json (made if "
                   "absent).")
@json_option
@click.argument("ckpt")
def export(store_path: Path, out_dir: Path, as_json: bool, ckpt: str) -> None:
    """Write checkpoint CKPT (an id, or 'latest') out of the store: its RAM as a sparse image,
    its device state, and a manifest saying how to start QEMU from them."""
    which = checkpoint_arg(ckpt, store_path)
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"{out_dir} exists and is not a directory")
    out = out_dir.resolve()
    with reading(store_path) as store:
        try:
            done = export_checkpoint(store, which, out)
        except OSError as e:
            _fail(f"cannot write into {out}: {e.strerror}")
    rec, target = done.record, done.record.get("target") or {}
    try:
        hint = qemu_hint(target["argv"], done, out) if done.device_state and \
            target.get("kind") == "qemu" else None
    except QemuArgsError as e:
        _fail(f"checkpoint {rec['id']}: {e}")
    manifest = {
        "checkpoint": rec["id"], "parent": rec.get("parent"), "time": rec["time"],
        "ram_size": rec["ram_size"], "page_size": rec["page_size"],
        "ram_image": str(done.ram_image), "ram_pages": done.restore.pages,
        "device_state": str(done.device_state) if done.device_state else None,
        "device_state_size": rec["device_state"]["size"] if done.device_state else None,
        "target": target, "qemu": hint,
    }
    (out / "manifest.json").write_text(json.dumps(json_safe(manifest), indent=1) + "\n")
    if as_json:
        emit_json(manifest)
        return
    click.echo(f"checkpoint {rec['id']} exported into {out}:")
    click.echo(f"  ram.img           {size_text(rec['ram_size'])}, {done.restore.pages} pages "
               "of data (sparse: zero pages are holes)")
    if done.device_state:
        click.echo(f"  device-state.bin  {size_text(rec['device_state']['size'])}")
    click.echo("  manifest.json")
    if hint:
        click.echo("start QEMU with:\n  " + hint["command"])
        click.echo(f"then on its QMP socket {hint['qmp_socket']}, in order (cont once "
                   "query-migrate says completed):")
        for cmd in hint["qmp_commands"]:
            click.echo("  " + json.dumps(cmd))


# -------------------------------------------------------------------------- plot


@main.command()
@store_option
@click.option("-o", "--output", "out_file", type=click.Path(path_type=Path),
              default=Path("vmckpt-plot.png"), show_default=True, help="The PNG to write.")
@json_option
def plot(store_path: Path, out_file: Path, as_json: bool) -> None:
    """Plot pause, pages dirtied, bytes stored and dedup per checkpoint over time."""
    with reading(store_path) as store:
        records = store.list_checkpoints()
    if not records:
        _fail(f"store {store_path} holds no checkpoint to plot")
    try:
        draw(records, store_path, out_file)
    except OSError as e:
        _fail(f"cannot write {out_file}: {e.strerror}")
    if as_json:
        emit_json({"output": str(out_file), "checkpoints": len(records)})
    else:
        click.echo(f"wrote {out_file} ({len(records)} checkpoints)")


def draw(records: list[dict], store_path: Path, out_file: Path) -> None:
    import matplotlib  # only here: it adds ~0.3 s to any command that imports it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t0 = records[0]["time"]
    t = [r["time"] - t0 for r in records]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [np.nan if r.get(key) is None else r[key] * scale for r in records]

    copied = [(r.get("pages_stored_new") or 0) + (r.get("dedup_hits") or 0) for r in records]
    panels = [
        ("pause (ms)", [("pause", series("pause", 1e3))]),
        ("pages", [("dirtied", series("pages_dirtied")),
                   ("stored new", series("pages_stored_new"))]),
        ("new data stored\n(MiB)", [("bytes added", series("bytes_added", 2**-20))]),
        ("dedup hits (% of\nnon-zero copies)", [("dedup", [
            100 * (r.get("dedup_hits") or 0) / c if c else np.nan
            for r, c in zip(records, copied, strict=True)])]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 9), sharex=True)
    for ax, (label, lines) in zip(axes, panels, strict=True):
        for name, ys in lines:
            ax.plot(t, ys, ".-", label=name, markersize=4)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(loc="upper right")
    axes[-1].set_ylim(0, 100)
    axes[-1].set_xlabel(f"time since checkpoint {records[0]['id']}, "
                        f"{local_time(t0)} (s)")
    vm = (records[-1].get("target") or {}).get("name") or "?"
    fig.suptitle(f"vmckpt store {store_path}: {len(records)} checkpoints of {vm} "
                 f"({size_text(records[-1]['ram_size'])} RAM), per checkpoint")
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
