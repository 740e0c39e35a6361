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

from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.handoff import (
    MIN_BYTES_ENV,
    SOCKET_ENV,
    GuestRam,
    HandoffListener,
    preload_path,
)
from vmckpt.engine.targets import ProcessTarget, TargetGone
from vmckpt.engine.tracker import Tracker
from vmckpt.storage import PageStore

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
    if exited in done:
        raise AttachError(f"the program exited (status {proc.returncode}) before it mapped "
                          "shared guest RAM")
    raise AttachError(
        f"the program mapped no shared guest RAM within {timeout:g} s: vmckpt tracks a "
        f"MAP_SHARED mapping of at least {min_ram >> 20} MiB of a memfd or a file under "
        "/dev/shm (QEMU: -object memory-backend-memfd,id=mem0,size=...,share=on "
        "-machine memory-backend=mem0)")


async def launch(argv: Sequence[str], sock: Path, *, attach_timeout: float = 30.0,
                 min_ram: int = 32 << 20, stdin: int | None = None,
                 stdout: int | None = None) -> tuple[asyncio.subprocess.Process, GuestRam,
                                                     HandoffListener]:
    """Starts argv with the preload library and waits for its guest RAM."""
    listener = HandoffListener(sock)
    proc = await asyncio.create_subprocess_exec(*argv, env=preload_env(sock, min_ram),
                                                stdin=stdin, stdout=stdout)
    try:
        ram = await attach(listener, proc, attach_timeout, min_ram)
    except AttachError:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        listener.close()
        raise
    return proc, ram, listener


@dataclass
class TrackedProgram:
    """A program started with the preload library, its guest RAM under a tracker."""

    proc: asyncio.subprocess.Process
    target: ProcessTarget
    tracker: Tracker
    listener: HandoffListener

    @classmethod
    async def start(cls, argv: Sequence[str], sock: Path, *, copiers: int | None = None,
                    buffer_bytes: int = 64 << 20, attach_timeout: float = 30.0,
                    min_ram: int = 32 << 20, stdin: int | None = None,
                    stdout: int | None = None) -> TrackedProgram:
        proc, ram, listener = await launch(argv, sock, attach_timeout=attach_timeout,
                                           min_ram=min_ram, stdin=stdin, stdout=stdout)
        tracker = Tracker(ram, copiers=copiers, buffer_bytes=buffer_bytes)
        return cls(proc, ProcessTarget(proc.pid, name=Path(argv[0]).name), tracker, listener)

    def untrack(self) -> None:
        """Hands the program back: it runs on untracked."""
        self.tracker.close()
        self.target.close()
        self.listener.close()

    async def close(self) -> None:
        """Untracks and kills the program (tests and benchmarks)."""
        self.untrack()
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
                      detach_on_exit: bool = False, max_checkpoints: int | None = None,
                      stop: asyncio.Event | None = None,
                      on_engine: Callable[[Engine], None] | None = None) -> int:
    """Runs argv under checkpointing; returns the program's exit status (0 if left running)."""
    stop = stop or asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="vmckpt-") as tmp:
        prog = await TrackedProgram.start(argv, Path(tmp) / "engine.sock",
                                          copiers=options.copiers,
                                          buffer_bytes=options.buffer_bytes,
                                          attach_timeout=attach_timeout, min_ram=min_ram)
        proc = prog.proc
        refuse = asyncio.ensure_future(prog.listener.refuse_more("vmckpt tracks one RAM region"))
        engine = Engine(prog.target, prog.tracker, store, options)
        if on_engine:
            on_engine(engine)
        exited = asyncio.ensure_future(proc.wait())
        exited.add_done_callback(lambda _: stop.set())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await engine.run(stop, max_checkpoints)
        except TargetGone:
            pass
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            refuse.cancel()
            prog.untrack()  # the program runs on untracked from here
        if detach_on_exit and not exited.done():
            exited.cancel()
            return 0
        if not exited.done():
            proc.terminate()
        return await proc.wait()
