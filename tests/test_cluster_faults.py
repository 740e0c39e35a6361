"""Faults of a real Redis Cluster under a running engine: a master killed mid-run."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from redis_cluster import Cluster
from test_inspect import VMCKPT, as_json, vmckpt
from vmckpt.lab.synthguest import command as synth


def committed(url: str) -> list[dict]:
    r = vmckpt("ls", "--store", url, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else []


class Run:
    """`vmckpt -v run` of the synthetic guest into url, its log lines collected."""

    def __init__(self, url: str, checkpoints: int) -> None:
        self.url = url
        self.engine = subprocess.Popen(
            [*VMCKPT, "-v", "run", "--store", url, "--interval", "0.2s", "--max-checkpoints",
             str(checkpoints), "--min-ram", "4M", "--",
             *synth("--size", "16M", "--rate", "5000")], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.engine.stderr),
                         daemon=True).start()

    def committed(self, n: int) -> list[dict]:
        """The records, once n are committed."""
        deadline = time.monotonic() + 60
        while len(records := committed(self.url)) < n:
            assert time.monotonic() < deadline and self.engine.poll() is None, self.lines
            time.sleep(0.2)
        return records

    def stop(self) -> None:
        self.engine.kill()
        self.engine.wait()


def test_a_master_killed_mid_run_with_replicas_loses_no_checkpoint(tmp_path):
    """Three masters with two replicas each, the store asking one replica of every write
    (?replicas=1, which the promoted replica's sibling still gives after the failover)."""
    cluster = Cluster(tmp_path / "redis", replicas=2).start()
    try:
        url = cluster.url("vm", replicas=1)
        run = Run(url, 40)
        try:
            before = run.committed(8)
            victim = cluster.master_ports()[0]
            cluster.kill(victim)
            assert run.engine.wait(timeout=180) == 0, run.lines
        finally:
            run.stop()
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
    """No replicas: the engine says which node failed, the guest runs on, and once the node is
    back (its data from its append-only file) checkpoints resume; every checkpoint committed
    before the failure is intact."""
    cluster = Cluster(tmp_path / "redis", aof=True).start()
    try:
        url = cluster.url("vm")
        run = Run(url, 30)
        lines = run.lines
        try:
            before = run.committed(5)
            victim = cluster.master_ports()[0]
            cluster.kill(victim)
            deadline = time.monotonic() + 60
            while not any("checkpoint dropped" in line for line in lines):
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
            said = next(line for line in lines if "checkpoint dropped" in line)
            assert f"127.0.0.1:{victim}" in said and "the VM runs on" in said, said
            assert run.engine.poll() is None  # the engine and its guest run on
            cluster.restart(victim)
            assert run.engine.wait(timeout=180) == 0, "".join(lines)
        finally:
            run.stop()
        after = {r["id"]: r for r in as_json("ls", "--store", url)}
        for rec in before:
            assert after[rec["id"]] == rec
        assert len(after) == 30
        r = vmckpt("check", "--store", url, "--read-data")
        assert r.returncode == 0 and r.stdout.startswith("sound: 30 of 30"), r.stdout
    finally:
        cluster.stop()

