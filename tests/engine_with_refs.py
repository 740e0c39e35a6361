"""Runs the engine with guest RAM saved at every pause: the SHA-256 of guest RAM at a
checkpoint's pause is written to REFDIR/ID.sha256 once that checkpoint is committed as ID, and
the SHA-256 of each disk it captures (as the guest sees it, the guest stopped) to
REFDIR/ID.disks.json.

    engine_with_refs.py STORE REFDIR PROGRAM ARGS...   `vmckpt run`'s engine on PROGRAM
    engine_with_refs.py --cli REFDIR VMCKPT-ARGS...    the `vmckpt` command itself (run,
                                                       restore --checkpoint), hooks added

The crash tests kill this process with SIGKILL; the saved references tell what each
checkpoint that made it into the store must restore to. VMCKPT_TEST_INTERVAL sets the
engine's interval (seconds, default 0.05).

Test-only hold: with VMCKPT_TEST_HOLD=PHASE:N the engine stops at that point of the Nth
checkpoint of this run (its id in a fresh store), after printing `HELD PHASE N`, so that a
kill or a signal lands exactly there:
  pre-arm    in its pre-arm's drain (the guest running, before its pause), at its first batch
  pause      inside the pause (the target stopped, RAM saved as the reference)
  drain      in the drain (its pre-arm's or its own), at its first batch into the store
  disk-drain in its disks' drain (beside the RAM's, after the pause), at its first batch
  commit     drained, at the commit, before its record is written
  committed  after the commit returned
A drain or pre-arm hold waits at the first one from checkpoint N on (a checkpoint may copy
nothing). It waits for good (until the test's SIGKILL), or, with VMCKPT_TEST_RELEASE=FD,
until a line arrives on that file descriptor (a test sends Ctrl-C, then lets it go on).
With VMCKPT_TEST_HOLD_ON_SIGNAL=1, N counts from the first pause after SIGUSR1 (a QEMU guest
is held once it has booted, however long its boot took).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.qemu.disk_drain import THREADS as DISK_DRAIN_THREADS

PHASES = ("pause", "drain", "commit", "committed")  # where the crash test kills
HOLDS = ("pre-arm", "disk-drain", *PHASES)


class Holding:
    """The engine's store, holding at the drain or commit of the checkpoint hold() names,
    and naming each committed checkpoint's reference by its id."""

    def __init__(self, store: Any, hold: Any, refdir: Path) -> None:
        self._store, self._hold, self._refdir = store, hold, refdir
        self.committed = 0  # checkpoints of this run
        self.paused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_pages(self, *args: Any) -> Any:
        # The first batch of checkpoint N's pages, in its pre-arm or after its pause, whichever
        # comes first: a pause whose drain finds nothing left (a starved guest) cannot skip it.
        if self.paused == self.committed:  # its pause is still to come
            self._hold("pre-arm", self.committed + 1)
        if threading.current_thread().name.startswith(DISK_DRAIN_THREADS):
            self._hold("disk-drain", self.committed + 1)
        else:
            self._hold("drain", self.committed + 1)
        return self._store.put_pages(*args)

    def commit_checkpoint(self, *args: Any) -> int:
        self._hold("commit", self.committed + 1)
        ckpt = self._store.commit_checkpoint(*args)
        self.committed += 1
        os.rename(self._refdir / ".pending", self._refdir / f"{ckpt}.sha256")
        os.rename(self._refdir / ".pending-disks", self._refdir / f"{ckpt}.disks.json")
        self._hold("committed", self.committed)
        return ckpt


def hooks(refdir: Path, hold: Callable[[str, int], None] | None = None
          ) -> Callable[[Engine], None]:
    """The on_engine hook that saves references and calls hold(phase, n) at each point of the
    cycle (see Holding); by default, holds where VMCKPT_TEST_HOLD says."""
    hold = hold or env_hold()

    def install(engine: Engine) -> None:
        store = Holding(engine.store, hold, refdir)

        def save(engine: Engine) -> None:
            store.paused += 1
            (refdir / ".pending").write_text(hashlib.sha256(engine.tracker.ram_view()).hexdigest())
            (refdir / ".pending-disks").write_text(json.dumps({
                d["device"]: disk_digest(d, refdir) for d in engine.target.disks
                if not d["file"].startswith("json:")}))
            hold("pause", store.paused)

        engine.on_paused = save
        engine.store = store  # type: ignore[assignment]

    return install


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def disk_digest(disk: dict, tmp: Path) -> str:
    """The SHA-256 of a disk's guest-visible bytes: a raw file itself, anything else as
    qemu-img reads it (-U: QEMU holds the image)."""
    if disk["format"] == "raw":
        return file_digest(disk["file"])
    flat = tmp / ".flat"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", disk["file"], str(flat)],
                   check=True)
    try:
        return file_digest(flat)
    finally:
        flat.unlink()


