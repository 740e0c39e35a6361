"""Issue 12 item 3: a store that cannot take more (here: its filesystem full) never ends the
guest. The checkpoint in flight is dropped whole; with --on-full stop the engine says so and
exits, the guest running on; with --on-full wait it resumes once there is space, and every
committed checkpoint restores bit-exact. Real runs: the store on a small tmpfs, as root."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from conftest import is_root
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.testguest import qemu_argv, ticks
from vmckpt.engine.session import TrackedProgram, checkpoint_program
from vmckpt.engine.targets.base import pid_alive
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store, restore_image

pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not is_root(), reason="mounts a tmpfs (needs root)")]

VMCKPT = [str(Path(sys.executable).with_name("vmckpt"))]
# Unique pages written unpaced over 32 MiB: a 48 MiB filesystem is full within seconds.
GUEST = ("--size", "32M", "--fill", "0.5", "--rate", "0", "--pattern", "uniform", "--seed", "3")


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs, unmounted at the end."""
    where = tmp_path / "fs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def report_lines(report: Path) -> int:
    return len(report.read_text().splitlines()) if report.exists() else 0


def wait_for_more(report: Path, seen: int, timeout: float = 60.0) -> None:
    """Waits until the guest reports another second of writing (it runs)."""
    deadline = time.monotonic() + timeout
    while report_lines(report) <= seen:
        assert time.monotonic() < deadline, "the guest stopped writing"
        time.sleep(0.1)


async def first_of(event: asyncio.Event, run: asyncio.Future,
                   also: asyncio.Event | None = None) -> None:
    """Waits for event (or also); if the run ends first, its error (or early end) fails the
    test."""
    seen = {asyncio.ensure_future(e.wait()) for e in (event, also) if e}
    await asyncio.wait({*seen, run}, timeout=300, return_when=asyncio.FIRST_COMPLETED)
    for w in seen:
        w.cancel()
    if run.done():
        pytest.fail(f"the run ended (status {run.result()}) before the engine said it")
    assert event.is_set() or (also and also.is_set()), "the engine never said it"


