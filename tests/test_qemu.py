"""QEMU end to end: a real guest (Debian kernel, busybox initramfs, tick counter, memory
workload) checkpointed under TCG, restored into new QEMUs, and never harmed by the engine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from engine_with_refs import HookedCli, image_digest
from qemu.qmp.legacy import QEMUMonitorProtocol
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.restore import restore_qemu
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import run_program
from vmckpt.engine.targets.base import pid_alive
from vmckpt.storage import open_store, restore_image

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))
MIN_CKPTS = 20


def last_tick(log: Path) -> int:
    found = ticks(log.read_bytes()) if log.exists() else []
    return found[-1][0] if found else 0


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("tracking", ["wp", "async", "hybrid"])
def test_checkpoints_restore_bit_exact_and_the_counter_continues(tmp_path, tracking):
    checkpoints_restore_and_continue(tmp_path / "store", tmp_path, tracking)


def checkpoints_restore_and_continue(store: Path | str, tmp_path: Path, tracking: str) -> None:
    """The guest checkpointed into store; every checkpoint's RAM restores bit-exact, and the
    first, a middle and the last restored into new QEMUs count on from their pause."""
    log = tmp_path / "serial.log"
    digests: list[bytes] = []
    tick_at: list[int] = []
    said: list[bytes] = []  # the guest's serial output up to each pause
    enough = asyncio.Event()

    def paused(engine: Engine) -> None:  # test-only: guest RAM and its counter at the pause
        digests.append(hashlib.sha256(engine.tracker.ram_view()).digest())
        said.append(log.read_bytes())
        tick_at.append(found[-1][0] if (found := ticks(said[-1])) else 0)
        # Enough checkpoints, and the last ones of a booted, counting guest.
        middle = tick_at[len(digests) // 2]
        if len(digests) >= MIN_CKPTS and middle >= 1 and tick_at[-1] >= middle + 3:
            enough.set()

    def hook(engine: Engine) -> None:
        engine.on_paused = paused

    async def run() -> None:
        with open_store(store, create=True) as s:
            await run_program(qemu_argv(mem="128M", work="dirty", rate=5000, mb=48,
                                        serial=f"file:{log}"),
                              s, EngineOptions(interval=0.5, tracking=tracking),
                              max_checkpoints=120,
                              stop=enough, on_engine=hook)

    asyncio.run(run())
    assert enough.is_set(), tick_at
    last = len(digests)

    # Every checkpoint's RAM in the store is the memfd at its pause (the guest wrote
    # throughout the drains), and its device state is there.
    with open_store(store, readonly=True) as s:
        for rec in s.list_checkpoints():
            assert rec["device_state"]["size"] > 0 and rec["target"]["kind"] == "qemu"
            restore_image(s, rec["id"], tmp_path / "img", progress=False)
            got = hashlib.sha256((tmp_path / "img").read_bytes()).digest()
            assert got == digests[rec["id"] - 1], f"checkpoint {rec['id']} differs"
        assert sum(r["pages_dirtied"] for r in s.list_checkpoints()[2:]) > 10000
        if tracking == "hybrid":  # every drain switched back to async through QMP stop/cont
            assert all(r["switch_pause"] for r in s.list_checkpoints())

    for ckpt in (1, last // 2, last):
        loaded, then = restore_and_watch(store, ckpt, tmp_path)
        assert loaded == digests[ckpt - 1], f"RAM at cont differs from checkpoint {ckpt}"
        # The restored guest's output continues the original's at the pause, character for
        # character (a line cut by the pause is finished): its ticks follow on, none lost.
        counted = [t for t, _ in ticks(said[ckpt - 1] + then)]
        assert counted[-1] > tick_at[ckpt - 1] and \
            counted == list(range(counted[0], counted[-1] + 1)), (ckpt, counted)


def restore_and_watch(store: Path | str, ckpt: int, tmp_path: Path) -> tuple[bytes, bytes]:
    """Restores ckpt into a new QEMU; returns the digest of its RAM when the device state was
    in (just before cont) and the restored guest's serial output until its first tick."""
    log, pidfile = tmp_path / f"restored{ckpt}.log", tmp_path / f"restored{ckpt}.pid"
    loaded: list[bytes] = []

    async def go() -> int:
        with open_store(store, readonly=True) as s:
            task = asyncio.ensure_future(restore_qemu(
                s, ckpt, [*qemu_argv(mem="128M", work="dirty", rate=5000, mb=48,
                                     serial=f"file:{log}"), "-pidfile", str(pidfile)],
                on_loaded=lambda image: loaded.append(
                    hashlib.sha256(image.read_bytes()).digest())))
            deadline = time.monotonic() + 60
            while not last_tick(log) and not task.done():
                assert time.monotonic() < deadline, "the restored guest printed no tick"
                await asyncio.sleep(0.05)
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            return await task

    assert asyncio.run(go()) == 0
    return loaded[0], log.read_bytes()


