"""Restoring a checkpoint's disks: each into a new sparse image (raw or qcow2), the user's QEMU
command line pointed at them (-drive and -blockdev, key=value and JSON), a command line whose
disks are not the checkpoint's refused, and the user's own images never written. Checkpoints
are committed straight into a real store (no capture needed); QEMU is real."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from engine_with_refs import file_digest, image_digest
from test_disks import disk_ticks, run_with_disk
from test_qemu import VMCKPT, last_tick, wait_for
from vmckpt.engine.qemu.argv import parse_opts
from vmckpt.engine.qemu.disks import drive_names
from vmckpt.engine.qemu.qmp import Qmp
from vmckpt.engine.qemu.restore_disks import (
    DiskMismatch,
    DiskWriteError,
    match_drives,
    point_drives,
    write_disks,
)
from vmckpt.storage import MapDelta, open_store, place_disks, restore_image
from vmckpt.storage.pagemap import page_ids

MiB, PAGE = 1 << 20, 4096
RAM = 64 * PAGE


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def disk_bytes(size: int, seed: int) -> bytes:
    """A disk's content: random blocks here and there, the rest zero (holes), and a partial
    last block when size is not a whole number of blocks."""
    rng = np.random.default_rng(seed)
    data = np.zeros(size, np.uint8)
    for block in rng.choice(-(-size // PAGE), 40, replace=False):
        data[block * PAGE:(block + 1) * PAGE] = rng.integers(1, 256, PAGE, np.uint8)[
            :len(data[block * PAGE:(block + 1) * PAGE])]
    return data.tobytes()


def as_pages(data: bytes) -> np.ndarray:
    padded = data + bytes(-len(data) % PAGE)
    return np.frombuffer(padded, np.uint8).reshape(-1, PAGE)


def commit(store, disks: list[dict], contents: dict[str, bytes], parent: int | None = None,
           skipped: list[dict] | None = None) -> int:
    """A checkpoint whose disks hold contents (by device), as the engine would commit it."""
    placed = place_disks(RAM, disks)
    pfns, ids = [np.arange(RAM // PAGE)], [page_ids(as_pages(bytes(range(256)) * (RAM // 256)))]
    for d in placed:
        pages = as_pages(contents[d["device"]])
        pids = page_ids(pages)
        store.put_pages(pids, pages)
        pfns.append(d["first"] + np.arange(len(pages)))
        ids.append(pids)
    store.put_pages(ids[0], as_pages(bytes(range(256)) * (RAM // 256)))
    figures = [{**d, "blocks_dirty": 40, "blocks_new": 40, "blocks_dedup": 0} for d in placed]
    record = {"parent": parent, "time": time.time(), "ram_size": RAM, "page_size": PAGE,
              "target": {"kind": "qemu", "name": "qemu-system-x86_64", "argv": []},
              "disks": figures, "disks_skipped": skipped or [], "disks_not_captured": [],
              "pages_dirtied": RAM // PAGE, "pages_stored_new": 1, "dedup_hits": 0,
              "zero_pages": 0, "bytes_added": PAGE, "pages_changed": RAM // PAGE,
              "device_state": None, "pause": 0.005, "drain_time": 0.01,
              "interval_stretched": False, "strategy": {}}
    return store.commit_checkpoint(record, MapDelta(np.concatenate(pfns).astype(np.uint64),
                                                    np.concatenate(ids)))


def disk(device: str, file: Path, size: int, fmt: str, node: str = "") -> dict:
    return {"device": device, "node": node or f"#block{len(device)}", "size": size,
            "format": fmt, "file": str(file)}


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """The user's images: a raw, a qcow2 over a backing qcow2, a plain qcow2, a cdrom."""
    raw = tmp_path / "a.raw"
    raw.write_bytes(disk_bytes(8 * MiB, 1))
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", tmp_path / "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "c.qcow2", "4M")
    (tmp_path / "cd.iso").write_bytes(bytes(MiB))
    return {"raw": raw, "top": tmp_path / "top.qcow2", "base": tmp_path / "base.qcow2",
            "c": tmp_path / "c.qcow2", "cd": tmp_path / "cd.iso"}