def check_store(store: Path) -> str:
    done = subprocess.run([*VMCKPT, "check", "--store", str(store)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_on_full_stop_leaves_the_guest_running(small_fs, tmp_path):
    store, report = small_fs / "store", tmp_path / "report"
    out, err = tmp_path / "out", tmp_path / "err"  # files: the guest keeps its copies open
    with out.open("w") as o, err.open("w") as e:
        engine = subprocess.Popen(
            [*VMCKPT, "run", "--store", str(store), "--interval", "50ms", "--on-full", "stop",
             "--min-ram", "4M", "--", *synth(*GUEST, "--report", str(report))],
            stdout=o, stderr=e)
    guest = None
    try:
        status = engine.wait(timeout=300)
        said = err.read_text()
        assert status == 0, said
        assert "Traceback" not in said, said
        full = [x for x in said.splitlines() if "cannot take more" in x]
        assert len(full) == 1, said
        assert "No space left on device" in full[0] and "the VM runs on" in full[0], full
        # The engine is gone; the guest goes on writing, untracked.
        guest = int(out.read_text().split()[1].removeprefix("pid="))
        assert pid_alive(guest)
        wait_for_more(report, report_lines(report))
        assert pid_alive(guest)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        if guest and pid_alive(guest):
            os.kill(guest, signal.SIGKILL)
    assert "sound" in check_store(store)
    with open_store(store, readonly=True) as s:
        assert s.list_checkpoints(), "the store filled before any checkpoint"


def last_tick(log: Path) -> int:
    found = ticks(log.read_bytes()) if log.exists() else []
    return found[-1][0] if found else 0


def qemu_pid(marker: str) -> int | None:
    """The QEMU whose command line holds marker (a path unique to the test)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and argv[0].endswith(b"qemu-system-x86_64") and \
                any(marker.encode() in a for a in argv):
            return int(proc.name)
    return None


def test_qemu_guest_runs_on_when_the_store_fills(small_fs, tmp_path):
    store, log = small_fs / "store", tmp_path / "serial.log"
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        engine = subprocess.Popen(
            [*VMCKPT, "run", "--store", str(store), "--interval", "500ms", "--on-full", "stop",
             "--", *qemu_argv(mem="128M", work="dirty", rate=5000, mb=48,
                              serial=f"file:{log}")], stdout=o, stderr=e)
    guest = None
    try:
        status = engine.wait(timeout=600)
        said = err.read_text()
        assert status == 0, said
        assert "Traceback" not in said, said
        assert len([x for x in said.splitlines() if "cannot take more" in x]) == 1, said
        guest = qemu_pid(str(log))
        assert guest and pid_alive(guest), said
        # The guest counts on, untracked: its serial counter goes past where it was.
        seen = last_tick(log)
        deadline = time.monotonic() + 120
        while last_tick(log) <= seen:
            assert time.monotonic() < deadline, "the guest stopped counting"
            time.sleep(0.2)
        assert pid_alive(guest)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        guest = guest or qemu_pid(str(log))
        if guest and pid_alive(guest):
            os.kill(guest, signal.SIGKILL)
    assert "sound" in check_store(store)


class _Seen(logging.Handler):
    """Sets an event when the engine logs a message containing some text."""

    def __init__(self, loop: asyncio.AbstractEventLoop, marks: dict[str, asyncio.Event]) -> None:
        super().__init__()
        self.loop, self.marks = loop, marks

    def emit(self, record: logging.LogRecord) -> None:
        for text, event in self.marks.items():
            if text in record.getMessage():
                self.loop.call_soon_threadsafe(event.set)


@pytest.mark.parametrize("tracking", ["wp", "async", "hybrid"])
def test_on_full_wait_resumes_once_there_is_space(small_fs, tmp_path, caplog, tracking):
    # The guest writes bursts of unique pages (8 MiB each) until a checkpoint is dropped, then
    # writes nothing more: the dropped checkpoint's pages must be in the next committed one.
    # A digest of guest RAM is taken at every pause, dropped ones included: a committed
    # checkpoint must restore to the last pause made with its parent as the engine's parent
    # (those before it with the same parent were dropped).
    store = small_fs / "store"
    refs: list[tuple[int | None, bytes]] = []

    def paused(e: Engine) -> None:
        refs.append((e.parent, hashlib.sha256(e.tracker.ram_view()).digest()))

    async def go() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        full, again, committed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        handler = _Seen(loop, {"cannot take more": full, "takes checkpoints again": again})
        logging.getLogger("vmckpt").addHandler(handler)
        engines: list[Engine] = []

        def hook(engine: Engine) -> None:
            engines.append(engine)
            engine.on_paused = paused
            engine.on_committed = lambda _: committed.set()

        stop = asyncio.Event()
        prog = await TrackedProgram.start(
            synth("--size", "32M", "--fill", "0.5", "--control", "--seed", "3"),
            small_fs / "e.sock", copiers=2, tracking=tracking, min_ram=4 << 20,
            stdin=PIPE, stdout=PIPE)

        async def say(command: str) -> None:
            prog.proc.stdin.write(command.encode() + b"\n")
            assert (await prog.proc.stdout.readline()).strip() == b"ok"

        try:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            with open_store(store, create=True) as s:
                run = asyncio.ensure_future(checkpoint_program(
                    prog, s, EngineOptions(interval=0.05, copiers=2, tracking=tracking),
                    stop=stop, on_engine=hook))
                burst = 0
                while not full.is_set():
                    assert burst < 40, "the store never filled"
                    committed.clear()
                    burst += 1
                    await say(f"r 2048 {burst}")
                    await first_of(committed, run, also=full)
                engine = engines[0]
                done = engine.committed
                # Full: the guest runs on (it answers, and writes a page), nothing commits.
                await say("w 0 12345")
                assert pid_alive(prog.pid) and not run.done()
                assert engine.committed == done
                remount(small_fs, "1g")
                await first_of(again, run)
                while engine.committed < done + 3:
                    committed.clear()
                    await first_of(committed, run)
                assert pid_alive(prog.pid)
                stop.set()
                status = await run
        finally:
            logging.getLogger("vmckpt").removeHandler(handler)
            if prog.proc.returncode is None:
                await prog.close()
        return status, done

    with caplog.at_level(logging.INFO, logger="vmckpt"):
        status, done = asyncio.run(go())
    assert status == 0  # alive until the run ended it (asserted above): ended as asked
    assert done >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot take more" in m for m in messages) == 1, messages
    assert sum("takes checkpoints again" in m for m in messages) == 1, messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    check_store(store)
    last_ref = dict(refs)  # parent -> the digest of its last pause
    with open_store(store, readonly=True) as s:
        records = s.list_checkpoints()
        assert len(records) >= done + 3
        for rec in records:
            image = tmp_path / "img"
            restore_image(s, rec["id"], image)
            got = hashlib.sha256(image.read_bytes()).digest()
            assert got == last_ref[rec["parent"]], f"checkpoint {rec['id']} differs"
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
