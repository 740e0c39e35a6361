"""Target 3: restore on a host that never ran the VM. Three network namespaces made here, on
one bridge of their own (addresses only inside them, nothing leaves the machine): the
cluster's nodes in one, the checkpointing engine and its QEMU in another, the restoring QEMU
in the third."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import is_root
from redis_cluster import Cluster
from vmckpt.engine.qemu.testguest import ticks

NET = "10.231.7"
HOST = Path(__file__).with_name("netns_host.py")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces():
    if not is_root():
        pytest.skip("network namespaces need root")
    tag = f"vmckpt{os.getpid()}"
    names = {"cluster": f"{tag}c", "run": f"{tag}r", "restore": f"{tag}s"}
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        c = names["cluster"]
        ip("-n", c, "link", "add", "br0", "type", "bridge")
        ip("-n", c, "addr", "add", f"{NET}.1/24", "dev", "br0")
        ip("-n", c, "link", "set", "br0", "up")
        for n, side in enumerate(("run", "restore"), 2):
            ip("-n", c, "link", "add", f"v{side}", "type", "veth", "peer", "name", "eth0",
               "netns", names[side])
            ip("-n", c, "link", "set", f"v{side}", "master", "br0", "up")
            ip("-n", names[side], "addr", "add", f"{NET}.{n}/24", "dev", "eth0")
            ip("-n", names[side], "link", "set", "eth0", "up")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(HOST.parent)}
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HOST), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_restore_in_another_namespace_is_bit_exact_and_the_guest_continues(namespaces,
                                                                           tmp_path):
    cluster = Cluster(tmp_path / "redis", host=f"{NET}.1", netns=namespaces["cluster"]).start()
    try:
        url = cluster.url("vm")
        (tmp_path / "run").mkdir()
        r = in_ns(namespaces["run"], "checkpoint", url, str(tmp_path / "run"))
        assert r.returncode == 0, r.stderr
        pauses = json.loads((tmp_path / "run" / "pauses.json").read_text())
        for ckpt in (len(pauses) // 2, len(pauses)):
            work = tmp_path / f"restore{ckpt}"
            work.mkdir()
            r = in_ns(namespaces["restore"], "restore", url, str(ckpt), str(work))
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout.splitlines()[-1])
            pause = pauses[ckpt - 1]
            assert got["digest"] == pause["digest"], f"checkpoint {ckpt} differs"
            counted = [t for t, _ in ticks((pause["said"] + got["said"]).encode("latin-1"))]
            assert counted[-1] > pause["tick"] and \
                counted == list(range(counted[0], counted[-1] + 1)), (ckpt, counted)
    finally:
        cluster.stop()
