"""Which region handed over by QEMU's preload library is the machine's RAM.

The preload library hands over every large shared tmpfs mapping, in the order QEMU maps them: a
shared pc-dimm backend listed before the machine's backend comes first. Once QEMU's monitor
answers every backend is mapped (QEMU's main loop waits on each handoff), so the regions are
checked then against what QEMU itself says of its backends: exactly one, the machine's
`memory-backend=`, of its size, and for a file backend the very file of its mem-path. Any other
shared backend is refused too: x-ignore-shared leaves all shared RAM out of the device state,
so no checkpoint would hold it.
"""

from __future__ import annotations

import os
import stat

from vmckpt.engine.handoff import GuestRam
from vmckpt.engine.qemu.qmp import QemuError, Qmp


class RamMismatch(QemuError):
    """QEMU's RAM is not one shared region that vmckpt can checkpoint whole; one line."""


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _describe(ram: GuestRam) -> str:
    return f"{ram.path or 'a shared mapping'}, {_mib(ram.length)}"


def _same_file(ram: GuestRam, mem_path: str) -> bool:
    """The handed fd is mem-path, or (mem-path a directory) a file QEMU made and unlinked there."""
    try:
        want, got = os.stat(mem_path), os.fstat(ram.ramfd)
    except OSError:
        return False
    if stat.S_ISDIR(want.st_mode):
        return got.st_dev == want.st_dev and got.st_nlink == 0
    return (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)


async def _prop(qmp: Qmp, path: str, name: str) -> object:
    return await qmp.cmd("qom-get", path=path, property=name)


async def machine_ram(qmp: Qmp, handed: list[GuestRam]) -> GuestRam:
    """The one region of handed that is the machine's RAM backend; RamMismatch if the machine
    has no shared backend, has other shared backends, or handed holds anything else."""
    backend = str(await _prop(qmp, "/machine", "memory-backend") or "").rsplit("/", 1)[-1]
    if not backend:
        raise RamMismatch("the machine has no memory-backend=: vmckpt tracks guest RAM only in "
                          "a shared backend named by -machine memory-backend=ID")
    memdevs = {m["id"]: m for m in await qmp.cmd("query-memdev") if m.get("id")}
    mine = memdevs.get(backend)
    if mine is None or not mine["share"]:
        raise RamMismatch(f"the machine's RAM backend {backend} is not shared: add share=on")
    others = [f"{m['id']} ({_mib(m['size'])})" for m in memdevs.values()
              if m["share"] and m["id"] != backend]
    if others:
        raise RamMismatch(
            f"QEMU has shared RAM besides the machine's backend {backend}: "
            f"{', '.join(others)}; x-ignore-shared leaves shared RAM out of the device state "
            "and vmckpt tracks only the machine's, so no checkpoint would hold it: remove it "
            "or make it share=off")
    size, path = mine["size"], f"/objects/{backend}"
    kind = await _prop(qmp, path, "type")
    mem_path = str(await _prop(qmp, path, "mem-path")) if kind == "memory-backend-file" else ""

    def is_mine(ram: GuestRam) -> bool:
        if ram.length != size:
            return False
        if kind == "memory-backend-file":
            return _same_file(ram, mem_path)
        return ram.path.startswith("/memfd:")

    fits = [ram for ram in handed if is_mine(ram)]
    strays = [ram for ram in handed if not is_mine(ram)]
    if len(fits) != 1 or strays:
        got = "; ".join(_describe(r) for r in handed)
        raise RamMismatch(
            f"QEMU handed over shared RAM that is not only its machine's backend {backend} "
            f"({kind}, {_mib(size)}{', ' + mem_path if mem_path else ''}): {got}")
    return fits[0]
