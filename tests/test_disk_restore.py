"""Restoring a checkpoint's disks: each into a new sparse image (raw or qcow2), the user's QEMU
command line pointed at them (-drive and -blockdev, key=value and JSON), a command line whose
disks are not the checkpoint's refused, and the user's own images never written. Checkpoints
are committed straight into a real store (no capture needed); QEMU is real."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from engine_with_refs import file_digest
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
from vmckpt.storage import MapDelta, open_store, place_disks
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
