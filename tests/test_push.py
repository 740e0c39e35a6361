"""`vmckpt push/pull` between stores of both backends (a RocksDB directory, a NAME on a real
Redis Cluster): only missing pages travel, a second push sends none, a store sharing 90 % of
its pages sends about 10 %, an interrupted push resumes, and every copy is the original."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_with_refs import image_digest
from test_cluster_store import commit_pages
from test_disks import run_with_disk
from test_inspect import VMCKPT, ok, run_synth, vmckpt
from test_prune_gc import needed
from vmckpt.storage import get_blob, open_store
from vmckpt.storage.transfer import copy_checkpoints


def same_checkpoints(src: str, dst: str, ids: dict[int, int]) -> None:
    """Each copied checkpoint restores what its original does: the same whole map, device
    state and figures, every page readable."""
    with open_store(src, readonly=True) as s, open_store(dst, readonly=True) as d:
        for a, b in ids.items():
            ra, rb = s.get_record(a), d.get_record(b)
            skip = ("id", "map", "parent", "origin")
            assert {k: v for k, v in ra.items() if k not in skip} == \
                {k: v for k, v in rb.items() if k not in skip}
            ma, mb = s.read_map(a), d.read_map(b)
            assert np.array_equal(ma.ids, mb.ids), (a, b)
            if ra.get("device_state"):
                assert get_blob(s, ra["device_state"]) == get_blob(d, rb["device_state"])
            present = mb.ids[mb.nonzero_pfns()]
            assert d.has_pages(present).all()


def push(*args: str) -> dict:
    return json.loads(ok("push", *args, "--json").stdout)


@pytest.fixture
def stores(redis_cluster, tmp_path):
    redis_cluster.flush()
    return {"local": str(tmp_path / "a"), "local2": str(tmp_path / "b"),
            "cluster": redis_cluster.url("vm1")}


@pytest.mark.parametrize("src,dst", [("local", "cluster"), ("cluster", "local2"),
                                     ("local", "local2")])
def test_push_sends_only_missing_pages_and_a_second_push_sends_none(stores, src, dst):
    src, dst = stores[src], stores[dst]
    run_synth(src, 4)
    stored = len(needed(src))
    first = push(src, dst)
    assert first["checkpoints"] == [1, 2, 3, 4] and first["already"] == []
    # Every distinct page a checkpoint needs went once (the store holds no other).
    assert first["pages_sent"] == stored and first["bytes_sent"] == stored * 4096
    again = push(src, dst)
    assert again["checkpoints"] == [] and again["already"] == [1, 2, 3, 4]
    assert again["pages_sent"] == 0 and again["pages_there"] == 0
    same_checkpoints(src, dst, {int(k): v for k, v in first["ids"].items()})
    r = vmckpt("check", "--store", dst, "--read-data")
    assert r.returncode == 0 and r.stdout.startswith("sound: 4 of 4"), r.stdout
    text = ok("push", src, dst).stdout
    assert text.startswith("0 checkpoint(s) copied, 4 already there; 0 pages sent"), text


def test_pull_of_chosen_checkpoints(stores):
    run_synth(stores["cluster"], 3)
    import subprocess
    r = subprocess.run([*VMCKPT, "pull", "--store", stores["local"], stores["cluster"], "2",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["checkpoints"] == [2]
    with open_store(stores["local"], readonly=True) as d:
        [rec] = d.list_checkpoints()
        assert rec["parent"] is None and rec["map"]["kind"] == "full"  # 1 is not there
    same_checkpoints(stores["cluster"], stores["local"], {2: 1})


def test_a_store_sharing_90_percent_of_its_pages_sends_about_10(stores):
    rng = np.random.default_rng(3)
    common = rng.integers(0, 255, (900, 4096), np.uint8)
    with open_store(stores["cluster"], create=True) as s:
        commit_pages(s, np.concatenate([common, rng.integers(0, 255, (100, 4096), np.uint8)]))
    with open_store(stores["local"], create=True) as s:
        commit_pages(s, np.concatenate([common, rng.integers(0, 255, (100, 4096), np.uint8)]))
    done = push(stores["local"], stores["cluster"])
    assert (done["pages_sent"], done["pages_there"]) == (100, 900)


def test_an_interrupted_push_resumes_where_it_stopped(stores):
    rng = np.random.default_rng(4)
    with open_store(stores["local"], create=True) as s:
        first = commit_pages(s, rng.integers(0, 255, (1000, 4096), np.uint8))
    seen = []

    def cut(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 300:
            raise KeyboardInterrupt

    with open_store(stores["local"], readonly=True) as s, \
            open_store(stores["cluster"], create=True) as d:
        with pytest.raises(KeyboardInterrupt):
            copy_checkpoints(s, d, progress=cut, batch=100)
        assert d.list_checkpoints() == []  # pages only: no record before all of them
        done = copy_checkpoints(s, d, batch=100)
    assert (done.pages_sent, done.pages_there, done.checkpoints) == (700, 300, [first])
    same_checkpoints(stores["local"], stores["cluster"], done.ids)


def test_push_carries_each_checkpoints_disks(tmp_path):
    # A checkpoint's disk blocks are frames of its map like RAM's: a push's deltas against the
    # parent carry them, and each disk restores from the copy as it was at the pause.
    run, _ = run_with_disk(tmp_path, 6)
    src, dst = tmp_path / "store", tmp_path / "copy"
    ok("push", str(src), str(dst))
    with open_store(src, readonly=True) as s:
        ids = [r["id"] for r in s.list_checkpoints()]
    with open_store(dst, readonly=True) as d:
        assert [r["id"] for r in d.list_checkpoints()] == ids
    for ckpt in ids:
        assert image_digest(dst, ckpt, tmp_path, disk="virtio0") == \
            run.disk_refs(ckpt)["virtio0"], ckpt
