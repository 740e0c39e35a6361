"""Races between the copiers, the fault thread and the next arm, under stress."""

from __future__ import annotations

import asyncio
import os
import time
from asyncio.subprocess import PIPE

from test_consistency import check_all
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

# More copiers than cores and the smallest pool: copiers keep parking for pool space, and a
# parked one may wake only once the next arm has begun.
STRESS = {"copiers": 6, "buffer_bytes": 1}


def test_back_to_back_arms_with_parked_copiers_always_drain(tmp_path):
    # Arms with the guest running (as a pre-arm does), each drained by a collector that stores
    # nothing, so the next arm follows the drain within microseconds. A copier that woke in
    # that window used to claim units of the new owed set: the drain never ended.
    async def go() -> int:  # times copiers parked for pool space, the race's condition
        async with await TrackedProgram.start(
                synth("--size", "16M", "--fill", "1", "--rate", "0", "--seed", "1"),
                tmp_path / "s.sock", min_ram=4 << 20, stdout=PIPE, **STRESS) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")  # RAM filled
            before = prog.tracker.counters()
            for _ in range(500):
                prog.tracker.arm()
                prog.tracker.release()
                time.sleep(0.01)  # the guest dirties more than the pool holds
                while prog.tracker.collect(stall=20) is not None:
                    pass
            return (prog.tracker.counters() - before).copier_waits

    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # copiers and collector on one CPU: wider windows
    try:
        assert asyncio.run(go()) > 500  # copiers did park, again and again
    finally:
        os.sched_setaffinity(0, cpus)


def test_pre_armed_checkpoints_racing_parked_copiers_are_exact(tmp_path):
    # The same race through the engine: checkpoints pre-armed with the guest writing fast (but
    # not faster than the store takes it); a unit claimed before its arm protected it would
    # lose a write.
    # The test pre-arms itself before every pause (a no-op for the first two, which set
    # tracking up) and lets the guest write between: no load on the machine skips a pre-arm.
    store, refs = tmp_path / "store", []

    async def go() -> list[dict]:
        async with await TrackedProgram.start(
                synth("--size", "16M", "--fill", "1", "--rate", "20000", "--partial", "0.4",
                      "--seed", "5"), tmp_path / "s.sock", min_ram=4 << 20, stdout=PIPE,
                **STRESS) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            with open_store(store, create=True) as s:
                engine = Engine(prog.target, prog.tracker, s,
                                EngineOptions(pre_arm=0.05, **STRESS),
                                on_paused=lambda e: refs.append(bytes(e.tracker.ram_view())))
                records = []
                for _ in range(30):
                    await engine.pre_arm()
                    await asyncio.sleep(0.05)
                    records.append(await engine.checkpoint())
                return records

    records = asyncio.run(go())
    check_all(store, refs, tmp_path)
    assert [r["pre_armed"]["pages"] > 0 for r in records] == [False] * 2 + [True] * 28