class Run:
    """`vmckpt -v run` of the test guest, its log lines collected as they come."""

    def __init__(self, tmp_path: Path, *args: str, work: str = "dirty", rate: int = 0,
                 guest_ticks: int = 0) -> None:
        self.log, self.pidfile = tmp_path / "serial.log", tmp_path / "qemu.pid"
        argv = [*qemu_argv(mem="256M", work=work, rate=rate, mb=96, ticks=guest_ticks,
                           serial=f"file:{self.log}"), "-pidfile", str(self.pidfile)]
        self.engine = subprocess.Popen([VMCKPT, "-v", "run", "--store",
                                        str(tmp_path / "store"), "--interval", "0.5s", *args,
                                        "--", *argv], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.engine.stderr
        for line in self.engine.stderr:
            self.lines.append(line)

    def wait_line(self, text: str, count: int = 1) -> None:
        wait_for(lambda: sum(text in line for line in self.lines) >= count, 60,
                 f"{count} x {text!r} from the engine")

    def wait_boot(self) -> None:
        wait_for(lambda: last_tick(self.log) >= 1, 60, "the guest to boot")

    def cleanup(self) -> None:
        self.engine.kill()
        self.engine.wait()
        if self.pidfile.exists() and pid_alive(qemu := int(self.pidfile.read_text())):
            os.kill(qemu, signal.SIGKILL)


def qemu_status(qmp: Path) -> dict:
    """query-status through the test's own QMP socket (the engine has its own)."""
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        return monitor.cmd("query-status")
    finally:
        monitor.close()


def assert_guest_runs_on(pidfile: Path, log: Path) -> None:
    assert pid_alive(int(pidfile.read_text()))
    before = last_tick(log)
    wait_for(lambda: last_tick(log) >= before + 2, 20, "the guest to keep counting")


def test_guest_power_off_ends_the_run_with_qemu_status(tmp_path):
    run = Run(tmp_path, work="idle", guest_ticks=4)
    try:
        assert run.engine.wait(timeout=120) == 0
        assert ticks(run.log.read_bytes())[-1][0] == 4
        with open_store(tmp_path / "store", readonly=True) as s:
            assert len(s.list_checkpoints()) >= 5
    finally:
        run.cleanup()


@pytest.mark.parametrize("detach,phase", [(True, "pause"), (False, "drain")],
                         ids=["detach, in a pause", "in a drain"])
def test_ctrl_c(tmp_path, detach, phase):
    # Ctrl-C lands while checkpoint 4 is in that phase (the engine holds there until it is
    # sent): 4 is committed, restores to the RAM at its pause and is the last one; then QEMU
    # is stopped, or left running with --detach-on-exit.
    store, log, pidfile = tmp_path / "store", tmp_path / "serial.log", tmp_path / "qemu.pid"
    argv = [*qemu_argv(mem="256M", work="dirty", rate=5000, mb=96, serial=f"file:{log}"),
            "-pidfile", str(pidfile)]
    run = HookedCli(tmp_path / "refs", "-v", "run", "--store", str(store), "--interval", "0.5s",
                    *(["--detach-on-exit"] if detach else []), "--", *argv, hold=f"{phase}:4")
    try:
        held, n = run.held()  # a drain hold: at the first from checkpoint 4 on
        assert held == phase and (n == 4 or phase == "drain" and n > 4)
        run.ctrl_c()
        run.release()
        assert run.wait() == 0, run.stderr
        if detach:
            wait_for(lambda: last_tick(log) >= 1, 60, "the guest to boot")
            assert_guest_runs_on(pidfile, log)
        else:
            wait_for(lambda: not pidfile.exists(), 10, "QEMU to stop")
        assert f"checkpoint {n}: pause" in run.stderr, run.stderr
        with open_store(store, readonly=True) as s:
            assert [r["id"] for r in s.list_checkpoints()] == list(range(1, n + 1))
        assert image_digest(store, n, tmp_path) == run.ref(n)
    finally:
        run.kill()
        if pidfile.exists() and pid_alive(qemu := int(pidfile.read_text())):
            os.kill(qemu, signal.SIGKILL)


def vmckpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMCKPT, *args], capture_output=True, text=True, timeout=120)


