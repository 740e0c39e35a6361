"""A checkpoint's disks brought back: each written into a new sparse image (raw or qcow2), and
the user's QEMU command line pointed at those instead of its own images, which are never
opened for writing. A command line whose disks are not the checkpoint's is refused first, with
the exact difference.

The drives are found as QEMU names them (query-block's device: a -drive's id, or the name QEMU
gives one without; a -blockdev's -device id), matched to the record's disks by the file they
open, else by device id or node name, else in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmckpt.engine.qemu.argv import (
    QemuArgsError,
    any_opts,
    is_json,
    is_on,
    join_opts,
    json_opts,
    option_values,
    parse_opts,
)
from vmckpt.engine.qemu.disks import drive_names, temporary_drives
from vmckpt.storage import PageStore, restore_image
from vmckpt.storage.regions import disk_file_name

FORMATS = ("raw", "qcow2")
# Options that tie a node to its old image: the new one is a flat file of its own.
IMAGE_KEY = re.compile(r"(file|format|driver|backing|data-file|encrypt|encryption)(\.|$)")
# Options any node or -drive takes, whatever its format (the others are the old format's own).
GENERIC_KEY = re.compile(
    r"(if|bus|unit|index|media|id|node-name|cyls|heads|secs|trans|addr|serial|snapshot|cache|"
    r"aio|rerror|werror|readonly|read-only|auto-read-only|force-share|copy-on-read|discard|"
    r"detect-zeroes|group|throttling|stats-.*|bps.*|iops.*)(\.|$)")
CD_DEVICES = ("ide-cd", "scsi-cd")
# query-block names a virtio proxy device's disk by the path of its backend, not by its id.
VIRTIO_BACKEND = re.compile(r"/machine/peripheral/([^/]+)/virtio-backend")


class DiskMismatch(QemuArgsError):
    """The command line's disks are not the checkpoint's (count, device ids, sizes)."""


class DiskWriteError(Exception):
    """A disk image could not be written; nothing of it is left behind."""


@dataclass(frozen=True)
class Image:
    """A disk of a checkpoint written out: what the restored QEMU opens."""

    path: Path
    format: str


@dataclass
class Drive:
    """A writable disk on the command line."""

    index: int          # argv index of its value (a -blockdev: its top node's)
    blockdev: bool      # -blockdev (else -drive)
    device: str | None  # query-block's device for it, if the command line says
    node: str | None    # a -blockdev's node-name
    file: str | None    # the image file it opens
    spec: dict          # its node(s) as one nested dict (a -blockdev's children inlined)

    @property
    def name(self) -> str:
        return self.device or self.node or "?"


# ----------------------------------------------------------------- the command line's disks


def nest(flat: dict[str, str]) -> dict:
    """key=value options with dotted keys (file.filename=...) as nested dicts."""
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        at = out
        for part in path:
            at = at.setdefault(part, {})
        at[last] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, str) else json.dumps(value).strip('"')
    return out


def blockdev_tree(text: str) -> dict:
    if is_json(text) and (parsed := json_opts(text, "blockdev")) is not None:
        return parsed
    return nest(parse_opts(text, "driver"))


def blockdev_text(tree: dict, like: str) -> str:
    """tree written in the form of the option it replaces (JSON, or key=value)."""
    if is_json(like):
        return json.dumps(tree)
    return join_opts(flatten(tree), "")


def _inline(tree: dict, nodes: dict[str, dict], seen: frozenset[str] = frozenset()) -> dict:
    """tree with its children named by node-name replaced by their own trees."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, str) and value in nodes and key != "node-name" \
                and value not in seen:
            value = _inline(nodes[value], nodes, seen | {value})
        elif isinstance(value, dict):
            value = _inline(value, nodes, seen)
        out[key] = value
    return out


def image_file(tree: dict) -> str | None:
    """The file a node's chain opens: its own filename, or its file child's."""
    while isinstance(tree, dict):
        if isinstance(tree.get("filename"), str):
            return tree["filename"]
        tree = tree.get("file")  # type: ignore[assignment]
    return tree if isinstance(tree, str) else None


def _writable_drives(argv: Sequence[str], every_temp: bool, temp_ids: set[str]) -> list[Drive]:
    found = [(i, parse_opts(text, "")) for i, text in option_values(argv, "drive")]
    out = []
    for (index, opts), name in zip(found, drive_names([o for _, o in found]), strict=True):
        file = opts.get("file") or opts.get("file.filename")
        if not file or opts.get("media") == "cdrom" or every_temp or name in temp_ids \
                or is_on(opts.get("readonly", opts.get("read-only", "off"))):
            continue  # what query-block shows as read-only, no medium, or temporary
        spec = {"driver": opts.get("format"), "file": {"driver": "file", "filename": file}}
        out.append(Drive(index, False, name, opts.get("node-name"), file, spec))
    return out