def digests(paths: list[Path]) -> dict[Path, str]:
    return {p: file_digest(p) for p in paths}


async def _query(argv: list[str], tmp: Path) -> tuple[list[dict], list[dict]]:
    sock = tmp / "qmp.sock"
    proc = subprocess.Popen([*argv, "-S", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stderr=subprocess.PIPE)
    try:
        qmp = await Qmp.connect(sock, timeout=30, pid=proc.pid)
        try:
            return await qmp.cmd("query-block"), await qmp.cmd("query-named-block-nodes")
        finally:
            await qmp.close()
    except BaseException:
        proc.kill()
        raise AssertionError(proc.communicate()[1].decode()) from None
    finally:
        proc.kill()
        proc.wait()


def query_block(argv: list[str], tmp: Path) -> tuple[list[dict], list[dict]]:
    """What a real QEMU started from argv (paused) opens: query-block and the named nodes."""
    return asyncio.run(_query(argv, tmp))


QEMU = ["qemu-system-x86_64", "-accel", "tcg", "-m", "64M", "-nodefaults", "-display", "none"]


def test_drive_names_are_the_ones_qemu_gives(tmp_path, images):
    # The names of -drive options without an id, as QEMU makes them from interface and unit:
    # matching a drive to a checkpoint's disk by device id depends on them.
    files = []
    for n in range(6):
        files.append(tmp_path / f"{n}.raw")
        files[-1].write_bytes(bytes(PAGE))
    opts = [f"file={f},format=raw,if={i}" for f, i in zip(
        files, ["ide", "ide", "ide", "virtio", "virtio", "none"], strict=True)]
    opts[3] += ",index=3"
    opts[5] += ",id=x"
    opts.insert(3, "if=ide,media=cdrom")
    argv = [*QEMU, *[a for o in opts for a in ("-drive", o)]]
    blocks, _ = query_block(argv, tmp_path)
    names = drive_names([parse_opts(o, "") for o in opts])
    assert names == ["ide0-hd0", "ide0-hd1", "ide1-hd0", "ide1-cd1", "virtio3", "virtio0", "x"]
    assert sorted(names) == sorted(b["device"] for b in blocks)


def test_drives_open_the_restored_images_raw_and_never_the_old_ones(tmp_path, images):
    # -drive key=value: a raw and a qcow2 over a backing file, restored as flat raw images;
    # the cdrom is left as it is. QEMU, started from the rewritten command line, opens the
    # new files with the right driver, and nothing of the old qcow2 chain.
    argv = [*QEMU, "-drive", f"file={images['raw']},format=raw,if=virtio,cache=none",
            "-drive", f"file={images['top']},format=qcow2,if=virtio,l2-cache-size=1M,"
                      f"backing.file.filename={images['base']},discard=unmap",
            "-drive", f"file={images['cd']},format=raw,if=ide,media=cdrom"]
    contents = {"virtio0": images["raw"].read_bytes()[:8 * MiB - 1000] + bytes(1000),
                "virtio1": disk_bytes(16 * MiB, 2)}
    disks = [disk("virtio0", images["raw"], 8 * MiB, "raw"),
             disk("virtio1", images["top"], 16 * MiB, "qcow2")]
    before = digests(list(images.values()))
    with open_store(tmp_path / "store", create=True) as s:
        ckpt = commit(s, disks, contents, skipped=[{"device": "ide0-cd0", "why": "read-only"}])
        rec = s.get_record(ckpt)
        made = write_disks(s, rec, tmp_path, "raw")
    assert sorted(made) == ["virtio0", "virtio1"]
    for device, image in made.items():
        assert image.format == "raw" and image.path.parent == tmp_path
        assert image.path.stat().st_mode & 0o777 == 0o600
        assert image.path.read_bytes() == contents[device]  # bit-exact
        assert image.path.stat().st_blocks * 512 < 1 * MiB  # sparse: zero blocks are holes
    new = point_drives(argv, rec, made)
    assert new[:len(QEMU)] == QEMU and len(new) == len(argv)
    assert new[-1] == argv[-1]  # the cdrom
    assert f"file={made['virtio1'].path},format=raw," in new[-3]
    assert "l2-cache-size" not in new[-3] and "backing" not in new[-3]  # qcow2's own: gone
    assert "discard=unmap" in new[-3] and "cache=none" in new[-5]
    blocks, nodes = query_block(new, tmp_path)
    opened = {b["device"]: b["inserted"] for b in blocks if b.get("inserted")}
    assert {d: (i["file"], i["drv"]) for d, i in opened.items()} == {
        "virtio0": (str(made["virtio0"].path), "raw"),
        "virtio1": (str(made["virtio1"].path), "raw"),
        "ide0-cd0": (str(images["cd"]), "raw")}
    assert not any(n.get("backing_file") or str(images["top"]) in n["file"]
                   or str(images["base"]) in n["file"] for n in nodes)
    assert digests(list(images.values())) == before  # the user's images: untouched


def blockdev_argv(images: dict[str, Path]) -> list[str]:
    """libvirt's way (JSON, one node a -blockdev: file node, format node, backing chain) for a
    qcow2 over its base, and key=value with the file node inline for a raw."""
    j = json.dumps
    return [*QEMU,
            "-blockdev", j({"driver": "file", "filename": str(images["base"]),
                            "node-name": "base-file", "read-only": True}),
            "-blockdev", j({"driver": "qcow2", "node-name": "base", "file": "base-file",
                            "read-only": True}),
            "-blockdev", j({"driver": "file", "filename": str(images["top"]),
                            "node-name": "top-file", "cache": {"direct": False}}),
            "-blockdev", j({"driver": "qcow2", "node-name": "top", "file": "top-file",
                            "backing": "base", "discard": "unmap"}),
            "-device", j({"driver": "virtio-blk-pci", "drive": "top", "id": "disk0"}),
            "-blockdev", f"driver=raw,node-name=data,file.driver=file,"
                         f"file.filename={images['raw']}",
            "-device", "ide-hd,drive=data,id=disk1",
            "-drive", f"file={images['cd']},format=raw,if=ide,media=cdrom"]


DISK0 = "/machine/peripheral/disk0/virtio-backend"  # query-block's name of a virtio-blk-pci


def blockdev_disks(images: dict[str, Path]) -> list[dict]:
    return [disk(DISK0, images["top"], 16 * MiB, "qcow2", "top"),
            disk("disk1", images["raw"], 8 * MiB, "raw", "data")]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_blockdev_chains_end_at_the_restored_image(tmp_path, images, fmt):
    # -blockdev, JSON and key=value: each disk's format node is the new image's format over
    # the new file, and the old chain's nodes (its file node, its backing qcow2 and that one's
    # file) are gone from the command line: QEMU opens none of the user's images.
    argv = blockdev_argv(images)
    contents = {DISK0: disk_bytes(16 * MiB, 3), "disk1": disk_bytes(8 * MiB, 4)}
    before = digests(list(images.values()))
    with open_store(tmp_path / "store", create=True) as s:
        rec = s.get_record(commit(s, blockdev_disks(images), contents))
        made = write_disks(s, rec, tmp_path, fmt)
    for device, image in made.items():
        assert image.path.suffix == f".{fmt}" and image.path.stat().st_mode & 0o777 == 0o600
        flat = tmp_path / f"{device.replace('/', '_')}.check"
        qemu_img("convert", "-f", fmt, "-O", "raw", image.path, flat)
        assert flat.read_bytes() == contents[device]
    assert sorted(p.name.rsplit(".", 1)[-1] for p in tmp_path.glob("vmckpt-*")) == [fmt] * 2
    assert [d.name for _, d in match_drives(argv, rec)] == ["disk0", "disk1"]  # sizes too
    rec_other = {**rec, "disks": [{**rec["disks"][0], "size": 32 * MiB}, rec["disks"][1]]}
    with pytest.raises(DiskMismatch, match=f"disk {DISK0} is 16777216 bytes on the command "
                                           f"line \\({images['top']}\\), 33554432 in"):
        match_drives(argv, rec_other)
    new = point_drives(argv, rec, made)
    assert not any(n in a for a in new for n in ('"base-file"', '"top-file"', '"base"'))
    assert any(a.startswith("driver=") and str(made["disk1"].path) in a for a in new)
    blocks, nodes = query_block(new, tmp_path)
    opened = {b["qdev"]: b["inserted"] for b in blocks if b.get("inserted")}
    assert opened[DISK0]["file"] == str(made[DISK0].path)
    assert opened[DISK0]["drv"] == fmt and "backing_file" not in opened[DISK0]["image"]
    assert opened["disk1"]["file"] == str(made["disk1"].path)
    assert {n["node-name"] for n in nodes} >= {"top", "data"}
    assert not any(str(images[k]) in n["file"] for n in nodes for k in ("top", "base", "raw"))
    assert digests(list(images.values())) == before


def test_a_command_line_whose_disks_differ_is_refused_with_the_difference(tmp_path, images):
    rec = {"id": 7, "disks": [disk("virtio0", images["raw"], 8 * MiB, "raw"),
                              disk("virtio1", images["c"], 4 * MiB, "qcow2")]}
    raw, c = f"file={images['raw']},format=raw,if=virtio", f"file={images['c']},if=virtio"
    assert [d.name for _, d in match_drives([*QEMU, "-drive", raw, "-drive", c], rec)] == \
        ["virtio0", "virtio1"]
    # A disk fewer.
    with pytest.raises(DiskMismatch) as e:
        match_drives([*QEMU, "-drive", raw], rec)
    assert str(e.value) == (
        "the command line's disks do not match checkpoint 7's (it has 2: virtio0, virtio1; "
        "the command line 1: virtio0): the checkpoint's disk virtio1 "
        f"({images['c']}, 4194304 bytes) is not on the command line")
    # Another device id for the same image.
    with pytest.raises(DiskMismatch) as e:
        match_drives([*QEMU, "-drive", raw, "-drive", f"{c},id=data"], rec)
    assert f"the checkpoint's disk virtio1 ({images['c']}, 4194304 bytes) is data on the " \
        "command line" in str(e.value)
    # A disk of another size, and one more than the checkpoint has.
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(2 * MiB))
    with pytest.raises(DiskMismatch) as e:
        match_drives([*QEMU, "-drive", raw, "-drive", f"file={other},format=raw,if=virtio"],
                     rec)
    assert str(e.value).endswith(
        f"(it has 2: virtio0, virtio1; the command line 2: virtio0, virtio1): disk virtio1 is "
        f"2097152 bytes on the command line ({other}), 4194304 in the checkpoint")
    with pytest.raises(DiskMismatch) as e:
        match_drives([*QEMU, "-drive", raw, "-drive", c, "-drive",
                      f"file={other},format=raw,if=virtio"], rec)
    assert str(e.value).endswith(
        f"the command line 3: virtio0, virtio1, virtio2): the command line's disk virtio2 "
        f"({other}) is not in the checkpoint")
    assert "\n" not in str(e.value)
    # Neither file, id nor node tell (an anonymous -device, the image moved): in order.
    anon = {"id": 8, "disks": [disk("/machine/peripheral-anon/device[0]/virtio-backend",
                                    tmp_path / "moved.raw", 8 * MiB, "raw", "#block9")]}
    [(_, drive)] = match_drives([*QEMU, "-blockdev", f"driver=raw,node-name=d9,file.driver="
                                 f"file,file.filename={images['raw']}",
                                 "-device", "virtio-blk-pci,drive=d9"], anon)
    assert (drive.node, drive.file) == ("d9", str(images["raw"]))
    # Read-only drives, cdroms and snapshot=on drives are not disks a checkpoint holds.
    with pytest.raises(DiskMismatch, match="the command line 1: virtio0"):
        match_drives([*QEMU, "-drive", raw, "-drive", f"{c},snapshot=on"], rec)


