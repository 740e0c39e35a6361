"""The reliability suite's QEMU part: kill -9 of the engine held in every phase of a real
guest's checkpointing, and at random moments. The rest of the suite: tests/test_crash.py
(kills held in every phase on the synthetic guest), the corruption matrix, full disks and the
decoder fuzzing, all marked `reliability`: `.venv/bin/pytest -m reliability [--full]`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from engine_with_refs import PHASES
from qemu.qmp.legacy import QEMUMonitorProtocol
from test_crash import check_store, start_held, wait_held
from test_qemu import VMCKPT, Run, assert_guest_runs_on, last_tick, qemu_status, wait_for
from vmckpt.engine.qemu.testguest import qemu_argv

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(1800)  # --full: 5 kills a phase
@pytest.mark.parametrize("phase", PHASES)
def test_engine_killed_held_in_every_phase_on_a_qemu_guest(tmp_path, phase, full):
    # The engine holds once the guest has booted and rewrites its working set (SIGUSR1), in
    # phase of a checkpoint drawn at random; the kill lands there. Inside the pause QEMU is
    # stopped; after the kill the keeper has continued it and it counts on.
    rng = random.Random(f"qemu-held-{phase}")
    for trial in range(5 if full else 1):
        kill_held_qemu(tmp_path / f"t{trial}", phase, rng.randint(1, 4))


def kill_held_qemu(tmp: Path, phase: str, held_at: int) -> None:
    log, pidfile, qmp = tmp / "serial.log", tmp / "qemu.pid", tmp / "user.qmp"
    argv = [*qemu_argv(mem="128M", work="dirty", rate=5000, mb=48, serial=f"file:{log}"),
            "-pidfile", str(pidfile), "-qmp", f"unix:{qmp},server=on,wait=off"]
    engine, refs = start_held(tmp, argv, phase, held_at,
                              VMCKPT_TEST_INTERVAL="0.3", VMCKPT_TEST_HOLD_ON_SIGNAL="1")
    try:
        try:
            wait_for(lambda: last_tick(log) >= 1, 120, "the guest to boot")
            engine.send_signal(signal.SIGUSR1)
            held_at = wait_held(engine, phase)
            if phase == "pause":
                # Stopped, its device state saved (a migration to a file: "postmigrate").
                assert not qemu_status(qmp)["running"]
        finally:
            engine.kill()
            engine.wait()
        wait_for(lambda: qemu_status(qmp)["running"], 20, "the keeper to continue QEMU")
        before = last_tick(log)
        wait_for(lambda: last_tick(log) >= before + 2, 30, "the guest to keep counting")
    finally:  # whatever failed: no QEMU left behind
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    check_store(tmp, refs, phase, held_at, newest=3)  # those nearest the kill: 128 MiB each


def test_engine_killed_in_a_disk_drain_leaves_the_store_sound_and_qemu_clean(tmp_path):
    # Target 5 of the disks: the kill lands while a checkpoint's disk blocks go into the store
    # (the guest writing its disk as fast as it can). The store holds exactly the checkpoints
    # committed before, each with its RAM and disk at its pause; the keeper takes the engine's
    # fleecing away (no export, job, scratch node or bitmap is left) and the guest runs on.
    log, pidfile, qmp = tmp_path / "serial.log", tmp_path / "qemu.pid", tmp_path / "user.qmp"
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"")
    raw.open("r+b").truncate(32 << 20)
    argv = [*qemu_argv(mem="128M", work="diskwrite", mb=16, serial=f"file:{log}",
                       disk=f"file={raw},format=raw,cache=none"),
            "-pidfile", str(pidfile), "-qmp", f"unix:{qmp},server=on,wait=off"]
    engine, refs = start_held(tmp_path, argv, "disk-drain", 2,
                              VMCKPT_TEST_INTERVAL="0.3", VMCKPT_TEST_HOLD_ON_SIGNAL="1")
    try:
        try:
            wait_for(lambda: last_tick(log) >= 1, 120, "the guest to boot")
            engine.send_signal(signal.SIGUSR1)
            held_at = wait_held(engine, "disk-drain")
            scratch = {Path(f).parent for f in fleecing_left(qmp, files=True)}
            assert len(scratch) == 1, scratch
        finally:
            engine.kill()
            engine.wait()
        wait_for(lambda: not fleecing_left(qmp), 30, "the keeper to take the fleecing away")
        assert not scratch.pop().exists()  # nor the scratch images, with their old data
        before = last_tick(log)
        wait_for(lambda: last_tick(log) >= before + 2, 30, "the guest to keep counting")
        assert b"disk=ok" in log.read_bytes().splitlines()[-2]
    finally:  # whatever failed: no QEMU left behind
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    check_store(tmp_path, refs, "disk-drain", held_at, newest=2)


def fleecing_left(qmp: Path, files: bool = False) -> list[str]:
    """The engine's pieces still in QEMU (engine/qemu/fleece.py names them vmckpt-...), or
    the files of its scratch nodes."""
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        nodes = monitor.cmd("query-named-block-nodes", flat=True)
        if files:
            return [n["file"] for n in nodes if n["node-name"].startswith("vmckpt-")]
        names = [n["node-name"] for n in nodes]
        names += [b.get("name", "") for n in nodes for b in n.get("dirty-bitmaps", [])]
        names += [e["id"] for e in monitor.cmd("query-block-exports")]
        names += [j["device"] for j in monitor.cmd("query-block-jobs")]
    finally:
        monitor.close()
    return [n for n in names if n.startswith("vmckpt-")]


@pytest.mark.timeout(3600)  # --full: 30 trials
def test_engine_killed_at_random_moments_leaves_qemu_running_and_the_store_sound(tmp_path,
                                                                                 full):
    # 2 trials, 30 with --full. Each kill lands at a random moment after a random number of
    # committed checkpoints: in a pause, a drain or a commit, as it falls (the log says which
    # phase the engine last entered).
    rng = random.Random("qemu-kills")
    phases: dict[str, int] = {}
    for trial in range(30 if full else 2):
        tmp = tmp_path / f"t{trial}"
        tmp.mkdir()
        run = Run(tmp, "--detach-on-exit", "--interval", "0.3s")
        try:
            run.wait_boot()
            run.wait_line("checkpoint ", rng.randint(1, 4))
            time.sleep(rng.uniform(0, 0.3))
            run.engine.kill()
            run.engine.wait()
            last = next((p for line in reversed(run.lines)
                         for p in ("pausing", "draining", "checkpoint ") if p in line), "?")
            phases[last] = phases.get(last, 0) + 1
            assert_guest_runs_on(run.pidfile, run.log)
        finally:
            run.cleanup()
        store = str(tmp / "store")
        check = subprocess.run([VMCKPT, "check", "--read-data", "--store", store],
                               capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.startswith("sound"), check
        ls = subprocess.run([VMCKPT, "ls", "--json", "--store", store], capture_output=True,
                            text=True, check=True)
        assert json.loads(ls.stdout), "no checkpoint was committed before the kill"
    print(f"\nlast phase entered before each kill: {phases}")