def env_hold() -> Callable[[str, int], None]:
    phase, _, n = os.environ.get("VMCKPT_TEST_HOLD", ":0").partition(":")
    assert phase in HOLDS or not phase, phase
    release = os.environ.get("VMCKPT_TEST_RELEASE")
    held = threading.Event()
    paused, base = 0, None if os.environ.get("VMCKPT_TEST_HOLD_ON_SIGNAL") else 0

    def arm(*_: object) -> None:
        nonlocal base
        base = paused if base is None else base

    signal.signal(signal.SIGUSR1, arm)

    def hold(at: str, ckpt: int) -> None:
        nonlocal paused
        paused = max(paused, ckpt) if at == "pause" else paused
        # A drain from checkpoint n on: a checkpoint may copy nothing at all (the guest has not
        # started writing yet), and its drain then never reaches the store. HELD says which.
        if held.is_set() or base is None or at != phase:
            return
        if not (ckpt == base + int(n) or at in ("drain", "disk-drain", "pre-arm")
                and ckpt > base + int(n)):
            return
        held.set()  # once: a drain puts many batches
        print(f"HELD {at} {ckpt}", flush=True)
        if release is None:
            threading.Event().wait()  # until the test's SIGKILL
        else:
            with open(int(release), "rb", buffering=0, closefd=False) as f:
                f.readline()

    return hold


def run_engine(store_path: Path, refdir: Path, argv: list[str]) -> None:
    from vmckpt.engine.session import run_program
    from vmckpt.storage import open_store

    async def go() -> None:
        with open_store(store_path, create=True) as store:
            print("STARTED", flush=True)
            interval = float(os.environ.get("VMCKPT_TEST_INTERVAL", "0.05"))
            await run_program(argv, store, EngineOptions(interval=interval, copiers=2),
                              on_engine=hooks(refdir), min_ram=4 << 20, detach_on_exit=True)

    asyncio.run(go())


def run_cli(refdir: Path, args: list[str]) -> None:
    """The vmckpt command, every engine it makes hooked (restore --checkpoint's too)."""
    import vmckpt.engine.session as session
    from vmckpt.cli.main import main as vmckpt

    install = hooks(refdir)

    class Hooked(session.Engine):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            install(self)

    session.Engine = Hooked  # type: ignore[misc]
    vmckpt(args, prog_name="vmckpt")


def main() -> None:
    if sys.argv[1] == "--cli":
        run_cli(Path(sys.argv[2]), sys.argv[3:])
    else:
        run_engine(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------ the test's side

HERE = Path(__file__).parent


class HookedCli:
    """`vmckpt ARGS...` run by this harness: its references in refdir, its -v log lines in
    lines, and a hold (PHASE:N) that held() waits for and release() lets go on."""

    def __init__(self, refdir: Path, *args: str, hold: str | None = None) -> None:
        refdir.mkdir(parents=True, exist_ok=True)
        self.refdir = refdir
        self.lines: list[str] = []
        self._held: queue.Queue[tuple[str, int]] = queue.Queue()
        read_end, self._release = os.pipe()
        env = dict(os.environ)
        if hold:
            env.update(VMCKPT_TEST_HOLD=hold, VMCKPT_TEST_RELEASE=str(read_end))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "engine_with_refs.py"),
                                      "--cli", str(refdir), *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=(read_end,), start_new_session=True)
        os.close(read_end)
        self._readers = [threading.Thread(target=self._read, args=(f, on), daemon=True)
                         for f, on in ((self.proc.stdout, self._on_out),
                                       (self.proc.stderr, self.lines.append))]
        for t in self._readers:
            t.start()

    def _read(self, f: Any, on: Any) -> None:
        for line in f:
            on(line)

    def _on_out(self, line: str) -> None:
        if line.startswith("HELD "):  # the guest may write here too
            _, at, n = line.split()
            self._held.put((at, int(n)))

    def held(self, timeout: float = 120) -> tuple[str, int]:
        """The phase and checkpoint the engine holds at, once it does."""
        try:
            return self._held.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the engine did not hold: {''.join(self.lines)}") from None

    def ctrl_c(self) -> None:
        """SIGINT as a terminal's Ctrl-C sends it: to every process of the foreground group
        (vmckpt's; it leads its own here), the program it runs too if that is in it."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def release(self) -> None:
        os.write(self._release, b"go\n")

    def wait(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            os.close(self._release)
        for t in self._readers:
            t.join(10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def ref(self, ckpt: int) -> str:
        """The SHA-256 (hex) of guest RAM at the pause of checkpoint ckpt."""
        return (self.refdir / f"{ckpt}.sha256").read_text()

    def disk_refs(self, ckpt: int) -> dict[str, str]:
        """The SHA-256 (hex) of each disk at the pause of checkpoint ckpt, by device."""
        return json.loads((self.refdir / f"{ckpt}.disks.json").read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def image_digest(store: Path, ckpt: int, tmp: Path, disk: str | None = None) -> str:
    """The SHA-256 (hex) of checkpoint ckpt's restored RAM image (or of one disk)."""
    from vmckpt.storage import open_store, restore_image

    with open_store(store, readonly=True) as s:
        restore_image(s, ckpt, tmp / "digest.img", progress=False, disk=disk)
    try:
        return file_digest(tmp / "digest.img")
    finally:
        (tmp / "digest.img").unlink()
