"""The VM's disks as QEMU sees them: every writable block node behind a guest device, which a
checkpoint must capture at its pause, and the drives it leaves alone (and why)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vmckpt.engine.qemu.argv import is_on, option_values, parse_opts
from vmckpt.engine.qemu.qmp import Qmp

# -drive interfaces with several units a bus (QEMU's if_max_devs); the others have one bus.
MAX_DEVS = {"ide": 2, "scsi": 7}
DEFAULT_IF = "ide"  # pc and q35 (block_default_type)


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
    drives = [parse_opts(text, "") for _, text in option_values(argv, "drive")]
    return everything, {name for opts, name in zip(drives, drive_names(drives), strict=True)
                        if is_on(opts.get("snapshot", "off"))}


def drive_names(drives: list[dict[str, str]]) -> list[str]:
    """query-block's device name of every -drive, in order: its id, or the name QEMU makes
    from its interface, bus and unit (blockdev.c: drive_new)."""
    taken: dict[str, set[tuple[int, int]]] = {}
    names = []
    for opts in drives:
        iface = opts.get("if", DEFAULT_IF)
        most = MAX_DEVS.get(iface, 0)
        bus, unit = int(opts.get("bus", 0)), int(opts["unit"]) if "unit" in opts else None
        if "index" in opts:
            index = int(opts["index"])
            bus, unit = (index // most, index % most) if most else (0, index)
        used = taken.setdefault(iface, set())
        if unit is None:
            unit = 0
            while (bus, unit) in used:
                unit += 1
                if most and unit >= most:
                    unit, bus = unit - most, bus + 1
        used.add((bus, unit))
        media = ("-cd" if opts.get("media") == "cdrom" else "-hd") \
            if iface in ("ide", "scsi") else ""
        names.append(opts.get("id") or (f"{iface}{bus}{media}{unit}" if most
                                        else f"{iface}{media}{unit}"))
    return names


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
