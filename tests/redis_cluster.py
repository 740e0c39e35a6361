"""A real Redis Cluster for tests: three masters (and optionally a replica each) of Debian's
redis-server on free loopback ports, each in its own temporary directory, stopped at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import redis

READY_TIMEOUT = 30.0


def free_ports(n: int) -> list[int]:
    """n free loopback ports whose +10000 bus ports are free too (redis' cluster bus)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class Cluster:
    """Started by start(); url(name) is the store URL; stop() ends every server."""

    def __init__(self, root: Path, masters: int = 3, replicas: int = 0,
                 host: str = "127.0.0.1", netns: str | None = None, aof: bool = False) -> None:
        self.root, self.masters, self.replicas, self.aof = root, masters, replicas, aof
        self.host, self.netns = host, netns
        self.ports = free_ports(masters * (1 + replicas))
        self.procs: dict[int, subprocess.Popen] = {}

    def _cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start_node(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(self._cmd([
            shutil.which("redis-server") or "redis-server", "--port", str(port),
            "--bind", self.host, "--cluster-enabled", "yes", "--cluster-config-file",
            "nodes.conf", "--cluster-node-timeout", "2000", "--appendonly",
            "yes" if self.aof else "no",
            "--save", "", "--dir", str(d), "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(d / "log")]), stdout=subprocess.DEVNULL)

    def start(self) -> Cluster:
        try:
            for port in self.ports:
                self.start_node(port)
            for port in self.ports:
                self._wait(lambda p=port: self.cli(p, "ping") == "PONG")
            subprocess.run(self._cmd([
                "redis-cli", "--cluster", "create",
                *(f"{self.host}:{p}" for p in self.ports),
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]),
                check=True, capture_output=True, timeout=60)
            self._wait(self.ok)
        except BaseException:
            self.stop()
            raise
        return self

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(self.host, port, socket_timeout=5)

    def cli(self, port: int, *args: str) -> str:
        """redis-cli against one node, from the cluster's namespace."""
        return subprocess.run(self._cmd(["redis-cli", "-h", self.host, "-p", str(port),
                                         *args]), capture_output=True, text=True,
                              timeout=10).stdout.strip()

    def ok(self) -> bool:
        return all("cluster_state:ok" in self.cli(p, "cluster", "info")
                   for p in self.ports if p in self.procs)

    @staticmethod
    def _wait(cond) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with suppress(redis.RedisError, OSError):
                if cond():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the test's redis cluster did not come up")
            time.sleep(0.1)

    def url(self, name: str, **query: object) -> str:
        hosts = ",".join(f"{self.host}:{p}" for p in self.ports)
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"redis://{hosts}/{name}" + (f"?{q}" if q else "")

    def master_ports(self) -> list[int]:
        """The ports of the nodes that are masters now (failovers change them)."""
        for p in self.procs:
            with suppress(redis.RedisError, OSError):
                nodes = self.node(p).execute_command("CLUSTER NODES")
                return sorted(int(addr.split("@")[0].rsplit(":", 1)[1])
                              for addr, info in nodes.items()
                              if "master" in info["flags"] and "fail" not in info["flags"])
        raise RuntimeError("no node of the test's cluster answers")

    def restart(self, port: int) -> None:
        """A killed node back from its directory (its data too, with aof)."""
        self.start_node(port)
        self._wait(self.ok)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def flush(self) -> None:
        """Empties every master (a fresh store for the next test)."""
        for p in self.ports:
            with suppress(redis.ResponseError):
                self.node(p).flushall()

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def cluster_client(url: str) -> redis.RedisCluster:
    from vmckpt.storage.cluster import parse_url

    nodes, _, _ = parse_url(url)
    return redis.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes])


def contents(url: str) -> str:
    """A digest of every key and value on the cluster but the writers' bookkeeping (pending
    sets, WAIT keys), read behind vmckpt's back."""
    import hashlib

    rc = cluster_client(url)
    h = hashlib.sha256()
    try:
        items = []
        for node in rc.get_primaries():
            conn = rc.get_redis_connection(node)
            for key in conn.scan_iter(count=1000):
                if key.startswith((b"vmckpt:{pending}", b"vmckpt:wait:")) or \
                        key.endswith(b"}:held"):
                    continue
                kind = conn.type(key)
                value = conn.get(key) if kind == b"string" else sorted(
                    conn.hgetall(key).items() if kind == b"hash" else conn.smembers(key))
                items.append((key, repr(value).encode()))
        for key, value in sorted(items):
            h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    finally:
        rc.close()
    return h.hexdigest()


def lone_server(root: Path, *, cluster: bool) -> tuple[subprocess.Popen, int]:
    """One redis-server on a free loopback port: plain, or cluster-enabled with no slot."""
    port = free_ports(1)[0]
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(root), "--logfile", str(root / "log"),
                             *(["--cluster-enabled", "yes"] if cluster else [])],
                            stdout=subprocess.DEVNULL)
    Cluster._wait(lambda: redis.Redis("127.0.0.1", port).ping())
    return proc, port
