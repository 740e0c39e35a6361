"""QEMU command lines: find the guest RAM backend, check it can be tracked, rewrite it.

vmckpt tracks guest RAM that QEMU maps shared from a memfd or a tmpfs file, and needs
`x-ignore-shared` to keep that RAM out of the device state: anything else is refused here, before
QEMU starts, with the options to use instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmckpt.engine.units import parse_size

TRACKED_FS = ("tmpfs", "hugetlbfs")
ADDED_ID = "vmckpt-ram"


class QemuArgsError(Exception):
    """The QEMU command line cannot be checkpointed (or restored) as given."""


def is_qemu(argv: Sequence[str]) -> bool:
    return Path(argv[0]).name.startswith("qemu-system")


def qemu_uses_terminal(argv: Sequence[str]) -> bool:
    """Whether QEMU talks to its terminal: a stdio chardev (-serial stdio, mon:stdio,
    -chardev stdio), -nographic, or a curses display."""
    return any(a in ("-nographic", "--nographic") or "stdio" in a or a.startswith("curses")
               for a in argv[1:])


def split_opts(text: str) -> list[str]:
    """QEMU's `a=b,c=d` option syntax (`,,` is a literal comma)."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def parse_opts(text: str, implied: str) -> dict[str, str]:
    """Options as a dict; a leading bare value is the `implied` key (`-machine pc` is type=pc)."""
    out: dict[str, str] = {}
    for n, part in enumerate(split_opts(text)):
        key, eq, value = part.partition("=")
        if not eq and n == 0:
            out[implied] = key
        elif eq:
            out[key] = value
    return out


def _qemu_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def is_json(text: str) -> bool:
    """Whether an option's value is in the JSON form (libvirt's) rather than key=value."""
    return text.lstrip().startswith("{")


def json_opts(text: str, flag: str) -> dict | None:
    """A JSON option value as a dict (None if it is not a JSON object)."""
    try:
        parsed = json.loads(text)
    except ValueError as e:
        raise QemuArgsError(f"-{flag} {text} is not valid JSON: {e}") from None
    return parsed if isinstance(parsed, dict) else None


def any_opts(text: str, implied: str, flag: str) -> dict[str, str]:
    """An option's value from `IMPLIED,k=v,...` or its JSON form (`{"IMPLIED": ..., "k": v}`);
    values as QEMU would spell them on a command line."""
    if is_json(text) and (parsed := json_opts(text, flag)) is not None:
        return {str(k): _qemu_value(v) for k, v in parsed.items()}
    return parse_opts(text, implied)


def object_opts(text: str) -> dict[str, str]:
    """An -object's options, from `TYPE,k=v,...` or the JSON form libvirt writes
    (`{"qom-type": TYPE, "k": v, ...}`)."""
    return any_opts(text, "qom-type", "object")


def is_on(value: str) -> bool:
    """QEMU's spelling of a true boolean option."""
    return value.lower() in ("on", "yes", "true", "y")


def join_opts(opts: dict[str, str], implied: str) -> str:
    items = [opts[implied].replace(",", ",,")] if implied in opts else []
    items += [f"{k}={v.replace(',', ',,')}" for k, v in opts.items() if k != implied]
    return ",".join(items)


def option_values(argv: Sequence[str], *names: str) -> list[tuple[int, str]]:
    """(index of the value, value) of every `-name value` / `--name value` / `-name=value`."""
    found = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and flag in names:
            if eq:
                found.append((i, value))
            elif i + 1 < len(argv):
                found.append((i + 1, argv[i + 1]))
    return found


def _fs_type(path: str) -> str | None:
    """The filesystem a path is on, by the longest matching mount point."""
    best, fstype = "", None
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _dev, mnt, fs, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, fs
    return fstype


@dataclass
class RamBackend:
    index: int             # argv index of the -object value
    opts: dict[str, str]   # its options; opts["qom-type"] is the backend type
    size: int


def _howto(size: str = "SIZE") -> str:
    return (f"-object memory-backend-memfd,id=mem0,size={size},share=on "
            "-machine memory-backend=mem0 (or memory-backend-file,id=mem0,size="
            f"{size},mem-path=/dev/shm/NAME,share=on)")


