"""Faults of a real Redis Cluster under a running engine: a master killed mid-run."""

from __future__ import annotations

import json
import subprocess
import threading
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


def test_a_master_killed_without_replicas_is_named_and_the_run_resumes_once_it_is_back(
        tmp_path):
    """No replicas: the engine says which node failed, the guest runs on, no checkpoint is
    committed while the node is down, and once it is back (its data from its append-only
    file) checkpoints resume; every checkpoint committed before the failure is intact."""
    cluster = Cluster(tmp_path / "redis", aof=True).start()
    try:
        url = cluster.url("vm")
        engine = subprocess.Popen(
            [*VMCKPT, "-v", "run", "--store", url, "--interval", "0.2s", "--max-checkpoints",
             "30", "--min-ram", "4M", "--", *synth("--size", "16M", "--rate", "5000")],
            stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(engine.stderr), daemon=True).start()
        try:
            deadline = time.monotonic() + 60
            while len(before := committed(url)) < 5:
                assert time.monotonic() < deadline and engine.poll() is None, "no checkpoints"
                time.sleep(0.2)
            victim = cluster.master_ports()[0]
            cluster.kill(victim)
            deadline = time.monotonic() + 60
            while not any("checkpoint dropped" in line for line in lines):
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
            said = next(line for line in lines if "checkpoint dropped" in line)
            assert f"127.0.0.1:{victim}" in said and "the VM runs on" in said, said
            assert engine.poll() is None  # the guest runs on
            cluster.restart(victim)
            assert engine.wait(timeout=180) == 0, "".join(lines)
        finally:
            engine.kill()
            engine.wait()
        after = {r["id"]: r for r in as_json("ls", "--store", url)}
        for rec in before:
            assert after[rec["id"]] == rec
        assert len(after) == 30
        r = vmckpt("check", "--store", url, "--read-data")
        assert r.returncode == 0 and r.stdout.startswith("sound: 30 of 30"), r.stdout
    finally:
        cluster.stop()

