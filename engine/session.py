"""`vmckpt run` for a plain program: start it with the preload library and checkpoint it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmckpt.engine.control import ControlServer
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.handoff import (
    MIN_BYTES_ENV,
    SOCKET_ENV,
    GuestRam,
    HandoffListener,
    preload_path,
)
from vmckpt.engine.qemu.argv import add_memory_backend as add_memory_backend_to
from vmckpt.engine.qemu.argv import find_ram_backend, is_qemu, qemu_uses_terminal, with_qmp
from vmckpt.engine.qemu.qmp import Qmp
from vmckpt.engine.qemu.ram import machine_ram
from vmckpt.engine.qemu.target import QemuTarget
from vmckpt.engine.targets import ProcessTarget, Target, TargetGone
from vmckpt.engine.targets.base import pid_alive
from vmckpt.engine.tracker import Tracker
from vmckpt.engine.uffd_access import userfaultfd_problem
from vmckpt.storage import PageStore, StoreError

log = logging.getLogger("vmckpt")


class AttachError(Exception):
    """The program never handed over guest RAM."""


def preload_env(socket_path: str | os.PathLike[str], min_ram: int) -> dict[str, str]:
    """The environment that makes a program hand its guest RAM to an engine at socket_path."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(preload_path()), env.get("LD_PRELOAD")]))
    env[SOCKET_ENV] = str(socket_path)
    env[MIN_BYTES_ENV] = str(min_ram)
    return env