def test_refusals_and_readable_restore_errors(tmp_path):
    store = str(tmp_path / "store")
    plain = qemu_argv(mem="128M", backend="none", serial="none")
    r = vmckpt("run", "--store", store, "--", *plain)
    assert r.returncode == 2 and "-object memory-backend-memfd,id=mem0,size=128M,share=on" \
        in r.stderr, r.stderr
    private = [*plain, "-object", "memory-backend-ram,id=m,size=128M",
               "-machine", "memory-backend=m"]
    r = vmckpt("run", "--store", store, "--", *private)
    assert r.returncode == 2 and "memory-backend-ram" in r.stderr, r.stderr

    r = vmckpt("run", "--store", store, "--add-memory-backend", "--max-checkpoints", "2",
               "--interval", "0.3s", "--", *plain)
    assert r.returncode == 0, r.stderr
    r = vmckpt("restore", "--store", store, "1", "--", *plain[:-2], "-machine", "q35", "-serial",
               "none")
    assert r.returncode == 2 and "could not load checkpoint 1" in r.stderr, r.stderr
    assert "qemu-system-x86_64" in r.stderr  # the checkpointed command line, to compare
    r = vmckpt("restore", "--store", store, "1", "--", *qemu_argv(mem="256M"))
    assert r.returncode == 2 and "128 MiB of guest RAM" in r.stderr, r.stderr

    # A restored VM checkpointed on: a branch from checkpoint 2 (2 is not the newest).
    r = vmckpt("run", "--store", store, "--add-memory-backend", "--max-checkpoints", "1",
               "--", *plain)
    assert r.returncode == 0, r.stderr
    run = HookedCli(tmp_path / "refs", "restore", "--store", store, "2", "--checkpoint",
                    "--max-checkpoints", "3", "--interval", "0.3s", "--", *plain)
    assert run.wait() == 0, run.stderr
    with open_store(store, readonly=True) as s:
        branch = s.list_checkpoints()[3:]
        # Its parent is the checkpoint it was restored from.
        assert [(c["id"], c["parent"]) for c in branch] == [(4, 2), (5, 4), (6, 5)]
        # Its first checkpoint owes the restored RAM, which the store already holds.
        assert branch[0]["dedup_hits"] > 0 and branch[0]["pages_stored_new"] < \
            branch[0]["dedup_hits"]
    for c in branch:  # each restores to the restored VM's RAM at its pause
        assert image_digest(Path(store), c["id"], tmp_path) == run.ref(c["id"]), c["id"]


