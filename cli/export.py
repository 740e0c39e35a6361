"""`vmckpt export`: a checkpoint written out of the store, with a manifest saying how to start
QEMU from it. --json output is documented in docs/json-schema.md."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click
from vmckpt.cli.main import _fail, main, store_option
from vmckpt.cli.text import checkpoint_arg, emit_json, json_option, json_safe, reading, size_text
from vmckpt.engine.qemu.argv import QemuArgsError, for_restore
from vmckpt.engine.qemu.restore_disks import Image, point_drives
from vmckpt.storage.inspect import Export, export_checkpoint
from vmckpt.storage.private import write_private


def without_qmp(argv: list[str]) -> list[str]:
    """argv without its QMP monitors: the engine's (its socket is gone) and any that vmckpt
    serve owned; the export's hint adds its own."""
    out, skip = [], False
    for arg in argv:
        flag = arg.lstrip("-") if arg.startswith("-") else ""
        if skip:
            skip = False
        elif flag == "qmp":
            skip = True
        elif not flag.startswith("qmp="):
            out.append(arg)
    return out


def qemu_hint(argv: list[str], done: Export, out: Path) -> dict:
    """How to start a QEMU from the export by hand (what `vmckpt restore` does by itself)."""
    assert done.device_state is not None
    qmp = out / "qmp.sock"
    disks = {device: Image(path, "raw") for device, (path, _) in done.disks.items()}
    argv = without_qmp(argv)
    qemu_argv = [*for_restore(point_drives(argv, done.record, disks) if disks else argv,
                              done.ram_image, done.record),
                 "-qmp", f"unix:{qmp},server=on,wait=off"]
    uri = f"exec:cat {shlex.quote(str(done.device_state))}"
    return {
        "argv": qemu_argv,
        "command": shlex.join(qemu_argv),
        "qmp_socket": str(qmp),
        "qmp_commands": [
            {"execute": "qmp_capabilities"},
            {"execute": "migrate-set-capabilities", "arguments": {
                "capabilities": [{"capability": "x-ignore-shared", "state": True}]}},
            {"execute": "migrate-incoming", "arguments": {"uri": uri}},
            {"execute": "cont"},
        ],
        "hmp_commands": ["migrate_set_capability x-ignore-shared on",
                         f"migrate_incoming {json.dumps(uri)}", "cont"],
        "howto": "Start QEMU with argv: it waits, paused, for its device state (-incoming "
                 "defer -S; guest RAM is ram.img, shared; its disks open the disk-*.img "
                 "beside it, which it writes). Send qmp_commands in order on "
                 "qmp_socket, and cont only once query-migrate says \"completed\" (the "
                 "loaded state is 'paused', so an earlier cont is lost). x-ignore-shared must "
                 "be on before the state loads, which is why -incoming exec:... on the "
                 "command line does not work. ram.img must stay while QEMU runs. `vmckpt "
                 "restore CKPT -- ARGV...` does all of this itself.",
    }


@main.command()
@store_option
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for ram.img, device-state.bin and manifest.json (made if "
                   "absent).")
@json_option
@click.argument("ckpt")
def export(store_path: Path, out_dir: Path, as_json: bool, ckpt: str) -> None:
    """Write checkpoint CKPT (an id, or 'latest') out of the store: its RAM as a sparse image,
    its device state, and a manifest saying how to start QEMU from them."""
    which = checkpoint_arg(ckpt, store_path)
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"{out_dir} exists and is not a directory")
    out = out_dir.resolve()
    with reading(store_path) as store:
        try:
            done = export_checkpoint(store, which, out)
        except OSError as e:
            _fail(f"cannot write into {out}: {e.strerror}")
    rec, target = done.record, done.record.get("target") or {}
    try:
        hint = qemu_hint(target["argv"], done, out) if done.device_state and \
            target.get("kind") == "qemu" else None
    except QemuArgsError as e:
        _fail(f"checkpoint {rec['id']}: {e}")
    manifest = {
        "checkpoint": rec["id"], "parent": rec.get("parent"), "time": rec["time"],
        "ram_size": rec["ram_size"], "page_size": rec["page_size"],
        "ram_image": str(done.ram_image), "ram_pages": done.restore.pages,
        "device_state": str(done.device_state) if done.device_state else None,
        "device_state_size": rec["device_state"]["size"] if done.device_state else None,
        "disks": [{"device": d["device"], "image": str(done.disks[d["device"]][0]),
                   "size": d["size"], "format": "raw",
                   "blocks": done.disks[d["device"]][1].pages} for d in rec.get("disks") or ()],
        "disks_not_captured": rec.get("disks_not_captured") or [],
        "target": target, "qemu": hint,
    }
    text = json.dumps(json_safe(manifest), indent=1) + "\n"
    write_private(out / "manifest.json", text.encode())
    if as_json:
        emit_json(manifest)
        return
    click.echo(f"checkpoint {rec['id']} exported into {out}:")
    click.echo(f"  ram.img           {size_text(rec['ram_size'])}, {done.restore.pages} pages "
               "of data (sparse: zero pages are holes)")
    for d in manifest["disks"]:
        click.echo(f"  {Path(d['image']).name:<17} {size_text(d['size'])}, {d['blocks']} "
                   f"blocks of data: disk {d['device']} (raw, sparse)")
    if done.device_state:
        click.echo(f"  device-state.bin  {size_text(rec['device_state']['size'])}")
    click.echo("  manifest.json")
    if hint:
        click.echo("start QEMU with:\n  " + hint["command"])
        click.echo(f"then on its QMP socket {hint['qmp_socket']}, in order (cont once "
                   "query-migrate says completed):")
        for cmd in hint["qmp_commands"]:
            click.echo("  " + json.dumps(cmd))
