"""Restores into real QEMUs that fail or are interrupted (issue 12, item 14): QEMU's own words
and the checkpointed command line in one error, no traceback, no QEMU left running, no RAM
image left in /dev/shm; the image is private, at a name nobody can plant anything on."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmckpt.engine.qemu.restore import RestoreError, restore_qemu
from vmckpt.engine.qemu.testguest import qemu_argv
from vmckpt.storage import open_store

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))
# Dirtying 96 MiB: its later checkpoints take a while to write out (the interrupt test).
GUEST = qemu_argv(mem="128M", serial="none", work="dirty", rate=50000, mb=96)


def other_machine(machine: str) -> list[str]:
    return [a.replace("pc,memory-backend", f"{machine},memory-backend") for a in GUEST]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hygiene") / "store"
    r = subprocess.run([VMCKPT, "run", "--store", str(path), "--max-checkpoints", "14",
                        "--interval", "1s", "--", *GUEST],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return path


def images_of(pid: int) -> list[str]:
    """RAM images the vmckpt process pid made in /dev/shm (old name or new)."""
    return glob.glob(f"/dev/shm/vmckpt-*-{pid}[.-]*")


def qemus_using(name: str) -> list[int]:
    """Processes whose command line names the file name."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if name.encode() in Path(cmdline).read_bytes():
                found.append(int(cmdline.split("/")[2]))
        except OSError:
            pass
    return found


CASES = {
    # (restore options, QEMU command line, what the last line says)
    "other machine type": ([], other_machine("q35"),
                           "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'"),
    "unknown machine": ([], other_machine("nosuch"), "qemu-system-x86_64: unsupported machine"),
    "other machine type, checkpointing": (["--checkpoint"], other_machine("q35"),
                                          "Machine type received is 'pc-i440fx-7.2'"),
    "unknown machine, checkpointing": (["--checkpoint"], other_machine("nosuch"),
                                       "qemu-system-x86_64: unsupported machine"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_restore_qemu_refuses_says_qemus_words_and_leaves_nothing(store, case):
    options, argv, said = CASES[case]
    proc = subprocess.Popen([VMCKPT, "restore", "--store", str(store), *options, "1", "--",
                             *argv], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vmckpt: QEMU could not load checkpoint 1: "), err
    assert said in last, last
    assert "which ran: qemu-system-x86_64 " in last and "pc,memory-backend=mem0" in last, last
    assert not images_of(proc.pid)


def test_another_ram_size_is_refused_before_any_image_is_written(store):
    argv = [a.replace("128M", "256M") for a in GUEST]
    proc = subprocess.Popen([VMCKPT, "restore", "--store", str(store), "1", "--", *argv],
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "the checkpoint has 128 MiB of guest RAM, the command line 256 MiB" in err
    assert not images_of(proc.pid)


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM,)],
                         ids=["Ctrl-C twice", "SIGTERM"])
def test_a_restore_interrupted_midway_leaves_no_image_and_no_qemu(store, signals):
    """Ctrl-C twice (the second one raises right there) or SIGTERM while the image is being
    written."""
    proc = subprocess.Popen([VMCKPT, "restore", "--store", str(store), "latest", "--", *GUEST],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (found := images_of(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no image was made"
            time.sleep(0.002)
        # Each interrupt sent while it is stopped, then a moment to take it: two signals
        # pending at once would merge into one. The first only cancels (asyncio's Runner).
        for sig, pause in zip(signals, (0.02, 0), strict=False):
            os.kill(proc.pid, signal.SIGSTOP)
            os.kill(proc.pid, sig)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(pause)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert not images_of(proc.pid), err
    assert not qemus_using(Path(found[0]).name), "a QEMU was left running"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (as root): a /dev/shm that fills up halfway through an image."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_image_directory_is_one_error_and_leaves_nothing(store, small_tmpfs):
    async def go() -> None:
        with open_store(store, readonly=True) as s:
            await restore_qemu(s, 1, GUEST, image_dir=str(small_tmpfs))

    with pytest.raises(RestoreError, match="cannot write the RAM image of checkpoint 1 in "
                                           ".*: No space left on device"):
        asyncio.run(go())
    assert list(small_tmpfs.iterdir()) == []


def test_planted_files_are_not_followed_and_the_image_is_private(store, tmp_path):
    """What used to be the image's name (vmckpt-ID-PID.ram): a symlink to a file of the user
    and a plain file, planted there beforehand, are neither followed nor written."""
    images = tmp_path / "images"
    images.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (images / f"vmckpt-1-{os.getpid()}.ram").symlink_to(victim)
    (images / f"vmckpt-2-{os.getpid()}.ram").write_text("planted")
    pidfile = tmp_path / "qemu.pid"
    seen: list[tuple[str, int]] = []

    def loaded(image: Path) -> None:
        seen.append((image.name, image.stat().st_mode & 0o777))
        os.kill(int(pidfile.read_text()), signal.SIGTERM)  # enough: it loaded

    async def go(ckpt: int) -> int:
        with open_store(store, readonly=True) as s:
            return await restore_qemu(s, ckpt, [*GUEST, "-pidfile", str(pidfile)],
                                      paused=True, image_dir=str(images), on_loaded=loaded)

    for ckpt in (1, 2):
        assert asyncio.run(go(ckpt)) == 0  # QEMU exits 0 on SIGTERM
    assert victim.read_text() == "precious"
    assert (images / f"vmckpt-1-{os.getpid()}.ram").readlink() == victim
    assert (images / f"vmckpt-2-{os.getpid()}.ram").read_text() == "planted"
    assert len(seen) == 2 and all(mode == 0o600 for _, mode in seen), seen
    assert not {name for name, _ in seen} & {f"vmckpt-{i}-{os.getpid()}.ram" for i in (1, 2)}
    assert sorted(p.name for p in images.iterdir()) == [f"vmckpt-1-{os.getpid()}.ram",
                                                        f"vmckpt-2-{os.getpid()}.ram"]


def test_an_image_file_is_private_and_removed_when_the_restore_fails(store, tmp_path,
                                                                    small_tmpfs):
    """`restore --image`: made 0600 whatever the umask, an existing file too; a restore that
    fails (the file system fills up) removes the file it made, in one line."""
    image = tmp_path / "ram.img"
    image.write_text("old")
    image.chmod(0o644)
    r = subprocess.run(["sh", "-c", f"umask 000 && exec {VMCKPT} restore --store {store} "
                                    f"--image {image} 1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert image.stat().st_mode & 0o777 == 0o600
    full = small_tmpfs / "ram.img"
    r = subprocess.run([VMCKPT, "restore", "--store", str(store), "--image", str(full),
                        "latest"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot write the RAM image {full}: No space left on device" in r.stderr
    assert list(small_tmpfs.iterdir()) == []
