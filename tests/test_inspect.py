"""`vmckpt ls/show/diff/stats/check/export/plot` through the real command, on stores made by
real engine runs of the synthetic guest (and one QEMU run for export)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import msgpack
import numpy as np
import pytest
from rocksdict import AccessType, Options, Rdict
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.lab.synthguest import POPULAR, popular_page
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import MapDelta, open_store
from vmckpt.storage.envelope import HEADER

VMCKPT = [str(Path(sys.executable).with_name("vmckpt"))]
PAGE = 4096
CHECKPOINTS = 5


def vmckpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMCKPT, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    r = vmckpt(*args)
    assert r.returncode == 0, r.stderr
    return r


def as_json(*args: str):
    return json.loads(ok(*args, "--json").stdout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("vmckpt: ") and r.stderr.count("\n") == 1, r.stderr
    for word in words:
        assert word in r.stderr


def run_synth(store: Path, checkpoints: int = CHECKPOINTS) -> None:
    """A real engine run: 16 MiB guest, a third of its writes popular (duplicate) pages and a
    tenth zero pages."""
    r = vmckpt("run", "--store", str(store), "--interval", "0.2s", "--max-checkpoints",
               str(checkpoints), "--min-ram", "4M", "--",
               *synth("--size", "16M", "--rate", "5000", "--dup", "0.3", "--zero", "0.1"))
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("good") / "store"
    run_synth(store)
    return store


@pytest.fixture
def copy(good, tmp_path) -> Path:
    """A copy of the good store to damage or extend."""
    return Path(shutil.copytree(good, tmp_path / "copy"))


def raw_db(path: Path, *, readonly: bool = False) -> Rdict:
    """The store's RocksDB opened directly, for planting damage (or counting behind vmckpt)."""
    return Rdict(str(path), Options(raw_mode=True),
                 column_families={c: Options(raw_mode=True) for c in ("pages", "records", "maps")},
                 access_type=AccessType.read_only() if readonly else AccessType.read_write())


def close(db: Rdict, *cfs: Rdict) -> None:
    for cf in cfs:
        cf.close()
    db.close()


def image(store: Path, ckpt: int, tmp_path: Path) -> np.ndarray:
    """A checkpoint's RAM through `vmckpt restore --image`, as pages."""
    path = tmp_path / f"ram{ckpt}.img"
    ok("restore", "--store", str(store), "--image", str(path), str(ckpt))
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, PAGE)


def holders(store: Path, pid: bytes) -> dict[int, list[int]]:
    """checkpoint -> frames whose page is pid, read through the library's read_map."""
    with open_store(store, readonly=True) as s:
        found = {}
        for rec in s.list_checkpoints():
            pfns = np.flatnonzero((s.read_map(rec["id"]).ids == np.frombuffer(pid, np.uint8))
                                  .all(axis=1))
            if len(pfns):
                found[rec["id"]] = pfns.tolist()
        return found


def page_of(store: Path, ckpt: int, nth: int) -> bytes:
    """The id of the nth distinct page of a checkpoint (in frame order) held by one frame."""
    with open_store(store, readonly=True) as s:
        pmap = s.read_map(ckpt)
    ids = pmap.ids[pmap.nonzero_pfns()]
    _, first, counts = np.unique(ids, axis=0, return_index=True, return_counts=True)
    single = np.sort(first[counts == 1])
    return ids[single[nth]].tobytes()


# ------------------------------------------------------------------------------ ls


