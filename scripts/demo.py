"""The main job, end to end: the test guest, with a 64 MiB virtio disk it writes its tick to
every 0.5 s, under `vmckpt run` (1 s interval, 20 checkpoints), a middle checkpoint restored
(RAM and disk) into a new QEMU whose counter goes on from where it was and which finds no disk
write from after its checkpoint, then the checkpoint table, the store's figures, a full check
and a plot. Uses only the `vmckpt` command, like a user would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vmckpt.engine.qemu.testguest import qemu_argv, ticks

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))


def stamped(proc: subprocess.Popen, label: str, out: list[tuple[float, bytes]]) -> None:
    """Collects proc's stdout lines with their arrival time, and shows the guest's ticks."""
    assert proc.stdout
    for line in proc.stdout:
        out.append((time.time(), line))
        if b"VMCKPT-TICK" in line:
            print(f"  {label} | {line.decode().strip()}", flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vmckpt-demo-"))
    store, disk = work / "store", work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    argv = qemu_argv(mem="256M", work="dirty", rate=2000,
                     disk=f"file={disk},format=raw,cache=none")
    print(f"== vmckpt run: the test guest (256 MiB, TCG, a 64 MiB disk) checkpointed every 1 s "
          f"into {store}")
    lines: list[tuple[float, bytes]] = []
    run = subprocess.Popen([VMCKPT, "run", "--store", str(store), "--interval", "1s",
                            "--max-checkpoints", "20", "--", *argv], stdout=subprocess.PIPE)
    reader = threading.Thread(target=stamped, args=(run, "guest   ", lines))
    reader.start()
    if run.wait() != 0:
        return run.returncode
    reader.join()

    records = json.loads(subprocess.run([VMCKPT, "ls", "--store", str(store), "--json"],
                                        check=True, capture_output=True).stdout)
    def tick_at(rec: dict) -> int:
        before = [t for stamp, line in lines if stamp < rec["time"] for t, _ in ticks(line)]
        return before[-1] if before else 0

    # The middle one of those taken once the guest counted (its boot time varies).
    counting = [r for r in records if tick_at(r) >= 1] or records
    mid = counting[len(counting) // 2]
    at = tick_at(mid)
    print(f"\n== vmckpt restore {mid['id']}: the guest had printed tick {at} when checkpoint "
          f"{mid['id']} was taken")
    restored: list[tuple[float, bytes]] = []
    rest = subprocess.Popen([VMCKPT, "restore", "--store", str(store), str(mid["id"]),
                             "--disk-dir", str(work), "--", *argv], stdout=subprocess.PIPE)
    threading.Thread(target=stamped, args=(rest, "restored"), kwargs={"out": restored},
                     daemon=True).start()
    deadline = time.monotonic() + 60
    while sum(len(ticks(line)) for _, line in restored) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    rest.send_signal(signal.SIGINT)  # stops the restored VM cleanly
    rest.wait(timeout=30)
    got = [t for _, line in restored for t, _ in ticks(line)]
    ok = bool(got) and abs(got[0] - (at + 1)) <= 1
    print(f"   restored guest's first tick: {got[0] if got else None} (expected {at + 1}): "
          f"{'the counter continues' if ok else 'MISMATCH'}")
    # Its disk is the checkpoint's: the next block it reads was never written in its past.
    disk_ok = bool(got) and all(b"disk=ok" in line for _, line in restored
                                if b"VMCKPT-TICK" in line)
    said = ("as at the checkpoint, no write from its future" if disk_ok else
            "MISMATCH: it read a write from after its checkpoint")
    print(f"   restored guest's disk: {said}")
    ok = ok and disk_ok

    for args in (["ls"], ["stats"], ["check", "--read-data"],
                 ["plot", "-o", str(store.parent / "plot.png")]):
        print(f"\n== vmckpt {' '.join(args)}")
        subprocess.run([VMCKPT, *args, "--store", str(store)], check=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
