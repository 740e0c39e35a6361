"""`vmckpt prune` and `vmckpt gc` through the real command, on stores made by real engine runs
of the synthetic guest: a store of 220 checkpoints pruned and collected exactly, gc and prune
forwarded to a running engine while it commits, the in-flight race made deterministic, and
the error paths."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import run_with_references
from engine_with_refs import hooks
from redis_cluster import contents as cluster_contents
from test_inspect import (
    VMCKPT,
    as_json,
    assert_one_line_error,
    close,
    held_open,
    ok,
    raw_db,
    run_synth,
    vmckpt,
)
from vmckpt.engine.cycle import EngineOptions
from vmckpt.engine.session import TrackedProgram, checkpoint_program
from vmckpt.lab.synthguest import command as synth
from vmckpt.lab.synthguest import seed_page
from vmckpt.storage import MapDelta, PageStore, open_store, restore_image
from vmckpt.storage.cluster import is_cluster_url
from vmckpt.storage.gc import referenced
from vmckpt.storage.inspect import device_ids, map_chain

CHECKPOINTS = 220
KEEP_LAST, KEEP_EVERY = 20, 10


def stored_ids(store: Path | str) -> set[bytes]:
    """The page ids in the store, read behind vmckpt's back (on a cluster: its scan)."""
    if is_cluster_url(store):
        with open_store(store, readonly=True) as s:
            return {pid for pid, _ in s.iter_pages()}
    db = raw_db(store, readonly=True)
    pages = db.get_column_family("pages")
    try:
        return set(pages.keys())
    finally:
        close(db, pages)


def contents(store: Path | str) -> str:
    """A digest of every key and value of every part of the store."""
    if is_cluster_url(store):
        return cluster_contents(store)
    db = raw_db(store, readonly=True)
    cfs = [db, *(db.get_column_family(c) for c in ("pages", "records", "maps"))]
    h = hashlib.sha256()
    for cf in cfs:
        for key, value in cf.items():
            h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    close(db, *cfs[1:])
    return h.hexdigest()


def needed(store: Path, ckpts: list[int] | None = None) -> set[bytes]:
    """The pages restoring the checkpoints (all by default) reads: computed from each one's
    whole map and device state, not the way gc marks."""
    with open_store(store, readonly=True) as s:
        found: set[bytes] = set()
        for rec in s.list_checkpoints():
            if ckpts is not None and rec["id"] not in ckpts:
                continue
            pmap = s.read_map(rec["id"])
            found.update(bytes(row) for row in pmap.ids[pmap.nonzero_pfns()])
            if rec.get("device_state"):
                found.update(bytes(r) for r in device_ids(rec, s.page_size) if r.any())
        return found