def test_ls_lists_every_checkpoint_with_its_figures(good):
    records = as_json("ls", "--store", str(good))
    assert [r["id"] for r in records] == list(range(1, CHECKPOINTS + 1))
    assert [r["parent"] for r in records] == [None, *range(1, CHECKPOINTS)]
    assert all(r["device_state"] is None and r["target"]["kind"] == "process" for r in records)
    lines = ok("ls", "--store", str(good)).stdout.splitlines()
    assert lines[0].split() == ["id", "parent", "time", "VM", "RAM", "dirtied", "new", "dedup",
                                "zero", "added", "disks", "disk", "new", "pause", "ms",
                                "drain", "ms"]
    assert len(lines) == CHECKPOINTS + 1
    for line, r in zip(lines[1:], records, strict=True):
        cells = line.split()
        assert cells[0] == str(r["id"])  # a straight line: no tree prefix
        assert " ".join(cells[2:4]) == datetime.fromtimestamp(r["time"]).strftime(
            "%Y-%m-%d %H:%M:%S")
        assert cells[4] == r["target"]["name"] and " ".join(cells[5:7]) == "16 MiB"
        assert cells[7:11] == [str(r[k]) for k in ("pages_dirtied", "pages_stored_new",
                                                   "dedup_hits", "zero_pages")]
        assert cells[-4:-2] == ["0", "-"]  # a process has no disks
        assert cells[-2] == f"{r['pause'] * 1e3:.2f}"
    assert sum(r["dedup_hits"] for r in records) > 0 and sum(r["zero_pages"] for r in records)


def test_ls_last_and_since(good):
    records = as_json("ls", "--store", str(good))
    assert [r["id"] for r in as_json("ls", "--store", str(good), "--last", "2")] == [4, 5]
    assert len(ok("ls", "--store", str(good), "--last", "2").stdout.splitlines()) == 3
    between = datetime.fromtimestamp((records[1]["time"] + records[2]["time"]) / 2).isoformat()
    assert [r["id"] for r in as_json("ls", "--store", str(good), "--since", between)] == \
        [3, 4, 5]
    assert len(as_json("ls", "--store", str(good), "--since", "1h")) == CHECKPOINTS
    assert as_json("ls", "--store", str(good), "--since", "0s") == []
    assert as_json("ls", "--store", str(good), "--since", "2999-01-01 00:00") == []
    assert_one_line_error(vmckpt("ls", "--store", str(good), "--since", "yesterday"),
                          "--since")
    assert_one_line_error(vmckpt("ls", "--store", str(good), "--last", "0"), "--last")


def test_ls_draws_branches_as_a_tree(copy):
    with open_store(copy) as s:
        base = {k: v for k, v in s.get_record(3).items() if k not in ("id", "map")}
        pmap = s.read_map(2)
        pfns = pmap.nonzero_pfns()[:8].astype(np.uint64)
        delta = MapDelta(pfns, np.zeros((len(pfns), 32), np.uint8))  # zeroes 8 frames
        for parent in (3, 6, 3, 6):  # 6: a branch from 3; 7 and 9 continue or fork from 6
            s.commit_checkpoint({**base, "parent": parent, "time": time.time()}, delta)
    header, *lines = ok("ls", "--store", str(copy)).stdout.splitlines()
    parent, when = header.index("parent"), header.index("time")
    assert [line[:parent].rstrip() for line in lines] == [
        "1", "2", "3", "├─ 6", "│  ├─ 9", "│  7", "├─ 8", "4", "5"], "\n".join(lines)
    assert [line[parent:when].strip() for line in lines] == [
        "-", "1", "2", "3", "6", "6", "3", "3", "4"]
    assert [r["id"] for r in as_json("ls", "--store", str(copy))] == list(range(1, 10))
    shown = as_json("show", "--store", str(copy), "6")
    assert shown["dirty"]["parent"] == 3 and shown["map_chain"][0]["id"] == 6


# ---------------------------------------------------------------------------- show