def find_ram_backend(argv: Sequence[str]) -> RamBackend:
    """The memory backend the machine uses for guest RAM; refuses one vmckpt cannot track."""
    machine: dict[str, str] = {}
    for _, value in option_values(argv, "machine", "M"):
        machine.update(parse_opts(value, "type"))
    mem = option_values(argv, "m")
    size_hint = parse_opts(mem[-1][1], "size").get("size", "SIZE") if mem else "SIZE"
    if size_hint.isdigit():
        size_hint += "M"
    backend_id = machine.get("memory-backend")
    if not backend_id:
        raise QemuArgsError(
            "guest RAM must be a shared memory backend that vmckpt can track; add "
            f"{_howto(size_hint)}, or pass --add-memory-backend to let vmckpt add a memfd "
            "backend for -m")
    for index, value in option_values(argv, "object"):
        opts = object_opts(value)
        if opts.get("id") != backend_id:
            continue
        kind = opts.get("qom-type")
        if kind not in ("memory-backend-memfd", "memory-backend-file"):
            raise QemuArgsError(f"memory backend {backend_id} is {kind}; vmckpt tracks "
                                f"memory-backend-memfd or a tmpfs memory-backend-file: use "
                                f"{_howto(size_hint)}")
        # QEMU shares a memfd backend unless told share=off; a file backend only with share=on.
        if not is_on(opts.get("share", "on" if kind == "memory-backend-memfd" else "off")):
            raise QemuArgsError(f"memory backend {backend_id} must be shared: add share=on "
                                f"to its -object ({_howto(size_hint)})")
        if kind == "memory-backend-file":
            fs = _fs_type(opts.get("mem-path", "/"))
            if fs not in TRACKED_FS:
                raise QemuArgsError(
                    f"memory backend {backend_id} is a file on {fs}, not on tmpfs: put "
                    "mem-path under /dev/shm, or use memory-backend-memfd")
        if "size" not in opts:
            raise QemuArgsError(f"memory backend {backend_id} has no size=")
        try:
            return RamBackend(index, opts, parse_size(opts["size"]))
        except ValueError as e:
            raise QemuArgsError(f"memory backend {backend_id}: size={opts['size']}: {e}") from None
    raise QemuArgsError(f"-machine memory-backend={backend_id} names no -object with "
                        f"id={backend_id}")


def add_memory_backend(argv: Sequence[str]) -> list[str]:
    """`-m SIZE` without a backend becomes a shared memfd backend of that size."""
    mem = option_values(argv, "m")
    if not mem:
        raise QemuArgsError("--add-memory-backend needs -m SIZE to know the RAM size")
    size = parse_opts(mem[-1][1], "size")["size"]
    if size.isdigit():
        size += "M"
    return [*argv, "-object", f"memory-backend-memfd,id={ADDED_ID},size={size},share=on",
            "-machine", f"memory-backend={ADDED_ID}"]


def with_qmp(argv: Sequence[str], path: str | os.PathLike[str]) -> list[str]:
    """The engine's own QMP monitor (QMP takes one client at a time; user monitors stay)."""
    return [*argv, "-qmp", f"unix:{path},server=on,wait=off"]


DEVICES_ONLY = "devices-only"  # a record's device_state_via: QEMU's xen-save-devices-state

# A devices-only state (engine/qemu/qmp.py: save_devices_only) has neither the configuration
# section a migration stream opens with nor the description it ends with: the restoring QEMU is
# told not to expect them.
DEVICES_ONLY_LOAD = ["-global", "migration.send-configuration=off",
                     "-machine", "suppress-vmdesc=on"]


def for_restore(argv: Sequence[str], image: str | os.PathLike[str], record: dict) -> list[str]:
    """argv with its RAM backend replaced by the shared image file, waiting for the device
    state of the checkpoint record."""
    ram_size = record["ram_size"]
    out = list(argv)
    try:
        backend = find_ram_backend(out)
    except QemuArgsError:
        out = add_memory_backend(out)
        backend = find_ram_backend(out)
    if backend.size != ram_size:
        raise QemuArgsError(f"the checkpoint has {ram_size >> 20} MiB of guest RAM, the "
                            f"command line {backend.size >> 20} MiB: give QEMU the same -m "
                            "and backend size")
    opts = {"qom-type": "memory-backend-file", "id": backend.opts["id"],
            "size": str(ram_size), "mem-path": str(image), "share": "on"}
    out[backend.index] = join_opts(opts, "qom-type")
    if record.get("device_state_via") == DEVICES_ONLY:
        out += DEVICES_ONLY_LOAD
    # -S: QEMU stays paused after loading, so vmckpt decides when the guest continues.
    return [*out, "-incoming", "defer", "-S"]
