"""A target that exits while the engine holds its RAM is gone for the cycle, whichever tracker
call finds it out: the run ends with what it committed, not with a tracker error."""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE

import pytest
from vmckpt.engine.session import TrackedProgram
from vmckpt.engine.targets.base import TargetGone
from vmckpt.lab.synthguest import command as synth


def test_hybrid_switch_back_after_the_program_exited_says_target_gone(tmp_path):
    # As when a program ends (the synthetic guest's --duration) between a hybrid checkpoint's
    # drain and its switch back to async tracking: the kernel cannot register the range again
    # in a process whose memory is gone (ENOMEM; was a TrackerError that ended the run).
    async def run() -> None:
        async with await TrackedProgram.start(
                synth("--size", "16M", "--fill", "1", "--control"), tmp_path / "s.sock",
                tracking="hybrid", min_ram=4 << 20, stdin=PIPE, stdout=PIPE) as prog:
            assert prog.proc and prog.proc.stdout
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            await prog.target.pause()
            prog.tracker.arm()  # onto the sync uffd: every page owed
            await prog.target.resume()
            prog.tracker.release()
            while prog.tracker.collect() is not None:
                pass
            prog.proc.kill()
            await prog.proc.wait()
            with pytest.raises(TargetGone):
                prog.tracker.to_async()

    asyncio.run(run())