def test_show_record_chain_and_dirty_map(good, tmp_path):
    records = as_json("ls", "--store", str(good))
    for rec in records:
        shown = as_json("show", "--store", str(good), str(rec["id"]))
        assert shown["record"] == rec
        assert shown["device_state_bytes"] is None
        chain = shown["map_chain"]
        assert [m["id"] for m in chain] == list(range(rec["id"], 0, -1))
        assert [m["kind"] for m in chain] == ["delta"] * (len(chain) - 1) + ["full"]
        assert [m["bytes"] for m in chain] == [records[m["id"] - 1]["map"]["bytes"]
                                                for m in chain]
        dirty = shown["dirty"]
        # The frames show finds changed are the ones the engine counted when committing.
        assert dirty["changed_pages"] == rec["pages_changed"]
        assert sum(r["pages"] for r in dirty["regions"]) == rec["pages_changed"]
        assert dirty["pages"] == 4096 and dirty["cell_pages"] == 4
        assert len(dirty["changed_share"]) == 1024
        assert sum(dirty["changed_share"]) * 4 == pytest.approx(rec["pages_changed"])
    # Checked against the RAM images: changed frames and zero frames of the latest.
    last = records[-1]
    before, after = image(good, last["id"] - 1, tmp_path), image(good, last["id"], tmp_path)
    shown = as_json("show", "--store", str(good), "latest")
    changed = np.flatnonzero((before != after).any(axis=1))
    assert [(r["first_pfn"], r["pages"]) for r in shown["dirty"]["regions"]] == \
        runs_of(changed)
    assert shown["dirty"]["zero_pages"] == int((~after.any(axis=1)).sum())
    text = ok("show", "--store", str(good), "latest").stdout
    assert f"checkpoint {last['id']}" in text and "device state  none" in text
    assert re.search(rf"^  pages_dirtied +{last['pages_dirtied']}$", text, re.M)
    grid = [line for line in text.splitlines() if line.startswith("  0x")]
    assert len(grid) == 16 and all(len(line.split("|")[1]) == 64 for line in grid)
    cells = "".join(line.split("|")[1] for line in grid)
    for i, share in enumerate(shown["dirty"]["changed_share"]):
        assert (cells[i] in "░▒▓█") == (share > 0)


def runs_of(pfns: np.ndarray) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for p in pfns.tolist():
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


# ---------------------------------------------------------------------------- diff


def test_diff_matches_the_ram_images(good, tmp_path):
    a, b = image(good, 2, tmp_path), image(good, CHECKPOINTS, tmp_path)
    differ = np.flatnonzero((a != b).any(axis=1))
    got = as_json("diff", "--store", str(good), "2", "latest", "--pages")
    assert got["a"] == 2 and got["b"] == CHECKPOINTS and got["pages"] == 4096
    assert got["differing_pages"] == len(differ) > 0
    assert [(r["first_pfn"], r["pages"]) for r in got["regions"]] == runs_of(differ)
    assert all(r["start"] == r["first_pfn"] * PAGE and r["end"] == r["start"] + r["pages"] * PAGE
               for r in got["regions"])
    assert [p["pfn"] for p in got["page_list"]] == differ.tolist()
    for p in got["page_list"]:
        for side, img in (("a", a), ("b", b)):
            page = img[p["pfn"]]
            assert p[side] == (hashlib.sha256(page).hexdigest() if page.any() else None)
    assert as_json("diff", "--store", str(good), "3", "3")["regions"] == []
    text = ok("diff", "--store", str(good), "2", "latest", "--pages").stdout.splitlines()
    assert text[0].startswith(f"checkpoints 2 and {CHECKPOINTS}: {len(differ)} of 4096 pages "
                              f"differ") and f"in {len(got['regions'])} region" in text[0]
    first = got["page_list"][0]
    short = [(first["a"] or "zero")[:12], (first["b"] or "zero")[:12]]
    assert any(line.split() == [f"{first['pfn']:#x}", f"{first['pfn'] * PAGE:#08x}", *short]
               for line in text)


# --------------------------------------------------------------------------- stats


