"""The synthetic guest: maps shared "guest RAM" and writes to it at a chosen rate and pattern.

Run as `python -m vmckpt.lab.synthguest`. All writes go through ONE MAP_SHARED mapping of a
memfd (or /dev/shm file), the mapping the preload library hands to the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import signal
import sys
import time

import numpy as np
from vmckpt.engine.units import parse_size

PAGE = 4096
POPULAR = 16
HUGE = 2 << 20


def command(*args: str) -> list[str]:
    """The command line that runs the synthetic guest with args."""
    return [sys.executable, "-m", "vmckpt.lab.synthguest", *args]


def seed_page(seed: int) -> bytes:
    """Deterministic page content for a seed (tests predict it)."""
    return np.random.default_rng(seed).integers(0, 256, PAGE, np.uint8).tobytes()


def popular_page(k: int) -> bytes:
    return hashlib.sha256(f"popular-{k}".encode()).digest() * (PAGE // 32)


def map_ram(args: argparse.Namespace) -> tuple[mmap.mmap, int]:
    size = args.size
    if args.shm:
        fd = os.open(args.shm, os.O_RDWR | os.O_CREAT, 0o600)
    elif args.hugetlb:
        size = -(-size // HUGE) * HUGE
        try:
            fd = os.memfd_create("vmckpt-synth", os.MFD_CLOEXEC | os.MFD_HUGETLB
                                 | os.MFD_HUGE_2MB)
        except OSError as e:
            sys.exit(f"synthguest: no hugetlb memfd ({e}); reserve pages in "
                     "/proc/sys/vm/nr_hugepages")
    else:
        fd = os.memfd_create("vmckpt-synth", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mm, size


class Writer:
    """Vectorised writes with the configured mix of unique, duplicate, zero and partial."""

    def __init__(self, ram: np.ndarray, args: argparse.Namespace) -> None:
        self.ram, self.args = ram, args
        self.rng = np.random.default_rng(args.seed)
        self.pool = self.rng.integers(0, 256, (256, PAGE), np.uint8)
        self.popular = np.frombuffer(b"".join(popular_page(k) for k in range(args.popular)),
                                     np.uint8).reshape(args.popular, PAGE)
        self.counter = 0
        self.cursor = 0
        n = len(ram)
        self.hot = self.rng.permutation(n)[:max(1, int(n * args.hot_fraction))]

    def pick(self, count: int) -> np.ndarray:
        n, a = len(self.ram), self.args
        if a.pattern == "seq":
            idx = (self.cursor + np.arange(count)) % n
            self.cursor = int(idx[-1] + 1) % n
            return idx
        idx = self.rng.integers(0, n, count)
        if a.pattern == "hot":
            hot = self.rng.random(count) < a.hot_share
            idx[hot] = self.hot[self.rng.integers(0, len(self.hot), int(hot.sum()))]
        return np.unique(idx)

    def write(self, idx: np.ndarray) -> None:
        a, count = self.args, len(idx)
        kind = self.rng.random(count)
        zero = kind < a.zero
        dup = (kind >= a.zero) & (kind < a.zero + a.dup)
        partial = ~zero & ~dup & (self.rng.random(count) < a.partial)
        unique = ~zero & ~dup & ~partial
        if zero.any():
            self.ram[idx[zero]] = 0
        if dup.any():
            self.ram[idx[dup]] = self.popular[self.rng.integers(0, len(self.popular),
                                                                    int(dup.sum()))]
        if unique.any():
            u = idx[unique]
            content = self.pool[self.rng.integers(0, len(self.pool), len(u))]
            stamps = self.counter + np.arange(len(u), dtype=np.uint64)
            self.counter += len(u)
            content[:, :8] = stamps.view(np.uint8).reshape(-1, 8)
            self.ram[u] = content
        for p in idx[partial]:
            off = int(self.rng.integers(0, PAGE - 64))
            ln = int(self.rng.integers(8, 65))
            self.ram[p, off:off + ln] = self.rng.integers(0, 256, ln, np.uint8)


def control(ram: np.ndarray, writer: Writer) -> None:
    for line in sys.stdin:
        op, *rest = line.split()
        v = [int(x) for x in rest[:2]] if op != "p" else [int(rest[0]), int(rest[1])]
        if op == "w":
            ram[v[0]] = np.frombuffer(seed_page(v[1]), np.uint8)
        elif op == "d":
            ram[v[0]] = writer.popular[v[1]]
        elif op == "z":
            ram[v[0]] = 0
        elif op == "p":
            data = np.frombuffer(bytes.fromhex(rest[2]), np.uint8)
            ram[v[0], v[1]:v[1] + len(data)] = data
        elif op == "r":
            writer.rng = np.random.default_rng(v[1])
            writer.write(writer.pick(v[0]))
        elif op == "q":
            break
        print("ok", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="synthguest", description=__doc__)
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--hugetlb", action="store_true")
    p.add_argument("--shm", help="a file under /dev/shm instead of a memfd (unlinked at exit)")
    p.add_argument("--fill", type=float, default=0.5)
    p.add_argument("--rate", type=float, default=10000, help="pages/s, 0 = unpaced")
    p.add_argument("--pattern", choices=["uniform", "hot", "seq"], default="uniform")
    p.add_argument("--hot-fraction", type=float, default=0.1)
    p.add_argument("--hot-share", type=float, default=0.9)
    p.add_argument("--dup", type=float, default=0.0)
    p.add_argument("--popular", type=int, default=POPULAR,
                   help="how many distinct pages --dup writes draw from: many, and they leave "
                        "the guest's RAM and come back (gc's dangerous case)")
    p.add_argument("--zero", type=float, default=0.0)
    p.add_argument("--partial", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--report", help="append one JSON line of throughput per second")
    p.add_argument("--control", action="store_true", help="write what stdin commands say")
    args = p.parse_args(argv)

    mm, size = map_ram(args)
    ram = np.frombuffer(mm, np.uint8).reshape(size // PAGE, PAGE)
    writer = Writer(ram, args)
    if args.fill > 0:
        writer.write(writer.rng.permutation(len(ram))[:int(len(ram) * args.fill)])
    print(f"READY pid={os.getpid()} size={size}", flush=True)
    try:
        if args.control:
            control(ram, writer)
        else:
            run(writer, args)
    finally:
        if args.shm:
            os.unlink(args.shm)


def run(writer: Writer, args: argparse.Namespace) -> None:
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    report = open(args.report, "a") if args.report else None  # noqa: SIM115
    t0 = last = time.monotonic()
    total = since = 0
    step = 0.005
    while not stop and (not args.duration or time.monotonic() - t0 < args.duration):
        count = int(args.rate * step) if args.rate else 256
        idx = writer.pick(max(1, count))
        writer.write(idx)
        total += len(idx)
        since += len(idx)
        now = time.monotonic()
        if report and now - last >= 1:
            report.write(json.dumps({"t": time.time(), "pages": since,
                                     "pages_per_s": since / (now - last), "total": total}) + "\n")
            report.flush()
            last, since = now, 0
        if args.rate:
            time.sleep(max(0.0, t0 + total / args.rate - time.monotonic()))
    secs = time.monotonic() - t0
    print(json.dumps({"pages_total": total, "seconds": secs, "pages_per_s": total / secs}),
          flush=True)


if __name__ == "__main__":
    main()
