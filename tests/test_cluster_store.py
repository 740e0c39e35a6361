"""The Redis Cluster backend on a real cluster started by the tests (tests/redis_cluster.py):
every command on a cluster store, pages shared between NAMEs, a QEMU guest checkpointed into
the cluster and restored from it, and one line for each way a URL can fail. The store tests
that run on both backends are in test_prune_gc.py and test_consistency.py (store_path)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from redis_cluster import Cluster, lone_server
from test_inspect import as_json, assert_one_line_error, ok, run_synth, vmckpt
from test_qemu import checkpoints_restore_and_continue
from vmckpt.storage import MapDelta, open_store
from vmckpt.storage.gc import collect_garbage
from vmckpt.storage.pagemap import page_ids


@pytest.fixture
def url(redis_cluster) -> str:
    redis_cluster.flush()
    return redis_cluster.url("vm1")


def test_every_command_reads_a_cluster_store(url, tmp_path):
    run_synth(url, 4)
    records = as_json("ls", "--store", url)
    assert [r["id"] for r in records] == [1, 2, 3, 4]
    assert as_json("show", "--store", url, "latest")["record"]["id"] == 4
    assert vmckpt("diff", "--store", url, "1", "4").returncode == 0
    stats = as_json("stats", "--store", url)
    assert stats["checkpoints"] == 4 and stats["stored_pages"] > 1000
    r = vmckpt("check", "--store", url, "--read-data")
    assert r.returncode == 0 and r.stdout.startswith("sound: 4 of 4 checkpoints checked"), r
    ok("export", "--store", url, "-o", str(tmp_path / "out"), "2")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())
    ok("plot", "--store", url, "-o", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    ok("restore", "--store", url, "--image", str(tmp_path / "img"), "3")
    with open_store(url, readonly=True) as s:
        img = tmp_path / "img"
        pmap = s.read_map(3)
        ram = np.fromfile(img, np.uint8).reshape(-1, 4096)
        assert (page_ids(ram) == pmap.ids[:len(ram)]).all()
    # $VMCKPT_STORE names it too.
    env = vmckpt_env(url, "ls", "--json")
    assert [r["id"] for r in json.loads(env)] == [1, 2, 3, 4]


def vmckpt_env(url: str, *args: str) -> str:
    import subprocess

    from test_inspect import VMCKPT
    r = subprocess.run([*VMCKPT, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VMCKPT_STORE": url})
    assert r.returncode == 0, r.stderr
    return r.stdout


def commit_pages(s, pages: np.ndarray, parent: int | None = None) -> int:
    ids = page_ids(pages)
    s.put_pages(ids, pages)
    return s.commit_checkpoint({"ram_size": len(pages) * 4096, "parent": parent,
                                "time": time.time()},
                               MapDelta(np.arange(len(pages), dtype=np.uint64), ids))


def test_pages_are_shared_between_names_and_gc_keeps_the_others(redis_cluster, url):
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 255, (300, 4096), np.uint8)
    own = rng.integers(0, 255, (100, 4096), np.uint8)
    with open_store(url, create=True) as a:
        commit_pages(a, np.concatenate([shared, own]))
    with open_store(redis_cluster.url("vm2"), create=True) as b:
        res = b.put_pages(page_ids(shared), shared)
        assert (res.new, res.dup) == (0, 300)  # dedup across VMs: nothing sent twice
        commit_pages(b, shared)
        assert b.page_count() == 400
    ok("prune", "--store", url, "--keep-within", "0s")
    assert as_json("ls", "--store", url) == []
    with open_store(redis_cluster.url("vm2")) as b:
        result = collect_garbage(b)  # vm1's own pages go, vm2's stay
        assert result.pages_freed == 100 and b.page_count() == 300
        assert b.has_pages(page_ids(shared)).all()
    r = vmckpt("check", "--store", redis_cluster.url("vm2"), "--read-data")
    assert r.returncode == 0, r.stdout


def test_a_store_name_is_separate_and_absent_until_made(redis_cluster, url):
    assert_one_line_error(vmckpt("ls", "--store", url), "no vmckpt store vm1 on the cluster")
    assert_one_line_error(vmckpt("ls", "--store", redis_cluster.url("")), "is not redis://")


def test_one_line_for_a_url_that_reaches_nothing_a_plain_redis_and_a_slot_uncovered(
        tmp_path):
    from redis_cluster import free_ports

    port = free_ports(1)[0]
    assert_one_line_error(vmckpt("ls", "--store", f"redis://127.0.0.1:{port}/x"),
                          f"no Redis Cluster node answers at 127.0.0.1:{port}")
    plain, port = lone_server(tmp_path / "plain", cluster=False)
    try:
        assert_one_line_error(vmckpt("ls", "--store", f"redis://127.0.0.1:{port}/x"),
                              "without cluster mode")
    finally:
        plain.kill()
        plain.wait()
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        for p in cluster.ports:  # each node forgets who serves slots 0-99
            cluster.node(p).execute_command("CLUSTER DELSLOTSRANGE", 0, 99)
        assert_one_line_error(vmckpt("ls", "--store", cluster.url("x")),
                              "serves 16284 of 16384 hash slots")
    finally:
        cluster.stop()


def test_a_qemu_guest_checkpointed_into_the_cluster_restores_bit_exact(url, tmp_path):
    checkpoints_restore_and_continue(url, tmp_path, "wp")