def test_stats(good, tmp_path):
    records = as_json("ls", "--store", str(good))
    s = as_json("stats", "--store", str(good))
    new = sum(r["pages_stored_new"] for r in records)
    dup = sum(r["dedup_hits"] for r in records)
    assert s["checkpoints"] == CHECKPOINTS
    assert s["logical_bytes"] == CHECKPOINTS * (16 << 20)
    db = raw_db(good, readonly=True)
    pages = db.get_column_family("pages")
    try:
        assert s["stored_pages"] == len(list(pages.keys())) == new  # no device state
    finally:
        close(db, pages)
    assert s["stored_bytes"] == new * PAGE
    assert s["dedup_ratio"] == pytest.approx((new + dup) / new)
    assert s["logical_to_stored"] == pytest.approx(CHECKPOINTS * (16 << 20) / (new * PAGE))
    assert s["compression_ratio"] == pytest.approx(new * PAGE / s["disk_bytes"]["pages"])
    assert 0 < s["disk_bytes"]["pages"] < s["disk_bytes"]["total"]
    assert s["zero_share_copied"] == pytest.approx(
        sum(r["zero_pages"] for r in records) / sum(r["pages_dirtied"] for r in records))
    ram = image(good, CHECKPOINTS, tmp_path)
    zero = int((~ram.any(axis=1)).sum())
    assert s["newest"]["zero_pages"] == zero
    assert s["zero_share_newest"] == pytest.approx(zero / 4096)
    # The most duplicated pages are the guest's popular pages, counted frame by frame.
    popular = {hashlib.sha256(popular_page(k)).hexdigest(): popular_page(k)
               for k in range(POPULAR)}
    top = s["newest"]["top_pages"]
    assert len(top) == 10 and top == sorted(top, key=lambda p: -p["frames"])
    for p in top:
        assert p["id"] in popular
        want = np.frombuffer(popular[p["id"]], np.uint8)
        assert p["frames"] == int((ram == want).all(axis=1).sum())
    pauses = [r["pause"] for r in records]
    assert s["pause"]["max"] == pytest.approx(max(pauses))
    assert s["pause"]["p50"] == pytest.approx(float(np.median(pauses)))
    assert s["drain_time"]["max"] == pytest.approx(max(r["drain_time"] for r in records))
    text = ok("stats", "--store", str(good)).stdout
    assert f"{(new + dup) / new:.2f}x" in text and f"({new} pages)" in text
    assert top[0]["id"][:12] in text


# --------------------------------------------------------------------------- check