def _writable_blockdevs(argv: Sequence[str], every_temp: bool) -> list[Drive]:
    found = [(i, blockdev_tree(text)) for i, text in option_values(argv, "blockdev")]
    nodes = {str(t["node-name"]): t for _, t in found if "node-name" in t}
    index = {str(t["node-name"]): i for i, t in found if "node-name" in t}
    out = []
    for _, text in option_values(argv, "device"):
        dev = any_opts(text, "driver", "device")
        node = dev.get("drive")
        if node not in nodes or every_temp or dev.get("driver") in CD_DEVICES or \
                is_on(str(nodes[node].get("read-only", "off"))):
            continue
        spec = _inline(nodes[node], nodes)
        out.append(Drive(index[node], True, dev.get("id"), node, image_file(spec), spec))
    return out


def writable_drives(argv: Sequence[str]) -> list[Drive]:
    """The command line's writable disks (those a checkpoint captures): -drive with a medium,
    not read-only, not snapshot=on; and -blockdev nodes a -device uses."""
    every_temp, temp_ids = temporary_drives(argv)
    return [*_writable_drives(argv, every_temp, temp_ids), *_writable_blockdevs(argv, every_temp)]


def drive_size(drive: Drive) -> int | None:
    """The virtual size of the image a drive opens (None if it cannot be read: it need not
    exist, the restore brings its own)."""
    # qemu-img info opens no backing file (and takes none as a child here).
    spec = {k: v for k, v in drive.spec.items() if v is not None and k != "backing"}
    target = f"json:{json.dumps(spec)}" if "driver" in spec else str(drive.file)
    try:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", target],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return int(json.loads(out.stdout)["virtual-size"])


# ------------------------------------------------------------------------------- matching


def _same_file(a: str | None, b: str | None) -> bool:
    return bool(a and b) and (a == b or os.path.realpath(a) == os.path.realpath(b))  # type: ignore[arg-type]


def device_id(device: str) -> str:
    """A disk's device as the command line names it (its -drive or -device id)."""
    m = VIRTIO_BACKEND.fullmatch(device)
    return m[1] if m else device


def _disk_text(disk: dict) -> str:
    return f"{disk['device']} ({disk['file']}, {disk['size']} bytes)"


def match_drives(argv: Sequence[str], record: dict, *, sizes: bool = True
                 ) -> list[tuple[dict, Drive]]:
    """(disk of the record, its drive on the command line) for every disk the checkpoint
    holds or left out (--no-disks); refuses (DiskMismatch, one line) a command line whose
    writable disks differ from the checkpoint's in count, device ids or (with sizes) size."""
    wanted = [*(record.get("disks") or ()), *(record.get("disks_not_captured") or ())]
    free = writable_drives(argv)
    given = [d.name for d in free]
    pairs: list[tuple[dict, Drive]] = []
    unmatched = []
    for disk in wanted:
        hit = next((d for d in free if _same_file(d.file, disk.get("file"))), None) or \
            next((d for d in free if device_id(disk["device"]) == d.device or
                  (d.node is not None and d.node == disk.get("node"))), None)
        if hit:
            free.remove(hit)
            pairs.append((disk, hit))
        else:
            unmatched.append(disk)
    for disk, drive in zip(list(unmatched), [d for d in free if d.device is None],
                           strict=False):
        unmatched.remove(disk)  # neither side names it but by its place
        free.remove(drive)
        pairs.append((disk, drive))
    problems = []
    for disk, drive in pairs:
        if drive.device is not None and drive.device != device_id(disk["device"]):
            problems.append(f"the checkpoint's disk {_disk_text(disk)} is {drive.device} on "
                            "the command line")
        size = drive_size(drive) if sizes else None
        if size is not None and size != disk["size"]:
            problems.append(f"disk {disk['device']} is {size} bytes on the command line "
                            f"({drive.file}), {disk['size']} in the checkpoint")
    problems += [f"the checkpoint's disk {_disk_text(d)} is not on the command line"
                 for d in unmatched]
    problems += [f"the command line's disk {d.name} ({d.file}) is not in the checkpoint"
                 for d in free]
    if problems:
        have = ", ".join(d["device"] for d in wanted) or "none"
        raise DiskMismatch(
            f"the command line's disks do not match checkpoint {record['id']}'s (it has "
            f"{len(wanted)}: {have}; the command line {len(given)}: "
            f"{', '.join(given) or 'none'}): " + "; ".join(problems))
    return pairs


# ------------------------------------------------------------------------------ rewriting


def _kept(opts: dict, same_format: bool) -> dict:
    """The options of a drive or node that still apply to its new flat image."""
    return {k: v for k, v in opts.items()
            if not IMAGE_KEY.match(k) and (same_format or GENERIC_KEY.match(k))}


