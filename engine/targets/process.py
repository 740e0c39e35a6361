"""A plain process as a target: SIGSTOP/SIGCONT, no state beyond its memory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from vmckpt.engine.targets.base import DiskCopied, TargetGone
from vmckpt.storage import PageStore


def _all_stopped(pid: int) -> bool:
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_bytes().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just exited
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


class ProcessTarget:
    """SIGSTOP is asynchronous: pause() waits until every thread of the process has stopped.

    A keeper process (a shell blocked on a pipe from us) sends SIGCONT if the engine dies, so a
    crash of the engine inside the pause never leaves the guest stopped. A process the user had
    stopped stays stopped: resume() and close() leave it as they found it.
    """

    kind = "process"
    # A plain process's files are its own business.
    uncaptured_disks: list[dict] = []
    disks: list[dict] = []
    skipped_disks: list[dict] = []
    device_state_via = None

    def __init__(self, pid: int, name: str | None = None, stop_timeout: float = 5.0,
                 argv: Sequence[str] | None = None) -> None:
        self.pid = pid
        self.name = name or Path(f"/proc/{pid}/comm").read_text().strip()
        self.argv = list(argv) if argv else None
        self.stop_timeout = stop_timeout
        self._paused = False  # stopped by pause(), not yet resumed
        # EOF (the engine died) continues the process; "leave" (a clean close) does not.
        self._keeper = subprocess.Popen(
            ["sh", "-c", 'trap "" INT TERM HUP; read how; [ "$how" = leave ] || '
             'kill -CONT "$0" 2>/dev/null', str(pid)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise TargetGone(f"process {self.pid} exited") from None

    async def pause(self, *, capture: bool = True) -> None:
        if _all_stopped(self.pid):
            return  # the user stopped it: nothing to pause, nor to resume
        self._signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + self.stop_timeout
        # Busy-wait: a stop takes tens of microseconds and every one of them is pause time.
        while not _all_stopped(self.pid):
            if not Path(f"/proc/{self.pid}").exists():
                raise TargetGone(f"process {self.pid} exited")
            if time.monotonic() > deadline:
                await self.resume()
                raise TimeoutError(f"process {self.pid} did not stop in {self.stop_timeout} s")

    async def extra_state(self) -> bytes | None:
        return None

    async def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._signal(signal.SIGCONT)

    async def settle(self) -> None:
        pass

    def disks_since_attach(self, incremental: bool) -> None:
        pass

    async def drain_disks(self, store: PageStore) -> list[DiskCopied]:
        return []

    async def release_disks(self, *, kept: bool) -> None:
        pass

    async def close(self) -> None:
        if self._keeper.stdin and not self._keeper.stdin.closed:
            try:
                if not self._paused:
                    self._keeper.stdin.write(b"leave\n")
                self._keeper.stdin.close()
            except BrokenPipeError:
                pass
        self._keeper.wait()
