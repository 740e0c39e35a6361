"""Faults of a real Redis Cluster under a running engine: a master killed mid-run."""

from __future__ import annotations

import json
import subprocess
import time

from redis_cluster import Cluster
from test_inspect import VMCKPT, as_json, vmckpt
from vmckpt.engine.synthguest import command as synth


def committed(url: str) -> list[dict]:
    r = vmckpt("ls", "--store", url, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else []


def test_a_master_killed_mid_run_with_replicas_loses_no_checkpoint(tmp_path):
    """Three masters with two replicas each, the store asking one replica of every write
    (?replicas=1, which the promoted replica's sibling still gives after the failover)."""
    cluster = Cluster(tmp_path / "redis", replicas=2).start()
    try:
        url = cluster.url("vm", replicas=1)
        engine = subprocess.Popen(
            [*VMCKPT, "-v", "run", "--store", url, "--interval", "0.2s", "--max-checkpoints",
             "40", "--min-ram", "4M", "--", *synth("--size", "16M", "--rate", "5000")],
            stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while len(before := committed(url)) < 8:
                assert time.monotonic() < deadline and engine.poll() is None, "no checkpoints"
                time.sleep(0.2)
            victim = cluster.master_ports()[0]
            cluster.kill(victim)
            _, err = engine.communicate(timeout=180)
        finally:
            engine.kill()
            engine.wait()
        assert engine.returncode == 0, err
        after = {r["id"]: r for r in as_json("ls", "--store", url)}
        assert victim not in cluster.master_ports()
        for rec in before:  # every checkpoint committed before the kill is there, unchanged
            assert after[rec["id"]] == rec
        assert max(after) > max(r["id"] for r in before)  # and the run went on after it
        r = vmckpt("check", "--store", url, "--read-data")
        assert r.returncode == 0 and r.stdout.startswith(
            f"sound: {len(after)} of {len(after)} checkpoints checked"), r.stdout
    finally:
        cluster.stop()
