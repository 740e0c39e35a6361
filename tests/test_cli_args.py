"""Bad arguments through the real `vmckpt` command: one clear line and exit 2, never a
traceback (issue 12, item 15); the one size and duration grammar; a program killed under
`vmckpt run` is said with its last committed checkpoint (item 5); without userfaultfd
permission the user is told why and how to allow it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from vmckpt.engine.qemu.testguest import qemu_argv
from vmckpt.engine.units import parse_duration, parse_size
from vmckpt.lab.synthguest import command as synth

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))
GUEST = synth("--size", "16M", "--rate", "2000", "--duration", "20")  # ends by itself


def vmckpt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMCKPT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store with two checkpoints of the synthetic guest."""
    path = tmp_path_factory.mktemp("args") / "store"
    r = vmckpt("run", "--store", str(path), "--interval", "0.2s", "--max-checkpoints", "2",
               "--min-ram", "4M", "--", *GUEST)
    assert r.returncode == 0, r.stderr
    return path


RUN = ("run", "--min-ram", "4M")
BAD = [
    # (arguments, what the one error line must say)
    ([*RUN, "--interval", "1x"], "'--interval': a duration is a number with s, ms"),
    ([*RUN, "--interval", "-1"], "'--interval': a duration is"),
    ([*RUN, "--interval", "0"], "'--interval': '0' is out of range: more than 0 to 1d"),
    ([*RUN, "--interval", "nan"], "'--interval': a duration is"),
    ([*RUN, "--interval", "inf"], "'--interval': a duration is"),
    ([*RUN, "--interval", "2d"], "'--interval': '2d' is out of range"),
    ([*RUN, "--interval", "9" * 400], "'--interval': '999"),
    ([*RUN, "--interval", ""], "'--interval': a duration is"),
    ([*RUN, "--buffer", "abc"], "'--buffer': a size is bytes or a number with K, M, G or T"),
    ([*RUN, "--buffer", "1T"], "'--buffer': '1T' is out of range: 1M to"),
    ([*RUN, "--buffer", "0"], "'--buffer': '0' is out of range"),
    ([*RUN, "--buffer", "1.5"], "'--buffer': '1.5' is not a whole number of bytes"),
    ([*RUN, "--buffer", "-64M"], "'--buffer': a size is"),
    (["run", "--min-ram", "1x"], "'--min-ram': a size is"),
    ([*RUN, "--", "/etc/passwd"], "cannot start /etc/passwd: Permission denied"),
    ([*RUN, "--pre-arm", "1x"], "'--pre-arm': 'auto' or a duration"),
    ([*RUN, "--pre-arm", "-1"], "'--pre-arm': 'auto' or a duration"),
    ([*RUN, "--pre-arm", "2s"], "--pre-arm (2 s) must be shorter than --interval (1 s)"),
    ([*RUN, "--attach-timeout", "0"], "'--attach-timeout': '0' is out of range"),
    ([*RUN, "--copiers", "0"], "'--copiers': 0 is not in the range"),
    ([*RUN, "--max-checkpoints", "0"], "'--max-checkpoints': 0 is not in the range"),
    (["restore", "--", "-5"], "'CKPT': a checkpoint is a number or 'latest' (ids are 0 to"),
    (["restore", str(1 << 64)], f"'CKPT': no checkpoint '{1 << 64}' can exist: ids are 0 to"),
    (["restore", "9" * 40], "'CKPT': no checkpoint '9999"),
    (["restore", "1x"], "'CKPT': a checkpoint is a number or 'latest'"),
    (["restore", "--workers", "0", "1"], "'--workers': 0 is not in the range"),
    (["restore", "--image", "/missing/x", "1"],
     "cannot write the RAM image /missing/x: No such file or directory"),
    (["show", "--", "-5"], "a checkpoint is a number or 'latest'"),
    (["show", str(1 << 64)], f"no checkpoint {1 << 64} in"),
    (["check", "--max-duration", "1x"], "'--max-duration': a duration is a number with s, ms"),
    (["check", "--max-duration", "-1s"], "'--max-duration': a duration is"),
    (["prune", "--keep-within", "1x"], "'--keep-within': a duration is a number with s, ms"),
    (["prune", "--keep-within", "9" * 400], "'--keep-within': '999"),
]


