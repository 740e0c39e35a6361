"""Disks: discovery of what a checkpoint must capture, and what it leaves alone, on a real QEMU."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

from engine_with_refs import HookedCli, image_digest
from test_qemu import VMCKPT, last_tick, wait_for
from vmckpt.engine.qemu.disks import Disk, Skipped, find_disks
from vmckpt.engine.qemu.qmp import Qmp
from vmckpt.engine.qemu.testguest import qemu_argv
from vmckpt.storage import open_store, restore_image

MiB = 1 << 20


async def qemu(argv: list[str], tmp: Path) -> tuple[subprocess.Popen, Qmp]:
    proc = subprocess.Popen([*argv, "-qmp", f"unix:{tmp / 'qmp'},server=on,wait=off"])
    return proc, await Qmp.connect(tmp / "qmp", pid=proc.pid)


def test_discovery_names_the_writable_disks_and_says_why_others_are_skipped(tmp_path):
    for name in ("a.raw", "ro.raw", "snap.raw", "cd.iso"):
        (tmp_path / name).write_bytes(b"")
        (tmp_path / name).open("r+b").truncate(8 * MiB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"),
                    "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                    "qcow2", str(tmp_path / "top.qcow2")], check=True, cwd=tmp_path)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "64M", "-nodefaults", "-display",
            "none", "-S",
            "-drive", f"file={tmp_path / 'a.raw'},format=raw,if=virtio,id=a",
            "-drive", f"file={tmp_path / 'top.qcow2'},if=virtio,id=b",
            "-drive", f"file={tmp_path / 'ro.raw'},format=raw,if=virtio,id=ro,readonly=on",
            "-drive", f"file={tmp_path / 'snap.raw'},format=raw,if=virtio,id=s,snapshot=on",
            "-drive", f"file={tmp_path / 'cd.iso'},format=raw,if=ide,media=cdrom,id=cd",
            "-drive", "if=ide,media=cdrom,id=empty"]

    async def go() -> tuple[list[Disk], list[Skipped]]:
        proc, qmp = await qemu(argv, tmp_path)
        try:
            return await find_disks(qmp, argv)
        finally:
            await qmp.close()
            proc.kill()
            proc.wait()

    disks, skipped = asyncio.run(go())
    assert [(d.device, d.size, d.format) for d in disks] == \
        [("a", 8 * MiB, "raw"), ("b", 16 * MiB, "qcow2")]
    assert all(d.node for d in disks)
    assert sorted((s.device, s.why) for s in skipped) == [
        ("cd", "read-only"), ("empty", "no medium"), ("ro", "read-only"),
        ("s", "temporary (snapshot=on)")]


def raw_disk(path: Path, size: int) -> Path:
    path.write_bytes(b"")
    path.open("r+b").truncate(size)
    return path


def disk_ticks(data: bytes) -> list[int]:
    """The ticks the test guest wrote into its disk's blocks (block n holds tick n)."""
    return [int(t) for t in re.findall(rb"VMCKPT-DISK (\d+)", data)]


def run_with_disk(tmp_path: Path, ticks: int, *args: str, work: str = "idle",
                  until: bytes = b"") -> tuple[HookedCli, list[str]]:
    """`vmckpt run` (hooked: RAM and disk references at every pause) of the test guest
    writing its raw disk every tick, until the guest has written `ticks` ticks; Ctrl-C then
    commits the checkpoint in flight. Returns the run and the guest's command line."""
    log, raw = tmp_path / "serial.log", raw_disk(tmp_path / "d.raw", 16 * MiB)
    argv = qemu_argv(mem="128M", work=work, mb=16, serial=f"file:{log}",
                     disk=f"file={raw},format=raw,cache=none")
    run = HookedCli(tmp_path / "refs", "-v", "run", "--store", str(tmp_path / "store"),
                    "--interval", "0.5s", *args, "--", *argv)
    try:
        wait_for(lambda: until in log.read_bytes() if log.exists() else False, 180,
                 f"{until!r} from the guest")
        wait_for(lambda: last_tick(log) >= ticks, 180, f"{ticks} guest ticks")
        run.ctrl_c()
        assert run.wait() == 0, run.stderr
    except BaseException:
        run.kill()
        raise
    return run, argv


def test_checkpoints_capture_the_disk_at_their_pause(tmp_path):
    # Target 1: every checkpoint's disk is bit-exact to the raw file at its pause (the guest
    # stopped), and disk changes are in the checkpoints that follow them.
    run, _ = run_with_disk(tmp_path, 12)
    store = tmp_path / "store"
    with open_store(store, readonly=True) as s:
        recs = s.list_checkpoints()
    assert all([d["device"] for d in r["disks"]] == ["virtio0"] for r in recs)
    assert all(not r["disks_not_captured"] for r in recs)
    seen = []
    for r in recs:
        got = image_digest(store, r["id"], tmp_path, disk="virtio0")
        assert got == run.disk_refs(r["id"])["virtio0"], r["id"]
        seen.append(got)
    assert len(set(seen)) >= 4, "the guest's disk writes were not captured as they came"
    assert sum(r["disks"][0]["blocks_new"] for r in recs) >= 8
    # Each checkpoint's disk holds exactly the ticks written before its pause, in order (its
    # restore with a QEMU: tests/test_disk_restore.py).
    with open_store(store, readonly=True) as s:
        for r in recs:
            restore_image(s, r["id"], tmp_path / "r.raw", progress=False, disk="virtio0")
            on_disk = disk_ticks((tmp_path / "r.raw").read_bytes())
            assert on_disk == list(range(1, len(on_disk) + 1)), r["id"]


