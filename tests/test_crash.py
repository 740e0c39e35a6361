"""Target 3: kill -9 of the engine at any moment harms neither the guest nor the store.

Each kill lands in a known phase of a known checkpoint: tests/engine_with_refs.py holds the
engine there (VMCKPT_TEST_HOLD) and says so, and the test kills it while it waits. Every phase
is hit, at checkpoints drawn at random."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_with_refs import PHASES, file_digest
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store, restore_image

HERE = Path(__file__).parent
VMCKPT = str(Path(sys.executable).with_name("vmckpt"))

# What the store holds after a kill held at checkpoint n: only whole checkpoints, and every
# one committed before the kill.
COMMITTED = {"pause": -1, "drain": -1, "disk-drain": -1, "commit": -1, "committed": 0}


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def guest_pid(engine_pid: int) -> int:
    for _ in range(100):
        kids = Path(f"/proc/{engine_pid}/task/{engine_pid}/children").read_text().split()
        for kid in kids:
            if "synthguest" in Path(f"/proc/{kid}/cmdline").read_text():
                return int(kid)
        time.sleep(0.05)
    raise AssertionError("the guest did not start")


def read_line(proc: subprocess.Popen, start: bytes, timeout: float = 120.0) -> bytes:
    """The next line of proc's output that begins with start (the guest writes there too)."""
    assert proc.stdout
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"the engine said no {start!r} line"
        line = proc.stdout.readline()
        assert line, f"the engine exited before a {start!r} line"
        if line.startswith(start):
            return line


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


pytestmark = pytest.mark.reliability


@pytest.mark.timeout(1800)  # --full: 25 trials
@pytest.mark.parametrize("phase", PHASES)
def test_kill_engine_in_every_phase(tmp_path, phase, full):
    # 4 kills a phase, 25 with --full: 100 in all.
    rng = random.Random(f"crash-{phase}")
    for trial in range(25 if full else 4):
        # From the second checkpoint on, so that at least one is committed before the kill.
        kill_held(tmp_path / f"t{trial}", phase, rng.randint(2, 8), seed=trial)


def start_held(tmp: Path, argv: list[str], phase: str, held_at: int,
               **env: str) -> tuple[subprocess.Popen, Path]:
    """tests/engine_with_refs.py on argv, to hold in phase at checkpoint held_at."""
    store, refs = tmp / "store", tmp / "refs"
    refs.mkdir(parents=True)
    engine = subprocess.Popen(
        [sys.executable, str(HERE / "engine_with_refs.py"), str(store), str(refs), *argv],
        # Unbuffered: read_line selects on the pipe, and a line already read into a buffer
        # behind another (the guest writes there too) would never wake it.
        stdout=subprocess.PIPE, bufsize=0,
        env={**os.environ, **env, "VMCKPT_TEST_HOLD": f"{phase}:{held_at}"})
    assert read_line(engine, b"STARTED") == b"STARTED\n"
    return engine, refs


def wait_held(engine: subprocess.Popen, phase: str) -> int:
    """The checkpoint the engine holds at, in phase: a later one than asked for a drain when
    the one asked for copied nothing."""
    _, at, ckpt = read_line(engine, b"HELD").split()
    assert at.decode() == phase
    return int(ckpt)


def check_store(tmp: Path, refs: Path, phase: str, held_at: int, newest: int = 0) -> None:
    """The store holds exactly the checkpoints committed before the kill, each one (or the
    newest few) the guest's RAM at its pause, and `vmckpt check --read-data` finds it sound."""
    store = tmp / "store"
    with open_store(store) as s:
        records = s.list_checkpoints()
        assert [r["id"] for r in records] == list(range(1, held_at + COMMITTED[phase] + 1)), \
            (phase, held_at)
        for rec in records[-newest:]:
            restore_image(s, rec["id"], tmp / "img")
            got = hashlib.sha256((tmp / "img").read_bytes()).hexdigest()
            assert got == (refs / f"{rec['id']}.sha256").read_text(), rec["id"]
            disks = json.loads((refs / f"{rec['id']}.disks.json").read_text())
            assert [d["device"] for d in rec["disks"]] == list(disks)
            for device, want in disks.items():  # and each disk as it was at its pause
                restore_image(s, rec["id"], tmp / "img", disk=device)
                assert file_digest(tmp / "img") == want, (rec["id"], device)
    check = subprocess.run([VMCKPT, "check", "--read-data", "--store", str(store)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith("sound"), check


def kill_held(tmp: Path, phase: str, held_at: int, seed: int) -> None:
    """Runs the engine until it holds in phase at checkpoint held_at, kills it there, then
    checks the guest runs on and the store holds exactly the checkpoints committed before."""
    report = tmp / "report"
    engine, refs = start_held(
        tmp, synth("--size", "16M", "--fill", "0.5", "--rate", "100000", "--partial", "0.3",
                   "--zero", "0.1", "--dup", "0.1", "--report", str(report), "--seed",
                   str(seed)), phase, held_at)
    try:
        guest = guest_pid(engine.pid)
        # The kill lands while the engine waits in that phase of that checkpoint.
        held = wait_held(engine, phase)
        assert held >= held_at
        held_at = held
        if phase == "pause":
            assert proc_state(guest) == "T", "the guest runs inside the pause"
    finally:
        engine.send_signal(signal.SIGKILL)
        engine.wait()
    try:
        # The keeper continues a guest stopped inside the pause; it goes on writing.
        wait_for(lambda: proc_state(guest) in "RS", "the guest is not running after the kill")
        wait_for(report.exists, "the guest reports nothing")
        before = report.stat().st_size
        wait_for(lambda: report.stat().st_size > before, "the guest stopped making progress")
    finally:
        os.kill(guest, signal.SIGKILL)
    check_store(tmp, refs, phase, held_at)