@pytest.mark.parametrize(("args", "said"), BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_argument_is_one_line_and_exit_2(store, args, said):
    guest = ["--", *GUEST] if args[0] == "run" else []
    r = vmckpt(args[0], "--store", str(store), *args[1:], *guest)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("vmckpt: ") and r.stderr.count("\n") == 1, r.stderr
    assert said in r.stderr, r.stderr


def test_the_grammar_of_sizes_and_durations():
    sizes = {"4096": 4096, "64M": 64 << 20, "64m": 64 << 20, "64MiB": 64 << 20,
             "64MB": 64 << 20, "1.5G": 3 << 29, " 2T ": 2 << 40, "512B": 512, ".5K": 512}
    assert {t: parse_size(t) for t in sizes} == sizes
    durations = {"1s": 1.0, "200ms": 0.2, "1.5": 1.5, "10us": 1e-5, "10m": 600.0,
                 "2h": 7200.0, "3d": 259200.0}
    assert {t: parse_duration(t) for t in durations} == durations
    for bad in ("", "1x", "-1", "1e3", "nan", "inf", "1KK", "K"):
        with pytest.raises(ValueError):
            parse_size(bad)
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_unusual_but_valid_values_are_taken(tmp_path):
    """An hour's interval (once an OverflowError) and sizes in other spellings run."""
    store = tmp_path / "store"
    r = vmckpt("run", "--store", str(store), "--interval", "1h", "--max-checkpoints", "1",
               "--buffer", "32MiB", "--min-ram", "4096K", "--attach-timeout", "1m",
               "--pre-arm", "0", "--", *GUEST)
    assert r.returncode == 0, r.stderr
    listed = json.loads(vmckpt("ls", "--store", str(store), "--json").stdout)
    assert [c["id"] for c in listed] == [1]
    assert listed[0]["strategy"]["pre_arm"] == 0


def test_guest_killed_by_sigkill_is_said_with_the_last_checkpoint(tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [VMCKPT, "run", "--store", str(store), "--interval", "0.1s", "--min-ram", "4M", "--",
         *synth("--size", "16M", "--rate", "2000", "--duration", "600")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout and proc.stderr
        ready = proc.stdout.readline()  # the guest says its pid
        guest = int(re.fullmatch(r"READY pid=(\d+) .*\n", ready)[1])
        lines = []
        for line in proc.stderr:  # synchronise on the engine's own log: checkpoint 3 is in
            lines.append(line)
            if line.startswith("vmckpt: checkpoint 3:"):
                break
        else:
            pytest.fail("".join(lines))
        os.kill(guest, signal.SIGKILL)
        rest = proc.stderr.read()
        assert proc.wait(60) == 128 + signal.SIGKILL, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in rest, rest
    last = max(c["id"] for c in json.loads(vmckpt("ls", "--store", str(store), "--json").stdout))
    assert last >= 3
    said = rest.strip().splitlines()[-1]
    assert re.fullmatch(r"vmckpt: python3?[\d.]* was killed by signal 9 \(SIGKILL\); the last "
                        rf"committed checkpoint is {last}", said), said


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_without_userfaultfd_permission_the_cause_and_fix_are_said():
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "0":
        pytest.skip("unprivileged userfaultfd is allowed here")
    home = Path(tempfile.mkdtemp(prefix="vmckpt-nobody-"))
    # A program with shared RAM that nobody can run (the venv's python may live under /root).
    shared_ram = ("import mmap, os, time; fd = os.memfd_create('ram'); os.ftruncate(fd, 8 << 20);"
                  " m = mmap.mmap(fd, 8 << 20); time.sleep(20)")
    try:
        home.chmod(0o755)
        os.chown(home, 65534, 65534)
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", VMCKPT, "run",
             "--store", str(home / "store"), "--attach-timeout", "5s", "--min-ram", "4M",
             "--", "/usr/bin/python3", "-c", shared_ram],
            capture_output=True, text=True, timeout=120, cwd=home)
    finally:
        shutil.rmtree(home)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "vmckpt: userfaultfd is not permitted for this user (uid 65534) "
        "(vm.unprivileged_userfaultfd is 0): run vmckpt as root, or allow it with sysctl "
        "vm.unprivileged_userfaultfd=1"], r.stderr


@pytest.mark.parametrize("moment", ["vmckpt: pausing", "vmckpt: checkpoint"])
def test_qemu_killed_by_sigkill_is_said_with_the_last_checkpoint(tmp_path, moment):
    """Killed inside a pause too (its QMP connection breaks a moment before it is a zombie)."""
    store, pidfile = tmp_path / "store", tmp_path / "qemu.pid"
    proc = subprocess.Popen(
        [VMCKPT, "-v", "run", "--store", str(store), "--interval", "0.2s", "--",
         *qemu_argv(mem="128M", serial="none"), "-pidfile", str(pidfile)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr
        lines: list[str] = []
        for line in proc.stderr:  # the third such moment after checkpoint 2
            lines.append(line)
            since = "".join(lines).partition("vmckpt: checkpoint 2:")[2]
            if sum(x.startswith(moment) for x in since.splitlines()[1:]) >= 3:
                break
        else:
            pytest.fail("".join(lines))
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        rest = proc.stderr.read()
        assert proc.wait(60) == 128 + signal.SIGKILL, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in rest and "Connection reset" not in rest, rest
    last = max(c["id"] for c in json.loads(vmckpt("ls", "--store", str(store), "--json").stdout))
    assert rest.strip().splitlines()[-1] == (
        "vmckpt: qemu-system-x86_64 was killed by signal 9 (SIGKILL); the last committed "
        f"checkpoint is {last}"), rest