def test_no_disks_records_them_and_every_restore_warns(tmp_path):
    # --no-disks: RAM only; run names each writable disk, the record lists them, and a
    # restore says the guest sees them as they are now.
    raw, store = raw_disk(tmp_path / "d.raw", 8 * MiB), str(tmp_path / "store")
    argv = qemu_argv(mem="128M", work="idle", mb=16, serial="none",
                     disk=f"file={raw},format=raw")
    r = subprocess.run([VMCKPT, "run", "--store", store, "--interval", "0.3s", "--no-disks",
                        "--max-checkpoints", "2", "--", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"disk virtio0 ({raw}) is not captured (--no-disks)" in r.stderr, r.stderr
    with open_store(store, readonly=True) as s:
        recs = s.list_checkpoints()
    assert [[(d["device"], d["size"]) for d in rec["disks_not_captured"]] for rec in recs] == \
        [[("virtio0", 8 * MiB)]] * 2
    assert all(not rec["disks"] for rec in recs)
    restore = subprocess.Popen([VMCKPT, "restore", "--store", store, "2", "--", *argv],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert restore.stderr
        line = restore.stderr.readline()
        assert "checkpoint 2 did not capture the VM's disks (virtio0): the guest will see " \
            "them as they are now" in line, line
    finally:  # SIGTERM: the restore stops its QEMU too
        restore.terminate()
        restore.wait(60)


def test_a_block_in_the_page_cache_and_on_disk_is_stored_once(tmp_path):
    # Target 3: the guest writes 256 distinct blocks through its page cache and fsyncs them:
    # each is a page of guest RAM and a block of the disk at once, with the same id in the
    # checkpoint's one map (one content-addressed store: held once); blocks unchanged since
    # are never read or stored again.
    run, _ = run_with_disk(tmp_path, 6, work="cached", until=b"VMCKPT-CACHED 256")
    store = tmp_path / "store"
    with open_store(store, readonly=True) as s:
        recs = s.list_checkpoints()
        last = recs[-1]
        pmap = s.read_map(last["id"])
    disk = last["disks"][0]
    cached = pmap.ids[disk["first"] + 2048:disk["first"] + 2048 + 256]  # the second half
    assert cached.any(axis=1).all() and len({bytes(i) for i in cached}) == 256
    ram = {bytes(i) for i in pmap.ids[:last["ram_size"] // 4096]}
    assert all(bytes(i) in ram for i in cached), "a cached block is not in guest RAM's map"
    # Once each: the side that put a block second found it there (a dedup hit).
    hits = sum(r["dedup_hits"] + sum(d["blocks_dedup"] for d in r["disks"]) for r in recs)
    assert hits >= 256
    # The cached blocks went into one checkpoint (or two, split by its pause) and no later one
    # read them again: after, each read only the blocks of the ticks written in its interval.
    took = [i for i, r in enumerate(recs) if r["disks"][0]["blocks_dirty"] >= 128]
    assert took and len(took) <= 2, [r["disks"][0]["blocks_dirty"] for r in recs]
    assert all(r["disks"][0]["blocks_dirty"] <= 4 for r in recs[took[-1] + 1:]), recs


def test_qcow2_with_a_backing_file_a_second_raw_disk_and_a_cdrom(tmp_path):
    # Target 2, the capture's side: the guest writes its ticks into a qcow2 overlay whose
    # backing file holds data of its own; a second, raw disk holds data it never writes; a
    # cdrom is skipped and recorded. Every checkpoint holds each disk as the guest saw it at
    # the pause (the qcow2 flattened through its backing file).
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    raw = raw_disk(tmp_path / "second.raw", 4 * MiB)
    with raw.open("r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(64 << 10))  # an extent in the middle: sparse around it
    stuffed = tmp_path / "stuff.raw"
    stuffed.write_bytes(b"\0" * (3 * MiB) + os.urandom(MiB))  # the backing's data: last MiB
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(stuffed), str(base)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    (tmp_path / "cd.iso").write_bytes(b"\1" * MiB)
    log = tmp_path / "serial.log"
    argv = [*qemu_argv(mem="128M", work="idle", mb=16, serial=f"file:{log}",
                       disk=f"file={top},cache=none"),
            "-drive", f"file={raw},format=raw,if=virtio,id=second",
            "-drive", f"file={tmp_path / 'cd.iso'},format=raw,if=ide,media=cdrom,id=cd"]
    run = HookedCli(tmp_path / "refs", "-v", "run", "--store", str(tmp_path / "store"),
                    "--interval", "0.5s", "--", *argv)
    try:
        wait_for(lambda: last_tick(log) >= 6, 180, "6 guest ticks")
        run.ctrl_c()
        assert run.wait() == 0, run.stderr
    finally:
        run.kill()
    with open_store(tmp_path / "store", readonly=True) as s:
        recs = s.list_checkpoints()
    assert [[(d["device"], d["format"], d["size"]) for d in r["disks"]] for r in recs] == \
        [[("virtio0", "qcow2", 4 * MiB), ("second", "raw", 4 * MiB)]] * len(recs)
    assert all(r["disks_skipped"] == [{"device": "cd", "why": "read-only"}] for r in recs)
    for r in recs:
        for device, want in run.disk_refs(r["id"]).items():
            assert image_digest(tmp_path / "store", r["id"], tmp_path, disk=device) == want, \
                (r["id"], device)
    assert len({tuple(run.disk_refs(r["id"]).values()) for r in recs}) >= 3  # it wrote
    # The first checkpoint read what was allocated (the backing's last MiB, the raw extent,
    # the ticks so far), not every block of either disk.
    first = recs[0]["disks"]
    assert 256 <= first[0]["blocks_dirty"] < 1024 and first[1]["blocks_dirty"] == 16, first
