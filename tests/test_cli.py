"""The `vmckpt` command end to end: run, ls, restore, and its refusals (target 5)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_with_refs import HookedCli, image_digest
from vmckpt.lab.synthguest import command as synth

VMCKPT = [str(Path(sys.executable).with_name("vmckpt"))]


def vmckpt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMCKPT, *args], capture_output=True, text=True, timeout=timeout)


def test_run_ls_restore(tmp_path):
    store = tmp_path / "store"
    run = HookedCli(tmp_path / "refs", "run", "--store", str(store), "--interval", "0.2s",
                    "--max-checkpoints", "4", "--min-ram", "4M", "--",
                    *synth("--size", "16M", "--rate", "5000"))  # RAM saved at every pause
    assert run.wait() == 0, run.stderr
    listed = json.loads(vmckpt("ls", "--store", str(store), "--json").stdout)
    assert [c["id"] for c in listed] == [1, 2, 3, 4]
    # The default strategy: wp, pre-armed a quarter of a 0.2 s interval ahead of each pause
    # (from the third checkpoint on: the first two set tracking up), whenever the previous
    # commit left that long.
    assert all(r["strategy"]["tracking"] == "wp" and r["strategy"]["pre_arm"] == 0.05
               for r in listed), listed
    assert [bool(r["pre_armed"]["seconds"]) for r in listed] == \
        [False] * 2 + [r["interval_slack"] > 0.05 for r in listed[2:]], listed
    table = vmckpt("ls", "--store", str(store)).stdout.splitlines()
    assert table[0].split()[:2] == ["id", "parent"] and len(table) == 5
    r = vmckpt("restore", "--store", str(store), "--image", str(tmp_path / "img"), "latest")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img").stat().st_size == 16 << 20
    assert hashlib.sha256((tmp_path / "img").read_bytes()).hexdigest() == run.ref(4)
    assert "vmckpt-preload" not in r.stderr
    # A store named relative to the working directory reads as well (the read-only view once
    # linked the store's files by relative names from a directory elsewhere: "damaged").
    rel = subprocess.run([*VMCKPT, "ls", "--store", "store", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert [c["id"] for c in json.loads(rel.stdout or "[]")] == [1, 2, 3, 4], rel.stderr


def test_a_program_vmckpt_stops_is_not_reported_killed(tmp_path):
    # At --max-checkpoints vmckpt stops its program with SIGTERM; one without a handler dies of
    # it, and was then reported "killed by signal 15" with exit status 143.
    program = ("import mmap, os, time; fd = os.memfd_create('ram'); os.ftruncate(fd, 8 << 20); "
               "m = mmap.mmap(fd, 8 << 20); m[:] = b'x' * (8 << 20); time.sleep(60)")
    r = vmckpt("run", "--store", str(tmp_path / "store"), "--interval", "0.2s",
               "--max-checkpoints", "2", "--min-ram", "4M", "--", sys.executable, "-c", program)
    assert r.returncode == 0 and "killed" not in r.stderr, r.stderr
    assert "checkpoint 2:" in r.stderr


def test_run_refuses_program_without_shared_ram(tmp_path):
    r = vmckpt("run", "--store", str(tmp_path / "store"), "--attach-timeout", "2s", "--",
               "sleep", "30")
    assert r.returncode == 2
    assert "mapped no shared guest RAM within 2 s" in r.stderr
    assert "memory-backend-memfd" in r.stderr


def test_run_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = vmckpt("run", "--store", str(tmp_path), "--", "true")
    assert r.returncode == 2 and "not a vmckpt store" in r.stderr.lower()


def test_run_refuses_a_locked_store(tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vmckpt.storage import open_store; "
         "s = open_store(sys.argv[1], create=True); print('held', flush=True); time.sleep(60)",
         str(store)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout and holder.stdout.readline() == b"held\n"
        r = vmckpt("run", "--store", str(store), "--", "true")
        assert r.returncode == 2 and "locked" in r.stderr.lower()
    finally:
        holder.kill()
        holder.wait()


def test_restore_unknown_checkpoint(tmp_path):
    store = tmp_path / "store"
    vmckpt("run", "--store", str(store), "--max-checkpoints", "1", "--min-ram", "4M", "--",
           *synth("--size", "8M"))
    r = vmckpt("restore", "--store", str(store), "--image", str(tmp_path / "i"), "99")
    assert r.returncode == 2 and "99" in r.stderr


def test_preload_path():
    r = vmckpt("preload-path")
    assert r.returncode == 0 and Path(r.stdout.strip()).is_file()


def test_strategy_options_on_the_command_line_reach_the_engine(tmp_path):
    # Tests set the strategy in code; these are the flags a user types.
    store = tmp_path / "store"
    r = vmckpt("run", "--store", str(store), "--interval", "0.1s", "--max-checkpoints", "6",
               "--min-ram", "4M", "--tracking", "async", "--pre-arm", "20ms", "--copiers", "1",
               "--no-priority", "--buffer", "32M", "--no-disks", "--",
               *synth("--size", "16M", "--rate", "20000"))
    assert r.returncode == 0, r.stderr
    listed = json.loads(vmckpt("ls", "--store", str(store), "--json").stdout)
    assert [c["strategy"] for c in listed] == [
        {"interval": 0.1, "copiers": 1, "buffer_bytes": 32 << 20, "tracking": "async",
         "pre_arm": 0.02, "priority": False, "on_full": "wait", "disks": False}] * 6
    # Async tracking: its pauses copy what was written (wp's never do).
    assert any(c["copied_in_pause"] > 0 for c in listed[1:]), listed


@pytest.mark.parametrize("phase", ["pre-arm", "pause", "drain", "commit"])
def test_ctrl_c_commits_the_checkpoint_in_flight(tmp_path, phase):
    # Ctrl-C lands while checkpoint 3 is in that phase (the engine holds there until the signal
    # is sent): it is committed, restores to the RAM at its pause, and is the last one.
    store = tmp_path / "store"
    timing = ["--interval", "1s", "--pre-arm", "400ms"] if phase == "pre-arm" else \
        ["--interval", "0.2s", "--pre-arm", "0"]
    run = HookedCli(tmp_path / "refs", "-v", "run", "--store", str(store), *timing,
                    "--min-ram", "4M", "--", *synth("--size", "16M", "--rate", "5000"),
                    hold=f"{phase}:3")
    try:
        held, n = run.held()
        # (A drain or pre-arm hold is at the first from checkpoint 3 on: a drain that ran past
        # the lead under load leaves checkpoint 3 without a pre-arm.)
        assert held == phase and (n == 3 or phase in ("drain", "pre-arm") and n > 3)
        run.ctrl_c()
        run.release()
        assert run.wait() == 0, run.stderr
    finally:
        run.kill()
    assert f"checkpoint {n}: pause" in run.stderr, run.stderr
    listed = json.loads(vmckpt("ls", "--store", str(store), "--json").stdout)
    assert [c["id"] for c in listed] == list(range(1, n + 1)), run.stderr
    if phase == "pre-arm":
        assert listed[-1]["pre_armed"]["pages"] > 0
    for ckpt in (1, n):
        assert image_digest(store, ckpt, tmp_path) == run.ref(ckpt), ckpt
