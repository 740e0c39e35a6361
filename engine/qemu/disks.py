"""The VM's disks as QEMU sees them: every writable block node behind a guest device, which a
checkpoint must capture at its pause, and the drives it leaves alone (and why)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vmckpt.engine.qemu.argv import is_on, option_values, parse_opts
from vmckpt.engine.qemu.qmp import Qmp


@dataclass(frozen=True)
class Disk:
    device: str  # the guest device's drive name (query-block "device", or its qdev id)
    node: str    # the top block node the guest writes through
    size: int    # virtual size, bytes
    format: str  # the top node's driver (raw, qcow2, ...)
    file: str    # what QEMU opened (a path, or json:{...} for a composed node)

    def as_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    device: str
    why: str  # "read-only", "no medium", "temporary (snapshot=on)"


def temporary_drives(argv: Sequence[str]) -> tuple[bool, set[str]]:
    """Whether -snapshot makes every drive temporary, and the ids of -drive …,snapshot=on:
    their writes go to a throw-away overlay, never to the image."""
    everything = "-snapshot" in argv or "--snapshot" in argv
    ids = set()
    for _, text in option_values(argv, "drive"):
        opts = parse_opts(text, "file")
        if is_on(opts.get("snapshot", "off")) and "id" in opts:
            ids.add(opts["id"])
    return everything, ids


async def find_disks(qmp: Qmp, argv: Sequence[str]) -> tuple[list[Disk], list[Skipped]]:
    """The writable disks to capture, and the drives skipped, in QEMU's order."""
    every_temp, temp_ids = temporary_drives(argv)
    disks, skipped = [], []
    for block in await qmp.cmd("query-block"):
        device = block.get("device") or block.get("qdev", "?")
        inserted = block.get("inserted")
        if not inserted:
            skipped.append(Skipped(device, "no medium"))
        elif inserted.get("ro"):
            skipped.append(Skipped(device, "read-only"))
        elif every_temp or device in temp_ids:
            skipped.append(Skipped(device, "temporary (snapshot=on)"))
        else:
            image = inserted.get("image", {})
            disks.append(Disk(device, inserted["node-name"], int(image["virtual-size"]),
                              inserted["drv"], inserted["file"]))
    return disks, skipped