async def attach(listener: HandoffListener, proc: asyncio.subprocess.Process,
                 timeout: float, min_ram: int) -> GuestRam:
    """Waits for the handoff; fails clearly if the program exits or never maps guest RAM."""
    accept = asyncio.ensure_future(listener.accept())
    exited = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait({accept, exited}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if accept in done:
        exited.cancel()
        return accept.result()
    accept.cancel()
    exited.cancel()
    if cause := userfaultfd_problem():  # the preload library could not even start
        raise AttachError(cause)
    if exited in done:
        raise AttachError(f"the program exited (status {proc.returncode}) before it mapped "
                          "shared guest RAM")
    raise AttachError(
        f"the program mapped no shared guest RAM within {timeout:g} s: vmckpt tracks a "
        f"MAP_SHARED mapping of at least {min_ram >> 20} MiB of a memfd or a file under "
        "/dev/shm (QEMU: -object memory-backend-memfd,id=mem0,size=...,share=on "
        "-machine memory-backend=mem0)")


def uses_terminal(argv: Sequence[str], stdin: int | None) -> bool:
    """Whether the program may use vmckpt's terminal. One that does not is started in its own
    session: a Ctrl-C in the terminal then reaches vmckpt only, which commits the checkpoint
    in flight and stops the program (or leaves it running, --detach-on-exit); QEMU would
    otherwise end on that SIGINT itself, in the middle of it. One that does stays in the
    terminal's foreground group, where it may read and set the terminal."""
    if is_qemu(argv):
        return qemu_uses_terminal(argv)
    return os.isatty(0 if stdin is None else stdin)


async def launch(argv: Sequence[str], sock: Path, *, attach_timeout: float = 30.0,
                 min_ram: int = 32 << 20, stdin: int | None = None,
                 stdout: int | None = None, stderr: int | None = None,
                 ) -> tuple[asyncio.subprocess.Process, GuestRam, HandoffListener]:
    """Starts argv with the preload library and waits for its guest RAM."""
    listener = HandoffListener(sock)
    proc = await asyncio.create_subprocess_exec(
        *argv, env=preload_env(sock, min_ram), stdin=stdin, stdout=stdout, stderr=stderr,
        start_new_session=not uses_terminal(argv, stdin))  # (uvloop has no process_group)
    try:
        ram = await attach(listener, proc, attach_timeout, min_ram)
    except AttachError:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        listener.close()
        raise
    return proc, ram, listener


async def attach_qemu(listener: HandoffListener, first: GuestRam, qmp_path: Path, pid: int, *,
                      name: str, argv: Sequence[str] | None, timeout: float = 30.0,
                      disks: bool = True) -> tuple[GuestRam, QemuTarget]:
    """QEMU's monitor answers only once every memory backend is mapped and handed over: the
    regions taken by then must be exactly the machine's RAM (engine/qemu/ram.py). Returns it
    and the target; closes everything it was given if it fails."""
    handed = [first]
    qmp = None
    try:
        qmp = await Qmp.connect(qmp_path, timeout=timeout, pid=pid)
        handed += listener.refuse("vmckpt tracks one RAM region, the machine's")
        ram = await machine_ram(qmp, handed)
        return ram, await QemuTarget.on(qmp, qmp_path, pid, ram.length, name=name, argv=argv,
                                        disks=disks)
    except BaseException:
        for region in handed:
            region.close()
        if qmp:
            await qmp.close()
        raise


@dataclass
class TrackedProgram:
    """A program started with the preload library, its guest RAM under a tracker. QEMU (by
    its name) becomes a QEMU target behind the engine's own QMP monitor; anything else a
    process target."""

    proc: asyncio.subprocess.Process | None  # None: started by someone else (serve)
    target: Target
    tracker: Tracker
    listener: HandoffListener
    pid: int

    @classmethod
    async def start(cls, argv: Sequence[str], sock: Path, *, copiers: int | None = None,
                    buffer_bytes: int = 64 << 20, tracking: str = "wp", priority: bool = False,
                    attach_timeout: float = 30.0, disks: bool = True,
                    min_ram: int = 32 << 20, add_memory_backend: bool = False,
                    stdin: int | None = None, stdout: int | None = None,
                    stderr: int | None = None) -> TrackedProgram:
        qmp_path = sock.with_name(sock.stem + "-qmp.sock")
        name = Path(argv[0]).name
        recorded = list(argv)  # in the records: without the engine's own monitor
        if is_qemu(argv):
            if add_memory_backend:
                recorded = add_memory_backend_to(argv)
            find_ram_backend(recorded)  # refuses what cannot be tracked before QEMU starts
            argv = with_qmp(recorded, qmp_path)
        proc, ram, listener = await launch(argv, sock, attach_timeout=attach_timeout,
                                           min_ram=min_ram, stdin=stdin, stdout=stdout,
                                           stderr=stderr)
        target: Target | None = None
        tracker = None
        try:
            if is_qemu(argv):
                ram, target = await attach_qemu(listener, ram, qmp_path, proc.pid, name=name,
                                                argv=recorded, timeout=attach_timeout,
                                                disks=disks)
            else:
                target = ProcessTarget(proc.pid, name=name, argv=recorded)
            tracker = Tracker(ram, copiers=copiers, buffer_bytes=buffer_bytes,
                              tracking=tracking, priority=priority)
        except BaseException:
            ram.close()
            if target:
                await target.close()
            listener.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return cls(proc, target, tracker, listener, proc.pid)

    async def wait_exit(self) -> int:
        """The program's exit status (0 for one that is not our child)."""
        if self.proc:
            return await self.proc.wait()
        while pid_alive(self.pid):
            await asyncio.sleep(0.2)
        return 0

    async def untrack(self) -> None:
        """Hands the program back: it runs on untracked."""
        self.tracker.close()
        await self.target.close()
        self.listener.close()

    async def close(self) -> None:
        """Untracks and kills the program (tests and benchmarks)."""
        await self.untrack()
        if self.proc:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            await self.proc.wait()

    async def __aenter__(self) -> TrackedProgram:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def run_program(argv: Sequence[str], store: PageStore, options: EngineOptions, *,
                      attach_timeout: float = 30.0, min_ram: int = 32 << 20,
                      add_memory_backend: bool = False, **how: Any) -> int:
    """Starts argv under checkpointing (see checkpoint_program for the rest)."""
    with tempfile.TemporaryDirectory(prefix="vmckpt-") as tmp:
        prog = await TrackedProgram.start(argv, Path(tmp) / "engine.sock",
                                          copiers=options.copiers,
                                          buffer_bytes=options.buffer_bytes,
                                          tracking=options.tracking,
                                          priority=options.priority, disks=options.disks,
                                          attach_timeout=attach_timeout, min_ram=min_ram,
                                          add_memory_backend=add_memory_backend)
        return await checkpoint_program(prog, store, options, **how)


async def checkpoint_program(prog: TrackedProgram, store: PageStore, options: EngineOptions,
                             *, parent: int | None = None, detach_on_exit: bool = False,
                             max_checkpoints: int | None = None,
                             stop: asyncio.Event | None = None,
                             on_engine: Callable[[Engine], None] | None = None) -> int:
    """Checkpoints prog every interval until it exits, stop is set, SIGINT/SIGTERM, or
    max_checkpoints; the checkpoint in flight is always committed whole. Returns the program's
    exit status: it is stopped at the end unless detach_on_exit (then 0, left running); one
    that is not our child is always left running. If the engine fails, the program is ended
    the same way before the error is raised: no VM is left behind without its terminal; but
    never because the store failed (the engine gave up on a full store, or a StoreError): it
    is left running untracked. While
    it runs, `vmckpt prune` and `vmckpt gc` reach it on the store's control socket."""
    stop = stop or asyncio.Event()
    refuse = asyncio.ensure_future(prog.listener.refuse_more("vmckpt tracks one RAM region"))
    engine = Engine(prog.target, prog.tracker, store, options, parent=parent)
    if on_engine:
        on_engine(engine)
    control = await ControlServer.start(store, lambda: engine.parent)
    exited = asyncio.ensure_future(prog.wait_exit())
    exited.add_done_callback(lambda _: stop.set())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    target_gone = False
    try:
        await engine.run(stop, max_checkpoints)
    except TargetGone:
        target_gone = True
    except StoreError:
        detach_on_exit = True
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        refuse.cancel()
        if control:
            await control.close()
        await prog.untrack()  # the program runs on untracked from here
        gone = not prog.proc and (target_gone or exited.done() and not exited.cancelled())
        status = await _let_go(prog, exited, detach_on_exit or engine.gave_up)
    if gone:  # not our child: how it ended (exit, kill -9) is its parent's to know
        last = (f"the last committed checkpoint is {engine.parent}" if engine.committed
                else "no checkpoint was committed in this run")
        log.warning("%s (pid %d) has gone; %s", prog.target.name, prog.pid, last)
    return status


async def _let_go(prog: TrackedProgram, exited: asyncio.Future[int], detach: bool) -> int:
    """Leaves the untracked program running (detach, or not our child: status 0) or stops it
    and returns its exit status."""
    if (detach or not prog.proc) and not exited.done():
        exited.cancel()
        return 0
    if prog.proc and not exited.done():
        with contextlib.suppress(ProcessLookupError):  # it may be exiting on its own
            prog.proc.terminate()
        status = await exited
        return 0 if status == -signal.SIGTERM else status  # it ended as we asked
    return await exited


async def serve(socket_path: Path, qmp_path: Path, store: PageStore, options: EngineOptions,
                **how: Any) -> int:
    """Checkpoints a QEMU started by someone else with the preload library pointed at
    socket_path and a QMP monitor at qmp_path; QEMU is left running when this stops."""
    listener = HandoffListener(socket_path)
    target: QemuTarget | None = None
    try:
        log.info("waiting for QEMU's guest RAM on %s", socket_path)
        ram = await listener.accept()
        try:
            cmdline = Path(f"/proc/{ram.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            cmdline = []
        argv = [a.decode(errors="replace") for a in cmdline]
        ram, target = await attach_qemu(listener, ram, qmp_path, ram.pid,
                                        name=Path(argv[0]).name if argv else "qemu", argv=argv,
                                        disks=options.disks)
        tracker = Tracker(ram, copiers=options.copiers, buffer_bytes=options.buffer_bytes,
                          tracking=options.tracking, priority=options.priority)
    except BaseException:
        if target:
            ram.close()
            await target.close()
        listener.close()
        raise
    log.info("tracking QEMU pid %d: %d MiB of guest RAM", ram.pid, ram.length >> 20)
    prog = TrackedProgram(None, target, tracker, listener, ram.pid)
    return await checkpoint_program(prog, store, options, **how)
