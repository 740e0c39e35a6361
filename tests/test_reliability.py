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