def test_a_failed_write_leaves_no_image(tmp_path, images):
    # A block the store does not hold: the restore of that disk fails, and the disk written
    # before it is removed again.
    out = tmp_path / "out"
    out.mkdir()
    with open_store(tmp_path / "store", create=True) as s:
        disks = [disk("virtio0", images["raw"], 8 * MiB, "raw"),
                 disk("virtio1", images["c"], 4 * MiB, "qcow2")]
        ckpt = commit(s, disks, {"virtio0": disk_bytes(8 * MiB, 5),
                                 "virtio1": disk_bytes(4 * MiB, 6)})
        rec = s.get_record(ckpt)
        placed = rec["disks"][1]
        missing = hashlib.sha256(b"never stored").digest()
        delta = MapDelta(np.array([placed["first"] + 3], np.uint64),
                         np.frombuffer(missing, np.uint8).reshape(1, 32))
        broken = s.commit_checkpoint({**{k: v for k, v in rec.items() if k not in ("id", "map")},
                                      "parent": ckpt}, delta)
        for fmt in ("raw", "qcow2"):
            with pytest.raises(Exception, match="cannot be restored"):
                write_disks(s, s.get_record(broken), out, fmt)
            assert list(out.iterdir()) == []
        with pytest.raises(DiskWriteError, match="cannot create the image of disk virtio0 in"):
            write_disks(s, rec, tmp_path / "absent", "raw")
        with pytest.raises(DiskWriteError, match="vmckpt writes raw or qcow2"):
            write_disks(s, rec, out, "vmdk")


