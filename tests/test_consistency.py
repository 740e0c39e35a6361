"""Target 1: every checkpoint restores to exactly the guest RAM at its pause instant."""

from __future__ import annotations

import asyncio
from asyncio.subprocess import PIPE

import pytest
from conftest import run_with_references
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import TrackedProgram
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store, restore_image


def check_all(store_path, refs, tmp_path) -> None:
    with open_store(store_path, readonly=True) as store:
        records = store.list_checkpoints()
        assert len(records) == len(refs)
        for rec, ref in zip(records, refs, strict=True):
            image = tmp_path / "img"
            restore_image(store, rec["id"], image)
            got = image.read_bytes()
            assert got == ref, f"checkpoint {rec['id']} differs from guest RAM at its pause"


RACING = ("--size", "32M", "--fill", "0.3", "--rate", "0", "--pattern", "uniform", "--dup",
          "0.2", "--zero", "0.1", "--partial", "0.4", "--seed", "7")


@pytest.mark.parametrize("tracking", ["wp", "async", "hybrid"])
def test_consistency_random_writes_racing_the_copiers(store_path, tmp_path, tracking):
    # Fast, mixed writes (partial, duplicate, zero, fresh pages in never-touched holes) while
    # one copier with a small buffer drains. No pre-arm (hybrid has none).
    store = store_path
    refs = run_with_references(
        store, synth(*RACING), checkpoints=50, options=EngineOptions(
            interval=0.02, copiers=1, buffer_bytes=1 << 20, tracking=tracking, pre_arm=0.0))
    check_all(store, refs, tmp_path)
    if tracking == "hybrid":
        check_hybrid(store)


@pytest.mark.parametrize("tracking", ["wp", "async"])
def test_consistency_random_writes_racing_the_copiers_pre_armed(tmp_path, tracking):
    # The same race with a pre-arm before every pause from the third on (the first two set
    # tracking up): the test itself pre-arms, lets the guest write for LEAD, then pauses, so
    # that no load on the machine can leave a checkpoint without its pre-arm.
    lead, refs = 0.05, []

    async def go() -> list[dict]:
        async with await TrackedProgram.start(
                synth(*RACING), tmp_path / "s.sock", copiers=1, buffer_bytes=1 << 20,
                tracking=tracking, min_ram=4 << 20) as prog:
            with open_store(tmp_path / "store", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store,
                                EngineOptions(copiers=1, buffer_bytes=1 << 20,
                                              tracking=tracking, pre_arm=lead),
                                on_paused=lambda e: refs.append(bytes(e.tracker.ram_view())))
                records = []
                for _ in range(30):
                    await engine.pre_arm()  # a no-op before the third checkpoint
                    await asyncio.sleep(lead)  # the guest writes between pre-arm and pause
                    records.append(await engine.checkpoint())
                return records

    records = asyncio.run(go())
    check_all(tmp_path / "store", refs, tmp_path)
    assert [r["pre_armed"]["pages"] > 0 for r in records] == [False] * 2 + [True] * 28
    # Pages written after the pre-arm were taken again at the pause (copied in it, or
    # write-protected by it and then copied).
    taken = [r["copied_in_pause"] + r["cow_copies"] + r["copier_copies"] for r in records[2:]]
    assert sum(t > 0 for t in taken) > len(taken) // 2, taken


def check_hybrid(store_path, min_cow: int = 1) -> None:
    """Hybrid really switched: every checkpoint's drain ended in a switch pause back to async,
    and the checkpoints after the first (armed from an async scan) drained copy-on-write."""
    with open_store(store_path, readonly=True) as store:
        records = store.list_checkpoints()
    assert all(r["strategy"]["tracking"] == "hybrid" for r in records)
    assert all(r["switch_pause"] and 0 < r["switch_move"] < r["switch_pause"] for r in records)
    later = records[1:]
    assert sum(r["cow_copies"] for r in later) >= min_cow, [r["cow_copies"] for r in later]
    assert all(r["copied_in_pause"] == 0 for r in later)  # no stop-and-copy, unlike async