def check(store: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    text = vmckpt("check", "--store", str(store), *args)
    report = json.loads(vmckpt("check", "--store", str(store), "--json", *args).stdout)
    return text, report


def test_check_sound_store(good):
    text, report = check(good, "--read-data")
    assert text.returncode == 0, text.stdout
    assert text.stdout.startswith("sound:")
    assert report["sound"] and report["complete"] and report["problems"] == []
    assert report["maps_checked"] == CHECKPOINTS
    assert report["pages_checked"] == report["pages_stored"] > 0


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_check_finds_a_bad_page(copy, damage):
    pid = page_of(copy, CHECKPOINTS, 3)
    where = holders(copy, pid)
    first = min(where)
    db = raw_db(copy)
    pages = db.get_column_family("pages")
    if damage == "corrupt":
        pages[pid] = bytes(reversed(pages[pid]))
    else:
        del pages[pid]
    close(db, pages)
    if damage == "corrupt":  # only reading the data can tell
        assert vmckpt("check", "--store", str(copy)).returncode == 0
    text, report = check(copy, "--read-data")
    assert text.returncode == 1 and not report["sound"]
    [p] = report["problems"]
    assert p["kind"] == f"{damage}_page" and p["page"] == pid.hex()
    assert (p["checkpoint"], p["pfn"]) == (first, min(where[first]))
    assert p["checkpoints"] == sorted(where)
    assert f"checkpoint {first} pfn {min(where[first]):#x}: page {pid.hex()}" in text.stdout
    assert ("SHA-256" if damage == "corrupt" else "is missing") in text.stdout
    assert text.stdout.splitlines()[-1].startswith("1 problem(s)")


def test_check_finds_a_truncated_map(copy):
    db = raw_db(copy)
    maps = db.get_column_family("maps")
    key = (3).to_bytes(8, "big")
    size = len(maps[key])
    maps[key] = maps[key][:size // 2]
    close(db, maps)
    text, report = check(copy, "--read-data")
    assert text.returncode == 1
    got = [(p["kind"], p["checkpoint"]) for p in report["problems"]]
    assert got == [("bad_map", 3), *(("broken_chain", c) for c in range(4, CHECKPOINTS + 1))]
    # Its envelope (length and CRC-32, format v2) tells first.
    sealed = HEADER.size
    assert f"checkpoint 3: its map is {size // 2 - sealed} bytes where its header says " \
           f"{size - sealed} (truncated or overwritten)" in text.stdout
    assert "checkpoint 5 cannot be restored: its map chain breaks at checkpoint 3" in text.stdout
    # The other commands say it in one line and point at check.
    assert_one_line_error(vmckpt("show", "--store", str(copy), "4"), "vmckpt check")
    assert vmckpt("show", "--store", str(copy), "2").returncode == 0


def test_check_stops_at_max_duration(good):
    text, report = check(good, "--read-data", "--max-duration", "0s")
    assert text.returncode == 3
    assert text.stdout.startswith("incomplete: 0 of 5 checkpoints checked")
    assert not report["complete"] and not report["sound"] and report["problems"] == []
    assert check(good, "--max-duration", "10m")[0].returncode == 0
    assert_one_line_error(vmckpt("check", "--store", str(good), "--max-duration", "soon"),
                          "--max-duration")


# -------------------------------------------------------------------------- export


def test_export_a_process_checkpoint(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "device-state.bin").write_bytes(b"stale")
    manifest = as_json("export", "--store", str(good), "3", "-o", str(out))
    assert manifest == json.loads((out / "manifest.json").read_text())
    ram = out / "ram.img"
    assert ram.read_bytes() == image(good, 3, tmp_path).tobytes()
    pages = np.frombuffer(ram.read_bytes(), np.uint8).reshape(-1, PAGE)
    data = int(pages.any(axis=1).sum())
    holes = 4096 - data
    assert holes > 100
    assert ram.stat().st_blocks * 512 < (16 << 20) - holes * PAGE // 2  # sparse: zeros are holes
    assert manifest["checkpoint"] == 3 and manifest["ram_pages"] == data
    assert manifest["ram_image"] == str(ram.resolve()) and manifest["ram_size"] == 16 << 20
    assert manifest["device_state"] is None and manifest["qemu"] is None
    assert not (out / "device-state.bin").exists()
    assert manifest["target"]["argv"][1:3] == ["-m", "vmckpt.lab.synthguest"]
    r = vmckpt("export", "--store", str(good), "latest", "-o", str(tmp_path / "o2"))
    assert r.returncode == 0 and "ram.img" in r.stdout
    assert_one_line_error(vmckpt("export", "--store", str(good), "1", "-o", str(ram)),
                          "not a directory")


def qmp(path: str) -> tuple[socket.socket, callable]:
    sock = socket.socket(socket.AF_UNIX)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock.connect(path)
            break
        except OSError:
            assert time.monotonic() < deadline, "QEMU's QMP socket never came"
            time.sleep(0.05)
    f = sock.makefile("rw")
    json.loads(f.readline())  # greeting

    def cmd(c: dict) -> dict:
        f.write(json.dumps(c) + "\n")
        f.flush()
        while "event" in (reply := json.loads(f.readline())):
            pass
        assert "return" in reply, reply
        return reply["return"]

    return sock, cmd


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def last_tick(log: Path) -> int:
    found = ticks(log.read_bytes()) if log.exists() else []
    return found[-1][0] if found else 0


def test_export_a_qemu_checkpoint_and_start_qemu_from_the_manifest(tmp_path):
    store, log, out = tmp_path / "store", tmp_path / "serial.log", tmp_path / "out"
    engine = subprocess.Popen(
        [*VMCKPT, "run", "--store", str(store), "--interval", "0.5s", "--",
         *qemu_argv(mem="128M", work="dirty", rate=5000, mb=48, serial=f"file:{log}")],
        stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: last_tick(log) >= 3, 90, "the guest to count to 3")
        # Ctrl-C ends the run (test_ctrl_c: the checkpoint in flight is committed first).
        engine.send_signal(signal.SIGINT)
        assert engine.wait(60) == 0
    finally:
        engine.kill()
    counted = last_tick(log)
    manifest = as_json("export", "--store", str(store), "latest", "-o", str(out))
    hint = manifest["qemu"]
    assert Path(manifest["device_state"]).stat().st_size == manifest["device_state_size"] > 0
    assert f"mem-path={out / 'ram.img'}" in " ".join(hint["argv"])
    log.unlink()
    err = tmp_path / "qemu.err"
    with err.open("w") as stderr:
        qemu = subprocess.Popen(hint["argv"], stderr=stderr)
    try:
        sock, cmd = qmp(hint["qmp_socket"])
        for c in hint["qmp_commands"]:
            if c["execute"] == "cont":
                wait_for(lambda: cmd({"execute": "query-migrate"}).get("status") == "completed",
                         30, "the device state to load")
            cmd(c)
        assert cmd({"execute": "query-status"})["status"] == "running", err.read_text()
        wait_for(lambda: last_tick(log) > 0, 60, "the restored guest to tick")
        # It counts on from the checkpoint (at or past tick 3), it did not boot again.
        assert 3 <= ticks(log.read_bytes())[0][0] <= counted + 1
        sock.close()
    finally:
        qemu.kill()
        qemu.wait()


# ---------------------------------------------------------------------------- plot


def test_plot(good, tmp_path):
    from matplotlib import image as mpimg

    r = vmckpt("plot", "--store", str(good.resolve()), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "vmckpt-plot.png"
    assert mpimg.imread(png).shape[:2] == (990, 1100)
    got = as_json("plot", "--store", str(good), "-o", str(tmp_path / "p.png"))
    assert got == {"output": str(tmp_path / "p.png"), "checkpoints": CHECKPOINTS}
    assert (tmp_path / "p.png").stat().st_size > 20_000
    empty = tmp_path / "empty"
    open_store(empty, create=True).close()
    assert_one_line_error(vmckpt("plot", "--store", str(empty)), "no checkpoint")


# -------------------------------------------------------------------------- errors


COMMANDS = [["ls"], ["show", "1"], ["diff", "1", "2"], ["stats"], ["check"],
            ["export", "1", "-o", "OUT"], ["plot", "-o", "OUT/p.png"]]


def args(cmd: list[str], store: Path, tmp_path: Path) -> list[str]:
    return [a.replace("OUT", str(tmp_path / "out")) for a in cmd] + ["--store", str(store)]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c[0])
def test_missing_store(cmd, tmp_path):
    assert_one_line_error(vmckpt(*args(cmd, tmp_path / "nothing", tmp_path)),
                          "no vmckpt store at")


@pytest.mark.parametrize("cmd", [["show", "ID"], ["diff", "1", "ID"], ["diff", "ID", "1"],
                                 ["export", "ID", "-o", "OUT"]], ids=lambda c: c[0])
def test_wrong_checkpoint_id(cmd, good, tmp_path):
    for wrong, says in (("99", "no checkpoint 99 in"), ("abc", "a number or 'latest'"),
                        (str(1 << 64), f"no checkpoint {1 << 64} in")):
        r = vmckpt(*args([a.replace("ID", wrong) for a in cmd], good, tmp_path))
        assert_one_line_error(r, says)


def test_store_of_another_format(copy, tmp_path):
    db = raw_db(copy)
    db[b"format"] = msgpack.packb({**msgpack.unpackb(db[b"format"]), "version": 99})
    db.close()
    for cmd in COMMANDS:
        assert_one_line_error(vmckpt(*args(cmd, copy, tmp_path)), "v99", "reads v1")


@contextmanager
def held_open(store: Path) -> Iterator[None]:
    """The store held open for writing by another process (as an engine holds it), which
    serves no control socket."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vmckpt.storage import open_store; "
         "s = open_store(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout and holder.stdout.readline() == b"held\n"
        yield
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_everything_reads_a_store_an_engine_holds(good, tmp_path):
    """Read-only opens work under the writer's lock; none of these commands writes."""
    with held_open(good):
        assert "locked" in vmckpt("run", "--store", str(good), "--", "true").stderr
        for cmd in COMMANDS:
            r = vmckpt(*args(cmd, good, tmp_path))
            assert r.returncode == 0, (cmd, r.stderr)