def test_serve_checkpoints_a_qemu_started_by_someone_else(tmp_path):
    store, sock, qmp = tmp_path / "store", tmp_path / "engine.sock", tmp_path / "qmp.sock"
    serve = subprocess.Popen([VMCKPT, "serve", "--store", str(store), "--socket", str(sock),
                              "--qmp", str(qmp), "--interval", "0.3s", "--max-checkpoints", "3"],
                             stderr=subprocess.PIPE, text=True)
    qemu = None
    try:
        wait_for(sock.exists, 30, "vmckpt serve to listen")
        # What a user's script or libvirt hook does: the preload library, the socket, a QMP.
        env = {**os.environ, "VMCKPT_SOCKET": str(sock),
               "LD_PRELOAD": vmckpt("preload-path").stdout.strip()}
        qemu = subprocess.Popen([*qemu_argv(mem="128M", serial="none"),
                                 "-qmp", f"unix:{qmp},server=on,wait=off"], env=env)
        assert serve.wait(timeout=60) == 0, serve.communicate()[1]
        assert qemu.poll() is None  # serve lets go of QEMU, which runs on
        with open_store(store, readonly=True) as s:
            recs = s.list_checkpoints()
        assert len(recs) == 3
        assert all(r["target"]["kind"] == "qemu" and r["device_state"] for r in recs)
        assert recs[0]["target"]["argv"][0] == "qemu-system-x86_64"
    finally:
        serve.kill()
        if qemu:
            qemu.kill()
            qemu.wait()


def test_serve_says_when_its_qemu_is_killed(tmp_path):
    # serve used to exit silently when the QEMU it served was killed.
    store, sock, qmp = tmp_path / "store", tmp_path / "engine.sock", tmp_path / "qmp.sock"
    serve = subprocess.Popen([VMCKPT, "serve", "--store", str(store), "--socket", str(sock),
                              "--qmp", str(qmp), "--interval", "0.3s"],
                             stderr=subprocess.PIPE, text=True)
    env = {**os.environ, "VMCKPT_SOCKET": str(sock),
           "LD_PRELOAD": vmckpt("preload-path").stdout.strip()}
    qemu = None
    try:
        wait_for(sock.exists, 30, "vmckpt serve to listen")
        qemu = subprocess.Popen([*qemu_argv(mem="128M", serial="none"),
                                 "-qmp", f"unix:{qmp},server=on,wait=off"], env=env)
        wait_for(lambda: store.exists() and last_id(store) >= 2, 60, "two checkpoints")
        qemu.kill()
        qemu.wait()
        _, err = serve.communicate(timeout=60)
        last = last_id(store)
        assert f"has gone; the last committed checkpoint is {last}" in err, err
    finally:
        serve.kill()
        if qemu and qemu.poll() is None:
            qemu.kill()


def last_id(store: Path) -> int:
    r = vmckpt("ls", "--json", "--store", str(store))
    return max((c["id"] for c in json.loads(r.stdout or "[]")), default=0)


def test_refuses_a_qemu_whose_device_state_carries_guest_ram(tmp_path):
    # A second, private RAM backend (a pc-dimm) is not skipped by x-ignore-shared: the device
    # state would carry it, which the stream's RAM figures tell. Refused, and QEMU is stopped.
    pidfile = tmp_path / "qemu.pid"
    argv = [*qemu_argv(mem="128M", serial="none"), "-m", "128M,slots=1,maxmem=512M",
            "-object", "memory-backend-ram,id=m1,size=256M", "-device", "pc-dimm,memdev=m1",
            "-pidfile", str(pidfile)]
    r = vmckpt("run", "--store", str(tmp_path / "store"), "--", *argv)
    assert r.returncode == 2 and "puts guest RAM into its device state" in r.stderr, r.stderr
    wait_for(lambda: not pidfile.exists(), 10, "QEMU to be stopped")