def test_writes_during_the_drain_take_copy_on_write(tmp_path):
    # 16,384 owed pages and 4,000 writes queued during the pause; the copier is released only
    # once the guest has made them all (after resume, before release), so every write to a
    # page still owed must have been copied by the fault thread before it went through, on
    # any machine load. The buffer holds those copies: nothing is collected until release.
    refs: list[bytes] = []

    def paused(engine: Engine, then: bytes = b"") -> None:
        refs.append(bytes(engine.tracker.ram_view()))
        prog.proc.stdin.write(then)

    async def go() -> list[dict]:
        nonlocal prog
        async with await TrackedProgram.start(
                synth("--size", "64M", "--fill", "1", "--control", "--seed", "9"),
                tmp_path / "s.sock", copiers=1, buffer_bytes=32 << 20, min_ram=4 << 20,
                stdin=PIPE, stdout=PIPE) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            with open_store(tmp_path / "store", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store, EngineOptions(copiers=1),
                                on_paused=lambda e: paused(e, b"r 4000 1\n"))
                resume = prog.target.resume

                async def resume_until_written() -> None:
                    await resume()
                    assert (await prog.proc.stdout.readline()).strip() == b"ok"

                prog.target.resume = resume_until_written  # type: ignore[method-assign]
                first = await engine.checkpoint()
                prog.target.resume = resume  # type: ignore[method-assign]
                engine.on_paused = paused
                return [first, await engine.checkpoint()]

    prog: TrackedProgram
    first, second = asyncio.run(go())
    # 4,000 random writes over 16,384 owed pages: ~3,500 distinct pages, each copied on its
    # fault (none by the copier, which had not started).
    assert first["cow_copies"] > 3000, first
    assert second["pages_dirtied"] >= 3000, second
    check_all(tmp_path / "store", refs, tmp_path)


@pytest.mark.parametrize("tracking", ["wp", "async", "hybrid"])
@pytest.mark.parametrize("pattern", ["hot", "seq"])
def test_consistency_patterns(tmp_path, pattern, tracking):
    store = tmp_path / "store"
    refs = run_with_references(
        store, synth("--size", "32M", "--fill", "0.5", "--rate", "50000", "--pattern", pattern,
                     "--partial", "0.5", "--seed", "3"), checkpoints=20,
        options=EngineOptions(interval=0.05, tracking=tracking))
    check_all(store, refs, tmp_path)


@pytest.mark.parametrize("tracking", ["wp", "async", "hybrid"])
def test_consistency_hugetlb(tmp_path, hugepages, tracking):
    store = tmp_path / "store"
    refs = run_with_references(
        store, synth("--size", "64M", "--hugetlb", "--fill", "0.5", "--rate", "20000",
                     "--partial", "0.5", "--seed", "5"), checkpoints=10,
        options=EngineOptions(interval=0.05, tracking=tracking))
    check_all(store, refs, tmp_path)


@pytest.mark.parametrize("tracking", ["wp", "async"])
def test_consistency_with_pre_arm(tmp_path, tracking):
    # The engine's own cycle pre-arms 0.15 s before each pause, the guest writing all
    # along: pages written between the pre-arm and the pause must be taken again, at their
    # pause content. The guest writes little enough that each drain leaves the cycle time for
    # the pre-arm (a stretched interval leaves none, and the record's slack says so).
    store, lead = tmp_path / "store", 0.15
    refs = run_with_references(
        store, synth("--size", "32M", "--fill", "0.3", "--rate", "5000", "--pattern", "hot",
                     "--partial", "0.4", "--dup", "0.2", "--zero", "0.1", "--seed", "11"),
        checkpoints=20, options=EngineOptions(interval=0.4, pre_arm=lead, tracking=tracking))
    check_all(store, refs, tmp_path)
    with open_store(store, readonly=True) as s:
        records = s.list_checkpoints()[2:]  # the first two set tracking up
    # Pre-armed exactly when the previous commit left more than the lead before the pause.
    assert [r["pre_armed"]["seconds"] > 0 for r in records] == \
        [r["interval_slack"] > lead for r in records], records
    assert sum(r["pre_armed"]["pages"] > 0 for r in records) >= 12, records
