"""Target 3: kill -9 of the engine at any moment harms neither the guest nor the store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmckpt.engine.synthguest import command as synth
from vmckpt.storage import open_store, restore_image

HERE = Path(__file__).parent


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


def test_kill_engine_at_random_moments(tmp_path):
    rng = random.Random(1234)
    for trial in range(20):
        store, refs, report = tmp_path / f"s{trial}", tmp_path / f"r{trial}", tmp_path / "rep"
        refs.mkdir()
        engine = subprocess.Popen(
            [sys.executable, str(HERE / "engine_with_refs.py"), str(store), str(refs),
             *synth("--size", "16M", "--fill", "0.5", "--rate", "100000", "--partial", "0.3",
                    "--zero", "0.1", "--dup", "0.1", "--report", str(report),
                    "--seed", str(trial))],
            stdout=subprocess.PIPE)
        assert engine.stdout and engine.stdout.readline() == b"STARTED\n"
        guest = guest_pid(engine.pid)
        # Mostly mid-cycle: pauses, drains and commits happen every ~50 ms.
        time.sleep(rng.uniform(0.3, 1.5))
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        try:
            time.sleep(0.3)
            assert proc_state(guest) in "RS", "the guest is not running after the engine died"
            before = report.stat().st_size
            time.sleep(1.2)
            assert report.stat().st_size > before, "the guest stopped making progress"
        finally:
            os.kill(guest, signal.SIGKILL)
        with open_store(store) as s:
            records = s.list_checkpoints()
            assert [r["id"] for r in records] == list(range(1, len(records) + 1))
            for rec in records:
                restore_image(s, rec["id"], tmp_path / "img")
                assert (tmp_path / "img").read_bytes() == (refs / f"{rec['id']}.ref").read_bytes()
