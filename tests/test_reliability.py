"""The reliability suite's QEMU part: kill -9 of the engine at random moments of a real guest's
checkpointing. The rest of the suite: tests/test_crash.py (kills held in every phase on the
synthetic guest), the corruption matrix, full disks and the decoder fuzzing, all marked
`reliability`: `.venv/bin/pytest -m reliability [--full]`."""

from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
from test_qemu import VMCKPT, Run, assert_guest_runs_on

pytestmark = pytest.mark.reliability


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
