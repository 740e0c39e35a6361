"""The test guest (guest/: Debian kernel + busybox initramfs with a tick counter and a memory
workload) as QEMU command lines, for tests, benchmarks and the demo."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

BUILD = Path(__file__).with_name("guest") / "build.sh"
TICK = re.compile(rb"VMCKPT-TICK (\d+) pages=(\d+)")


@functools.cache
def guest_dir() -> Path:
    """Builds the guest once (cached under ~/.cache/vmckpt/guest); returns its directory."""
    out = subprocess.run(["bash", str(BUILD)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def qemu_argv(*, mem: str = "256M", work: str = "idle", rate: int = 2000, mb: int = 32,
              ticks: int = 0, serial: str = "stdio", accel: str = "tcg",
              backend: str = "memfd", disk: str | None = None) -> list[str]:
    """A QEMU command line booting the test guest with its RAM on a shared memfd (or with
    backend="none", plain -m; or a path: a shared file there). With disk (a -drive's
    options, e.g. "file=d.raw,format=raw"), a virtio disk the guest writes its ticks to."""
    g = guest_dir()
    argv = ["qemu-system-x86_64", "-accel", accel, "-m", mem, "-nodefaults", "-vga", "none",
            "-display", "none", "-serial", serial, "-kernel", str(g / "vmlinuz"),
            "-initrd", str(g / "initramfs.cpio.gz"), "-append",
            f"console=ttyS0 quiet vmckpt.work={work} vmckpt.rate={rate} vmckpt.mb={mb} "
            f"vmckpt.ticks={ticks}" + (" vmckpt.disk=1" if disk else "")]
    if disk:
        argv += ["-drive", f"{disk},if=virtio"]
    if backend == "memfd":
        argv += ["-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
                 "-machine", "pc,memory-backend=mem0"]
    elif backend != "none":
        argv += ["-object", f"memory-backend-file,id=mem0,size={mem},mem-path={backend},"
                 "share=on", "-machine", "pc,memory-backend=mem0"]
    return argv


def ticks(output: bytes) -> list[tuple[int, int]]:
    """(tick, pages written) of every tick line in the guest's serial output."""
    return [(int(t), int(p)) for t, p in TICK.findall(output)]