def _references(value: object) -> set[str]:
    """Every string in an option tree: the node names it may refer to."""
    if isinstance(value, dict):
        return set().union(*map(_references, value.values())) if value else set()
    return {value} if isinstance(value, str) else set()


def point_drives(argv: Sequence[str], record: dict, images: dict[str, Image]) -> list[str]:
    """argv with each captured disk's drive opening its restored image (by device, as
    write_disks returns them) with that image's format, and nothing of the old image's chain
    (its backing files, its own file node) left on the command line."""
    out = list(argv)
    replaced: set[str] = set()  # node names the old -blockdev chains referred to
    for disk, drive in match_drives(argv, record, sizes=False):
        image = images.get(disk["device"])
        if image is None:  # not captured (--no-disks): the restore warns
            continue
        same = image.format == disk.get("format")
        if not drive.blockdev:
            opts = _kept(parse_opts(out[drive.index], ""), same)
            out[drive.index] = join_opts({"file": str(image.path), "format": image.format,
                                          **opts}, "")
            continue
        tree = blockdev_tree(out[drive.index])
        replaced |= _references(drive.spec)  # its whole chain, as inlined
        new = {"driver": image.format, "node-name": tree["node-name"], **_kept(tree, same),
               "file": {"driver": "file", "filename": str(image.path)}}
        out[drive.index] = blockdev_text(new, out[drive.index])
    return _without_orphans(out, replaced)


def _without_orphans(argv: list[str], replaced: set[str]) -> list[str]:
    """argv without the -blockdev nodes only the replaced chains used (their file nodes,
    backing images): nothing opens the user's old images any more."""
    while True:
        nodes = [(i, blockdev_tree(text)) for i, text in option_values(argv, "blockdev")]
        used = set().union(*(_references(any_opts(t, "driver", "device"))
                             for _, t in option_values(argv, "device")),
                           *(_references({k: v for k, v in t.items() if k != "node-name"})
                             for _, t in nodes))
        orphans = {i for i, t in nodes if t.get("node-name") in replaced - used}
        if not orphans:
            return argv
        # Drop each orphan's value and the -blockdev flag before it (or -blockdev=VALUE).
        argv = [a for i, a in enumerate(argv)
                if i not in orphans and not (i + 1 in orphans and a.lstrip("-") == "blockdev")]


# -------------------------------------------------------------------------------- writing


def write_disks(store: PageStore, record: dict, disk_dir: str | Path, fmt: str = "raw"
                ) -> dict[str, Image]:
    """Each disk of the checkpoint into a new sparse image in disk_dir (0600, an unpredictable
    name that nothing planted there can take over), by device; all of them are removed again
    if any fails or the restore is interrupted."""
    if fmt not in FORMATS:
        raise DiskWriteError(f"disk format {fmt!r}: vmckpt writes {' or '.join(FORMATS)}")
    made: dict[str, Image] = {}
    try:
        for disk in record.get("disks") or ():
            made[disk["device"]] = write_disk(store, record, disk["device"], disk_dir, fmt)
    except BaseException:
        for image in made.values():
            image.path.unlink(missing_ok=True)
        raise
    return made


def _new_file(disk_dir: str | Path, record: dict, device: str, suffix: str) -> tuple[int, Path]:
    try:
        fd, name = tempfile.mkstemp(prefix=f"vmckpt-{record['id']}-{disk_file_name(device)}-",
                                    suffix=suffix, dir=disk_dir)
    except OSError as e:
        raise DiskWriteError(f"cannot create the image of disk {device} in {disk_dir}: "
                             f"{e.strerror}") from None
    return fd, Path(name)


def write_disk(store: PageStore, record: dict, device: str, disk_dir: str | Path,
               fmt: str = "raw") -> Image:
    """One disk of the checkpoint into a new sparse image in disk_dir. qcow2: written raw
    first (sparse, beside it) and converted by qemu-img, which leaves zero blocks
    unallocated."""
    fd, raw = _new_file(disk_dir, record, device, ".raw")
    out = raw
    try:
        try:
            restore_image(store, record["id"], fd, disk=device, progress=False)
        finally:
            os.close(fd)
        if fmt == "qcow2":
            fd, out = _new_file(disk_dir, record, device, ".qcow2")
            os.close(fd)  # qemu-img writes it; the file keeps its 0600
            done = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                                   str(raw), str(out)], capture_output=True, text=True)
            raw.unlink()
            if done.returncode:
                raise DiskWriteError(f"qemu-img could not write disk {device} as qcow2: "
                                     f"{done.stderr.strip() or done.returncode}")
    except BaseException as e:
        for path in {raw, out}:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if isinstance(e, OSError):
            raise DiskWriteError(f"cannot write disk {device} of checkpoint {record['id']} "
                                 f"into {disk_dir}: {e.strerror}") from None
        if isinstance(e, KeyError):  # the record has no such disk
            raise DiskWriteError(str(e.args[0])) from None
        raise
    return Image(out, fmt)
