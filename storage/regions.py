"""Where a checkpoint's data sits in its one page map: guest RAM's frames first, then each
captured disk's 4 KiB blocks, one after another. Disk blocks and RAM pages share the map and the
content-addressed store, so a block that is also in the guest's page cache is stored once."""

from __future__ import annotations

import re
from dataclasses import dataclass

PAGE = 4096


@dataclass(frozen=True)
class Region:
    name: str   # "ram", or the disk's device id
    first: int  # its first frame in the map
    pages: int  # frames it spans
    size: int   # bytes (a disk's last block may be partial)

    def frames(self) -> range:
        return range(self.first, self.first + self.pages)


def ram_region(record: dict) -> Region:
    return Region("ram", 0, record["ram_size"] // PAGE, record["ram_size"])


def disk_regions(record: dict) -> list[Region]:
    """The checkpoint's captured disks, in the order its record lists them."""
    return [Region(d["device"], d["first"], -(-d["size"] // PAGE), d["size"])
            for d in record.get("disks", ())]


def regions(record: dict) -> list[Region]:
    return [ram_region(record), *disk_regions(record)]


def map_pages(record: dict) -> int:
    """Frames the checkpoint's map covers."""
    return max(r.first + r.pages for r in regions(record))


def place_disks(ram_size: int, disks: list[dict]) -> list[dict]:
    """The disks' records with their first frame: after RAM, one after another."""
    first, out = ram_size // PAGE, []
    for d in disks:
        out.append({**d, "first": first})
        first += -(-d["size"] // PAGE)
    return out


def region_named(record: dict, name: str) -> Region:
    for r in regions(record):
        if r.name == name:
            return r
    names = ", ".join(r.name for r in disk_regions(record)) or "none"
    raise KeyError(f"checkpoint {record.get('id')} has no disk {name!r} (its disks: {names})")


def disk_file_name(device: str) -> str:
    """A disk's device as part of a file name (a qdev path has slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device).strip("_") or "disk"
