"""Disks: discovery of what a checkpoint must capture, and what it leaves alone, on a real QEMU."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from test_qemu import VMCKPT, last_tick
from vmckpt.engine.qemu.disks import Disk, Skipped, find_disks
from vmckpt.engine.qemu.qmp import Qmp
from vmckpt.engine.qemu.testguest import qemu_argv
from vmckpt.storage import open_store

MiB = 1 << 20


async def qemu(argv: list[str], tmp: Path) -> tuple[subprocess.Popen, Qmp]:
    proc = subprocess.Popen([*argv, "-qmp", f"unix:{tmp / 'qmp'},server=on,wait=off"])
    return proc, await Qmp.connect(tmp / "qmp", pid=proc.pid)


async def until(cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def wait_ticks(log: Path, n: int, what: str) -> None:
    tick = last_tick(log)
    await until(lambda: last_tick(log) >= tick + n, what)


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




def test_disks_a_checkpoint_leaves_out_are_said_at_run_and_at_restore(tmp_path):
    # Until checkpoints capture disks, none is left out in silence: `run` names each writable
    # disk, the record lists them, and a restore says the guest sees them as they are now.
    raw, store = tmp_path / "d.raw", str(tmp_path / "store")
    raw.write_bytes(b"")
    raw.open("r+b").truncate(8 * MiB)
    argv = qemu_argv(mem="128M", work="idle", mb=16, serial="none",
                     disk=f"file={raw},format=raw")
    r = subprocess.run([VMCKPT, "run", "--store", store, "--interval", "0.3s",
                        "--max-checkpoints", "2", "--", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"disk virtio0 ({raw}) is not captured by the checkpoints" in r.stderr, r.stderr
    with open_store(store, readonly=True) as s:
        recs = s.list_checkpoints()
    assert [[(d["device"], d["size"]) for d in rec["disks_not_captured"]] for rec in recs] == \
        [[("virtio0", 8 * MiB)]] * 2
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