def leave_stale_socket(store: Path) -> None:
    """A control socket file nobody serves, as an engine killed with -9 leaves it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(store / "control.sock"))


def commit_next(s: PageStore, delta: MapDelta) -> int:
    """Commits a checkpoint on top of the newest one, as an engine would."""
    latest = s.get_record("latest")
    rec = {k: v for k, v in latest.items() if k not in ("id", "map")}
    return s.commit_checkpoint({**rec, "parent": latest["id"], "time": time.time()}, delta)


def digest(ram: memoryview) -> bytes:
    return hashlib.sha256(ram).digest()


def restored_digest(store: Path, ckpt: int, tmp_path: Path) -> bytes:
    path = tmp_path / "ram.img"
    with open_store(store, readonly=True) as s:
        restore_image(s, ckpt, path, progress=False)
    return hashlib.sha256(path.read_bytes()).digest()


def test_prune_then_gc_frees_exactly_the_unreferenced_pages(store_path, tmp_path):
    store = store_path
    refs = run_with_references(store, synth("--size", "8M", "--rate", "5000", "--dup", "0.3",
                                            "--popular", "512", "--zero", "0.1"),
                               CHECKPOINTS, EngineOptions(interval=0.02), reference=digest)
    assert len(refs) == CHECKPOINTS
    with open_store(store, readonly=True) as s:
        maps = {r["id"]: s.read_map(r["id"]).ids.copy() for r in s.list_checkpoints()}
    assert sorted(maps) == list(range(1, CHECKPOINTS + 1))
    keep = sorted({*range(CHECKPOINTS - KEEP_LAST + 1, CHECKPOINTS + 1),
                   *range(KEEP_EVERY, CHECKPOINTS + 1, KEEP_EVERY)})
    policy = ["--keep-last", str(KEEP_LAST), "--keep-every", str(KEEP_EVERY)]

    before = contents(store)
    plan = as_json("prune", "--store", str(store), *policy, "--dry-run")
    assert contents(store) == before
    assert plan["dry_run"] and not plan["forwarded"] and plan["checkpoints"] == CHECKPOINTS
    assert plan["kept"] == keep
    assert plan["dropped"] == sorted(set(maps) - set(keep))
    text = ok("prune", "--store", str(store), *policy, "--dry-run").stdout
    assert text.startswith(f"would drop {CHECKPOINTS - len(keep)} of {CHECKPOINTS} checkpoints "
                           f"and rewrite {len(plan['rewritten'])} map(s) as full maps")

    done = as_json("prune", "--store", str(store), *policy)
    assert {k: v for k, v in done.items() if k != "dry_run"} == \
        {k: v for k, v in plan.items() if k != "dry_run"}
    records = {r["id"]: r for r in as_json("ls", "--store", str(store))}
    assert sorted(records) == keep
    for ckpt, rec in records.items():
        # Parents are the nearest kept ancestors (here: the line 1, 2, ... thinned out) ...
        earlier = [k for k in keep if k < ckpt]
        assert rec["parent"] == (earlier[-1] if earlier else None)
        # ... maps whose chain went through a dropped checkpoint are full, depths truthful ...
        if ckpt in done["rewritten"]:
            assert rec["map"]["kind"] == "full" and rec["parent"] != ckpt - 1
    with open_store(store, readonly=True) as s:
        for ckpt, rec in records.items():
            chain = map_chain(s, rec)
            assert rec["map"]["depth"] == len(chain) - 1
            assert all(m["id"] in records for m in chain)
            # ... and every kept map is what it was.
            assert np.array_equal(s.read_map(ckpt).ids, maps[ckpt]), ckpt
    assert {r["parent"] for r in done["reparented"]} <= {*keep, None}

    stored, live = stored_ids(store), needed(store)
    garbage = stored - live
    assert len(garbage) > 1000  # the workload left pages behind that only dropped ones held
    before = contents(store)
    dry = as_json("gc", "--store", str(store), "--dry-run")
    assert contents(store) == before
    assert dry["pages_freed"] == len(garbage) and dry["pages_stored"] == len(stored)
    assert ok("gc", "--store", str(store), "--dry-run").stdout.startswith(
        f"would free {len(garbage):,} of {len(stored):,} pages")
    freed = as_json("gc", "--store", str(store))
    assert freed["pages_freed"] == len(garbage) and freed["bytes_freed"] == len(garbage) * 4096
    assert freed["disk_bytes_after"] < freed["disk_bytes_before"]
    assert stored_ids(store) == live
    assert as_json("gc", "--store", str(store))["pages_freed"] == 0
    assert as_json("stats", "--store", str(store))["stored_pages"] == len(live)
    r = vmckpt("check", "--store", str(store), "--read-data")
    assert r.returncode == 0 and r.stdout.startswith(
        f"sound: {len(keep)} of {len(keep)} checkpoints checked, {len(live)} of {len(live)} "
        "stored pages hashed"), r.stdout
    for ckpt in keep:
        assert restored_digest(store, ckpt, tmp_path) == refs[ckpt - 1], ckpt


def test_a_page_put_while_gc_runs_is_kept(store_path):
    """The dangerous race, made deterministic: while gc marks, the engine puts a page gc would
    otherwise free (a dedup hit: nothing is written) and commits a checkpoint naming it."""
    store = store_path
    run_synth(store)
    ok("prune", "--store", str(store), "--keep-last", "1")
    garbage = sorted(stored_ids(store) - needed(store))
    assert len(garbage) > 3
    with open_store(store) as s:
        pages = dict(zip(garbage[:3], s.get_pages(garbage[:3]), strict=True))
        stale = referenced(s)  # what a mark that listed the records too early would find

        def put(pid: bytes, *, dup: bool = True) -> None:
            res = s.put_pages(np.frombuffer(pid, np.uint8).reshape(1, 32),
                              np.frombuffer(pages[pid], np.uint8).reshape(1, 4096))
            assert (res.dup, res.new) == ((1, 0) if dup else (0, 1))  # dup: nothing written

        def commit(pid: bytes) -> int:
            return commit_next(s, MapDelta(np.array([7], np.uint64),
                                           np.frombuffer(pid, np.uint8).reshape(1, 32)))

        first, second, third = garbage[:3]
        put(first)  # in flight when gc begins, committed while it marks

        def mark() -> set[bytes]:
            commit(first)
            put(second)  # put while gc marks, never committed
            return stale

        swept = s.sweep(mark)
        assert swept.freed == len(garbage) - 2
        assert s.has_pages(np.frombuffer(first + second + third, np.uint8).reshape(3, 32)
                           ).tolist() == [True, True, False]
        put(third, dup=False)  # swept: a later put writes it again
        commit(third)
        # Once no checkpoint in flight holds it (the commit ended that), the second page goes.
        assert s.sweep(lambda: referenced(s)).freed == 1
    assert stored_ids(store) == needed(store) >= {first, third}
    assert vmckpt("check", "--store", str(store), "--read-data").returncode == 0


class Guest:
    """The synthetic guest in --control mode: it writes the pages the test tells it to."""

    def __init__(self) -> None:
        self.cmd_r, self.cmd_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.out: Any = None

    def started(self) -> None:
        os.close(self.cmd_r)
        os.close(self.out_w)
        self.out = os.fdopen(self.out_r)
        assert self.out.readline().startswith("READY")

    def write(self, page: int, seed: int) -> None:
        os.write(self.cmd_w, f"w {page} {seed}\n".encode())
        assert self.out.readline() == "ok\n"

    def close(self) -> None:
        os.close(self.cmd_w)
        self.out.close()


def scripted_run(store: Path, refdir: Path, guest_args: list[str], checkpoints: int,
                 script: dict[tuple[str, int], Callable[[Guest], None]], *,
                 parent: int | None = None,
                 before: Callable[[PageStore], None] | None = None) -> None:
    """Checkpoints the guest in this process; at each (phase, n) of the script (phases as in
    engine_with_refs.Holding, n counting this run's checkpoints) its action runs on the
    engine's thread, which waits for it: the guest's writes land in checkpoint n + 1 exactly,
    and `vmckpt prune/gc` reach the engine on control.sock at the point chosen. The RAM at
    every pause is in refdir/ID.sha256."""
    refdir.mkdir(exist_ok=True)
    guest = Guest()

    def hold(at: str, n: int) -> None:
        if act := script.pop((at, n), None):
            act(guest)

    async def go() -> None:
        with tempfile.TemporaryDirectory(prefix="vmckpt-") as tmp:
            prog = await TrackedProgram.start(
                synth("--size", "4M", *guest_args, "--control"), Path(tmp) / "engine.sock",
                copiers=2, min_ram=4 << 20, stdin=guest.cmd_r, stdout=guest.out_w)
            guest.started()
            with open_store(store, create=True) as s:
                if before:
                    before(s)
                assert await checkpoint_program(
                    prog, s, EngineOptions(interval=0.05, copiers=2), parent=parent,
                    max_checkpoints=checkpoints, on_engine=hooks(refdir, hold)) == 0

    try:
        asyncio.run(go())
    finally:
        guest.close()
    assert not script, f"never reached: {sorted(script)}"


def pid(seed: int) -> bytes:
    """The page id of the page the guest writes for seed."""
    return hashlib.sha256(seed_page(seed)).digest()


A, B, C, D, E = 101, 102, 103, 104, 105  # page contents (seeds)
NOTHING = ["--keep-within", "0s"]  # a policy that keeps no checkpoint


def test_prune_and_gc_beside_a_running_engine(tmp_path):
    """prune and gc through control.sock while the engine runs, at chosen points of its cycle:
    the engine keeps the checkpoint it continues from when the policy keeps nothing; pages of
    the checkpoint in flight survive a gc while prune dropped the only checkpoints that held
    them (put before the gc, and put while gc marks); restores made meanwhile are the RAM at
    their pauses; then a branch (an engine continuing from an older checkpoint) keeps its
    parent."""
    store, refs = tmp_path / "store", tmp_path / "refs"
    open_store(store, create=True).close()
    leave_stale_socket(store)  # the engine replaces it
    marking, drained, slow = threading.Event(), threading.Event(), threading.Event()
    gc_run: list[subprocess.Popen] = []
    seen: dict[str, Any] = {}

    def ref(ckpt: int) -> str:
        return (refs / f"{ckpt}.sha256").read_text()

    def restored(ckpt: int) -> str:  # `vmckpt restore --image` while the engine holds the store
        img = tmp_path / f"live{ckpt}.img"
        ok("restore", "--store", str(store), "--image", str(img), str(ckpt))
        try:
            return hashlib.sha256(img.read_bytes()).hexdigest()
        finally:
            img.unlink()

    def prune() -> dict:
        done = as_json("prune", "--store", str(store), *NOTHING)
        assert done["forwarded"] and not done["dry_run"]
        return done

    def gc() -> dict:
        done = as_json("gc", "--store", str(store))
        assert done["forwarded"]
        return done

    def holding_mark(s: PageStore) -> None:
        """While slow is set, gc's mark waits for the engine's drain to be done."""
        real = s.sweep

        def sweep(mark: Callable[[], set[bytes]], **kw: Any) -> Any:
            def held_mark() -> set[bytes]:
                if slow.is_set():
                    marking.set()
                    assert drained.wait(60), "the drain did not end"
                return mark()
            return real(held_mark, **kw)

        s.sweep = sweep  # type: ignore[method-assign]

    def in_flight_4(_: Guest) -> None:
        # Checkpoint 4 is drained: its page A is a dedup hit on what only checkpoint 2 holds.
        seen["prune4"] = prune()
        assert restored(3) == ref(3)
        seen["gc4"] = gc()
        assert pid(A) in stored_ids(store), "gc freed a page of the checkpoint in flight"

    def committed_4(guest: Guest) -> None:
        # Committed, and the engine has not yet taken 4 as the checkpoint it continues from.
        seen["prune4c"] = prune()
        guest.write(1, C)  # checkpoint 5 puts C, which only 3 holds

    def draining_5(_: Guest) -> None:
        # Before checkpoint 5 puts C: prune drops 3 (C's only holder), and gc starts marking.
        seen["prune5"] = prune()
        slow.set()
        gc_run.append(subprocess.Popen([*VMCKPT, "gc", "--store", str(store), "--json"],
                                       stdout=subprocess.PIPE, text=True))
        assert marking.wait(60), "gc did not begin"

    def drained_5(_: Guest) -> None:
        drained.set()  # C was put while gc marked; now it sweeps
        out, _ = gc_run[0].communicate(timeout=120)
        assert gc_run[0].returncode == 0
        seen["gc5"] = json.loads(out)
        slow.clear()
        stored = stored_ids(store)
        assert pid(C) in stored, "gc freed a page put while it marked"
        assert pid(B) not in stored, "gc kept a page no checkpoint holds"

    def committed_5(guest: Guest) -> None:
        assert restored(4) == ref(4)  # its page A survived the gc it was in flight through
        assert restored(5) == ref(5)
        assert "by the engine that holds the store" in ok("gc", "--store", str(store)).stdout
        guest.write(2, E)

    scripted_run(store, refs, ["--fill", "0.25"], 6, {
        ("committed", 1): lambda g: g.write(0, A),
        ("committed", 2): lambda g: (g.write(0, B), g.write(1, C)),
        ("committed", 3): lambda g: (g.write(0, A), g.write(1, D)),
        ("commit", 4): in_flight_4,
        ("committed", 4): committed_4,
        ("drain", 5): draining_5,
        ("commit", 5): drained_5,
        ("committed", 5): committed_5,
    }, before=holding_mark)
    # The policy kept nothing; the engine kept the checkpoint it continues from: its parent
    # while 4 was in flight, the newest once 4 was committed (the engine's parent was still 3).
    assert (seen["prune4"]["kept"], seen["prune4"]["dropped"]) == ([3], [1, 2])
    assert 4 in seen["prune4c"]["kept"] and set(seen["prune4c"]["kept"]) <= {3, 4}
    assert seen["prune5"]["kept"] == [4]
    assert seen["gc5"]["pages_freed"] > 0 and seen["gc5"]["forwarded"]
    records = {r["id"]: r for r in as_json("ls", "--store", str(store))}
    assert [(i, r["parent"]) for i, r in records.items()] == [(4, None), (5, 4), (6, 5)]
    assert not (store / "control.sock").exists()
    for ckpt in records:
        assert restored_digest(store, ckpt, tmp_path).hex() == ref(ckpt), ckpt
    assert stored_ids(store) == needed(store)  # nothing missing, nothing left over

    # A branch: an engine continuing from checkpoint 5 (its RAM restored into the guest's
    # file), which is not the newest. Its first checkpoint in flight, prune keeps 5 for it.
    shm = Path(f"/dev/shm/vmckpt-test-{os.getpid()}-branch")
    with open_store(store, readonly=True) as s:
        restore_image(s, 5, shm, progress=False)

    def branch_in_flight(_: Guest) -> None:
        seen["prune_branch"] = prune()

    try:
        scripted_run(store, refs, ["--shm", str(shm), "--fill", "0"], 2,
                     {("commit", 1): branch_in_flight}, parent=5)
    finally:
        shm.unlink(missing_ok=True)
    assert seen["prune_branch"]["kept"] == [5, 6]  # its parent, and the newest
    records = {r["id"]: r for r in as_json("ls", "--store", str(store))}
    assert [(i, r["parent"]) for i, r in records.items()] == [(5, None), (6, 5), (7, 5),
                                                              (8, 7)]
    assert ref(7) == ref(5)  # the guest wrote nothing since: the branch begins at 5's RAM
    for ckpt in records:
        assert restored_digest(store, ckpt, tmp_path).hex() == ref(ckpt), ckpt
    r = vmckpt("check", "--store", str(store), "--read-data")
    assert r.returncode == 0 and r.stdout.startswith("sound: 4 of 4"), r.stdout
    # Stopped, the store is collected by the command itself, and nothing more is freed.
    assert not as_json("gc", "--store", str(store))["forwarded"]
    assert stored_ids(store) == needed(store)


# -------------------------------------------------------------------------- errors


COMMANDS = [["prune", "--keep-last", "2"], ["prune", "--keep-every", "2", "--dry-run"],
            ["gc"], ["gc", "--dry-run"]]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("small") / "store"
    run_synth(store, 3)
    return store


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_missing_store(cmd, tmp_path):
    assert_one_line_error(vmckpt(*cmd, "--store", str(tmp_path / "nothing")),
                          "no vmckpt store at")


def test_store_of_another_format(small, tmp_path):
    copy = Path(shutil.copytree(small, tmp_path / "copy"))
    db = raw_db(copy)
    db[b"format"] = msgpack.packb({**msgpack.unpackb(db[b"format"]), "version": 99})
    db.close()
    before = contents(copy)
    for cmd in COMMANDS:
        assert_one_line_error(vmckpt(*cmd, "--store", str(copy)), "v99", "reads v1")
    assert contents(copy) == before


@pytest.mark.parametrize("policy,says", [
    ([], "prune needs a policy"), (["--keep-last", "0"], "--keep-last"),
    (["--keep-every", "-1"], "--keep-every"), (["--keep-within", "soon"], "--keep-within")])
def test_prune_needs_a_valid_policy(small, policy, says):
    before = contents(small)
    assert_one_line_error(vmckpt("prune", "--store", str(small), *policy), says)
    assert contents(small) == before


def test_prune_keep_within(small):
    assert as_json("prune", "--store", str(small), "--keep-within", "1h",
                   "--dry-run")["dropped"] == []
    assert as_json("prune", "--store", str(small), "--keep-within", "0s",
                   "--dry-run")["kept"] == []


def test_ids_are_never_given_out_again(small, tmp_path):
    copy = Path(shutil.copytree(small, tmp_path / "copy"))
    assert as_json("prune", "--store", str(copy), "--keep-every", "2")["dropped"] == [1, 3]
    assert as_json("show", "--store", str(copy), "latest")["record"]["id"] == 2
    with open_store(copy) as s:
        assert commit_next(s, MapDelta(np.empty(0, np.uint64), np.empty((0, 32), np.uint8))) == 4
    assert vmckpt("check", "--store", str(copy), "--read-data").returncode == 0


def test_store_locked_by_a_program_that_does_not_answer(small, tmp_path):
    copy = Path(shutil.copytree(small, tmp_path / "copy"))
    leave_stale_socket(copy)
    with held_open(copy):
        for cmd in COMMANDS:
            assert_one_line_error(vmckpt(*cmd, "--store", str(copy)), "is locked by another "
                                  "process and no engine answers on", "control.sock")
    # The stale socket file bothers neither RocksDB nor the commands.
    assert json.loads(ok("stats", "--store", str(copy), "--json").stdout)["checkpoints"] == 3
    assert not as_json("prune", "--store", str(copy), "--keep-last", "1")["forwarded"]
    # (Whether the pruned checkpoints held pages nothing else does depends on how much the
    # guest wrote under the machine's load: gc is asked to run here, not to free.)
    assert not as_json("gc", "--store", str(copy))["forwarded"]
    assert vmckpt("check", "--store", str(copy), "--read-data").returncode == 0