# ----------------------------------------------------- vmckpt restore / export, end to end


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """A real run of the test guest writing tick n to block n of its raw disk, checkpointed
    with its disk; returns the store, the guest's command line and a middle checkpoint whose
    disk holds some ticks."""
    tmp = tmp_path_factory.mktemp("captured")
    _, argv = run_with_disk(tmp, 8)
    with open_store(tmp / "store", readonly=True) as s:
        recs = s.list_checkpoints()
    mid = next(r for r in recs[len(recs) // 2:] if r["disks"][0]["blocks_dirty"])
    return tmp / "store", argv, mid


def restore_cmd(store: Path, ckpt: int, *args: str) -> list[str]:
    return [VMCKPT, "restore", "--store", str(store), str(ckpt), *args]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restore_runs_the_guest_on_new_disk_images_and_leaves_the_original(
        tmp_path, captured, fmt):
    # The command line as the VM ran, unchanged: the restore writes the checkpoint's disk into
    # a new image in --disk-dir, the guest runs on it from its checkpointed instant and finds
    # no write from after it (disk=ok; its next tick is the one after the disk's last), and
    # the user's image is the same before and after, though the guest writes its disk.
    store, argv, mid = captured
    raw = Path(next(a for a in argv if a.startswith("file=")).split(",")[0][5:])
    original = file_digest(raw)
    with open_store(store, readonly=True) as s:
        restore_image(s, mid["id"], tmp_path / "ref.raw", progress=False, disk="virtio0")
    on_disk = disk_ticks((tmp_path / "ref.raw").read_bytes())
    assert on_disk == list(range(1, len(on_disk) + 1)) and on_disk
    log, disks = tmp_path / "restored.log", tmp_path / "disks"
    disks.mkdir()
    restored = [f"file:{log}" if a.startswith("file:") else a for a in argv]
    proc = subprocess.Popen(restore_cmd(store, mid["id"], "--disk-dir", str(disks),
                                        "--disk-format", fmt, "--", *restored),
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: last_tick(log) >= on_disk[-1] + 3, 120, "the restored guest")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [ln for ln in log.read_bytes().split(b"\n")[:-1] if b"VMCKPT-TICK" in ln]
    assert lines and all(b"disk=ok" in ln for ln in lines), lines
    assert int(lines[0].split()[1]) == on_disk[-1] + 1, (lines[0], on_disk[-1])
    assert file_digest(raw) == original
    [image] = disks.iterdir()
    assert image.suffix == f".{fmt}" and f"disk virtio0 restored into {image} ({fmt})" in err
    flat = tmp_path / "after.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", image, flat)
    after = disk_ticks(flat.read_bytes())  # the restored guest wrote its ticks there
    assert after[:len(on_disk)] == on_disk and len(after) > len(on_disk)


def test_restore_checkpoint_captures_the_restored_disk_as_a_branch(tmp_path, captured):
    # restore --checkpoint: the branch's checkpoints hold the restored image (not the user's),
    # taken on from the parent's disk: the guest's ticks go on from the checkpoint's.
    store = Path(shutil.copytree(captured[0], tmp_path / "store"))
    _, argv, mid = captured
    with open_store(store, readonly=True) as s:
        last = s.get_record("latest")["id"]
    log, disks = tmp_path / "branch.log", tmp_path / "disks"
    disks.mkdir()
    restored = [f"file:{log}" if a.startswith("file:") else a for a in argv]
    r = subprocess.run(restore_cmd(store, mid["id"], "--checkpoint", "--interval", "0.5s",
                                   "--max-checkpoints", "4", "--disk-dir", str(disks), "--",
                                   *restored), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    [image] = disks.iterdir()
    with open_store(store, readonly=True) as s:
        branch = [rec for rec in s.list_checkpoints() if rec["id"] > last]
        assert [rec["parent"] for rec in branch] == [mid["id"], *(b["id"] for b in branch[:-1])]
        assert all(rec["disks"][0]["file"] == str(image) for rec in branch)
        restore_image(s, branch[-1]["id"], tmp_path / "b.raw", progress=False, disk="virtio0")
        restore_image(s, mid["id"], tmp_path / "m.raw", progress=False, disk="virtio0")
    at_mid = disk_ticks((tmp_path / "m.raw").read_bytes())
    on_branch = disk_ticks((tmp_path / "b.raw").read_bytes())
    assert on_branch[:len(at_mid)] == at_mid and on_branch == list(range(1, len(on_branch) + 1))
    assert len(on_branch) > len(at_mid)


def test_restore_one_disk_and_refuse_other_disks(tmp_path, captured):
    store, argv, mid = captured
    out = tmp_path / "d.img"
    at = argv.index("-drive")
    r = subprocess.run(restore_cmd(store, mid["id"], "--disk", "virtio0", "-o", str(out)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert image_digest(store, mid["id"], tmp_path, disk="virtio0") == file_digest(out)
    assert out.stat().st_mode & 0o777 == 0o600
    r = subprocess.run(restore_cmd(store, mid["id"], "--disk", "virtio0", "--image",
                                   str(tmp_path / "d.qcow2"), "--disk-format", "qcow2"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    qemu_img("convert", "-f", "qcow2", "-O", "raw", tmp_path / "d.qcow2", tmp_path / "q.raw")
    assert file_digest(tmp_path / "q.raw") == file_digest(out)
    for args, words in [
            (["--disk", "vda", "-o", str(out)], f"checkpoint {mid['id']} has no disk vda "
                                                "(its disks: virtio0)"),
            (["--disk", "virtio0"], "--disk DEVICE writes that disk into the file -o FILE"),
            (["--", *[a.replace(",format=raw", ",format=raw,id=data") for a in argv]],
             "the command line's disks do not match checkpoint"),
            (["--", *argv[:at], *argv[at + 2:]],
             "the checkpoint's disk virtio0")]:
        r = subprocess.run(restore_cmd(store, mid["id"], *args), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("vmckpt: ") and \
            r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert list(tmp_path.glob("vmckpt-*")) == []
    # A QEMU that cannot load the checkpoint (another machine type): the disks written for it
    # are removed again.
    disks = tmp_path / "disks"
    disks.mkdir()
    q35 = [a.replace("pc,memory-backend", "q35,memory-backend") for a in argv]
    r = subprocess.run(restore_cmd(store, mid["id"], "--disk-dir", str(disks), "--", *q35),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"QEMU could not load checkpoint {mid['id']}" in r.stderr, \
        r.stderr
    assert list(disks.iterdir()) == []


def test_export_writes_the_disks_and_points_its_command_line_at_them(tmp_path, captured):
    store, argv, mid = captured
    out = tmp_path / "out"
    r = subprocess.run([VMCKPT, "export", "--store", str(store), str(mid["id"]), "-o",
                        str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    image = out / "disk-virtio0.img"
    assert manifest["disks"] == [{"device": "virtio0", "image": str(image),
                                  "size": 16 * MiB, "format": "raw",
                                  "blocks": manifest["disks"][0]["blocks"]}]
    assert file_digest(image) == image_digest(store, mid["id"], tmp_path, disk="virtio0")
    hint = manifest["qemu"]["argv"]
    assert any(a.startswith(f"file={image},format=raw,") for a in hint), hint
    assert hint[-2] == "-qmp"
    blocks, _ = query_block(hint[:-2], tmp_path)
    assert [b["inserted"]["file"] for b in blocks if b.get("inserted")] == [str(image)]


# -------------------------------------------------------------------------------- inspector


def vmckpt(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([VMCKPT, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def as_json(*args: str):
    return json.loads(vmckpt(*args, "--json").stdout)


CHANGED = [1, 2, 3, 100, 2000]  # virtio0's blocks checkpoint 2 writes


@pytest.fixture
def two(tmp_path) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """A store of two checkpoints with two disks (one of a size that ends in a partial
    block); the second changes five blocks of the first disk and nothing else."""
    store = tmp_path / "store"
    before, after = bytearray(disk_bytes(8 * MiB, 7)), bytearray(disk_bytes(8 * MiB, 7))
    for n, block in enumerate(CHANGED):
        before[block * PAGE:(block + 1) * PAGE] = bytes([100 + n]) * PAGE
        after[block * PAGE:(block + 1) * PAGE] = bytes([n + 1]) * PAGE
    one = {"virtio0": bytes(before), "virtio1": disk_bytes(4 * MiB + 1000, 8)}
    second = {**one, "virtio0": bytes(after)}
    disks = [disk("virtio0", tmp_path / "a.raw", 8 * MiB, "raw"),
             disk("virtio1", tmp_path / "b.qcow2", 4 * MiB + 1000, "qcow2")]
    with open_store(store, create=True) as s:
        commit(s, disks, second, commit(s, disks, one))
    return store, one, second


def test_ls_show_diff_stats_plot_cover_the_disks(tmp_path, two):
    store, one, second = two
    header, *lines = vmckpt("ls", "--store", str(store)).stdout.splitlines()
    assert "disks" in header and "disk new" in header
    assert [line.split()[-4:-2] for line in lines] == [["2", "80"]] * 2, lines
    shown = as_json("show", "--store", str(store), "2")
    assert [(d["device"], d["size"], d["format"], d["blocks_dirty"], d["blocks_new"],
             d["blocks_dedup"], d["changed_blocks"], d["data_blocks"])
            for d in shown["disks"]] == [
        ("virtio0", 8 * MiB, "raw", 40, 40, 0, 5, int(as_pages(second["virtio0"])
                                                       .any(axis=1).sum())),
        ("virtio1", 4 * MiB + 1000, "qcow2", 40, 40, 0, 0, 40)]
    assert shown["dirty"]["pages"] == RAM // PAGE and shown["dirty"]["changed_pages"] == 0
    first = as_json("show", "--store", str(store), "1")
    assert [d["changed_blocks"] for d in first["disks"]] == [45, 40]  # from empty disks
    text = vmckpt("show", "--store", str(store), "2").stdout
    assert "disks         2 captured" in text
    assert any(line.split()[:2] == ["virtio1", "4.0"] for line in text.splitlines()), text
    diff = as_json("diff", "--store", str(store), "1", "2")
    assert diff["differing_pages"] == 0 and diff["pages"] == RAM // PAGE
    assert [(d["device"], d["present"], d["blocks"], d["differing_blocks"])
            for d in diff["disks"]] == [("virtio0", "both", 2048, 5), ("virtio1", "both", 1025, 0)]
    assert [(r["start"], r["pages"]) for r in diff["disks"][0]["regions"]] == \
        [(PAGE, 3), (100 * PAGE, 1), (2000 * PAGE, 1)]
    text = vmckpt("diff", "--store", str(store), "1", "2").stdout
    assert "checkpoints 1 and 2: 0 of 64 pages differ" in text
    assert "disk virtio0: 5 of 2048 blocks differ (20 KiB), in 3 regions" in text
    stats = as_json("stats", "--store", str(store))
    assert stats["disk_logical_bytes"] == 2 * (12 * MiB + 1000)
    assert (stats["disk_blocks_dirty"], stats["disk_blocks_stored_new"],
            stats["disk_blocks_dedup"]) == (160, 160, 0)
    assert re.search(r"\ndisk blocks +160 read, 160 stored new, 0 already stored",
                     vmckpt("stats", "--store", str(store)).stdout)
    png = tmp_path / "p.png"
    vmckpt("plot", "--store", str(store), "-o", str(png))
    assert png.stat().st_size > 20_000


def test_check_reads_disk_blocks_and_prune_gc_keep_the_kept_disks(tmp_path, two):
    from test_inspect import close, raw_db

    store, one, second = two
    r = subprocess.run([VMCKPT, "check", "--store", str(store), "--read-data", "--json"],
                       capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["sound"]
    stored = report["pages_stored"]
    # Drop checkpoint 1: the five blocks only it held go at gc, the rest stays; checkpoint 2
    # restores bit-exact, both disks.
    assert as_json("prune", "--store", str(store), "--keep-last", "1")["kept"] == [2]
    gc = as_json("gc", "--store", str(store))
    assert gc["pages_freed"] == len(CHANGED) and gc["pages_stored"] == stored
    with open_store(store, readonly=True) as s:
        for device in second:
            restore_image(s, 2, tmp_path / "d.img", progress=False, disk=device)
            assert (tmp_path / "d.img").read_bytes() == second[device]
            (tmp_path / "d.img").unlink()
        pmap = s.read_map(2)
        first = s.get_record(2)["disks"][1]["first"]
    # A disk block gone bad is found by check --read-data, named by its disk and block.
    pid = pmap.ids[first + int(np.flatnonzero(pmap.ids[first:].any(axis=1))[0])].tobytes()
    block = int(np.flatnonzero((pmap.ids[first:] == np.frombuffer(pid, np.uint8))
                               .all(axis=1))[0])
    db = raw_db(store)
    pages = db.get_column_family("pages")
    pages[pid] = bytes(reversed(pages[pid]))
    close(db, pages)
    r = subprocess.run([VMCKPT, "check", "--store", str(store), "--read-data"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"checkpoint 2 disk virtio1 block {block}: page {pid.hex()}" in r.stdout, r.stdout
