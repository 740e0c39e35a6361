"""Keeps a QEMU from staying paused, or fleeced, if the engine dies.

Run as its own session (a kill of the engine's process group spares it). The engine writes
`P` before it stops the guest and `R` after it resumed it (`S` once a pause found the guest
already stopped: the user's to continue); `F` once it fleeces the disks (engine/qemu/fleece.py)
and `C` once it has taken all of that away again. If the pipe closes after a `P` (the engine
died mid-pause), the keeper connects to the QMP socket the engine held and sends `cont`; after
an `F` with no `C`, it takes the engine's NBD exports, backup jobs, scratch nodes, bitmaps and
NBD server away, so that the VM runs on as if never checkpointed. Any other end of the pipe just
ends the keeper.

    python -m vmckpt.engine.qemu.keeper QMP_SOCKET QEMU_PID
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol
from vmckpt.engine.targets.base import pid_alive

# engine/qemu/fleece.py's names (not imported: the keeper stays small)
PREFIX = "vmckpt-"
SCRATCH_DIRS = "vmckpt-fleece-"


def clean(qmp: QEMUMonitorProtocol) -> None:
    """Every piece of a dead engine's disk capture, in the order QEMU lets them go."""
    def ours(name: object) -> bool:
        return isinstance(name, str) and name.startswith(PREFIX)

    def cmd(command: str, /, **args: object) -> Any:  # /: QMP has "name" arguments
        return qmp.cmd(command, **args)

    def drop(command: str, /, **args: object) -> None:
        """One piece away; one QEMU refuses (gone already) does not keep the rest."""
        with contextlib.suppress(ExecuteError):
            cmd(command, **args)

    for export in cmd("query-block-exports"):
        if ours(export["id"]):
            drop("block-export-del", id=export["id"], mode="hard")
    for job in cmd("query-block-jobs"):
        if ours(job["device"]):
            drop("block-job-cancel", device=job["device"], force=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            any(ours(j["device"]) for j in cmd("query-block-jobs"))
            or any(ours(e["id"]) for e in cmd("query-block-exports"))):
        time.sleep(0.01)
    dirs = set()
    for node in cmd("query-named-block-nodes", flat=True):
        if ours(node["node-name"]):
            drop("blockdev-del", **{"node-name": node["node-name"]})
            dirs.add(Path(node["file"]).parent)  # the engine's private scratch directory
    for node in cmd("query-named-block-nodes", flat=True):
        for bitmap in node.get("dirty-bitmaps", []):
            if ours(bitmap.get("name")):  # a job's own bitmaps have no name
                drop("block-dirty-bitmap-remove", node=node["node-name"], name=bitmap["name"])
    drop("nbd-server-stop")
    for d in dirs:
        if d.name.startswith(SCRATCH_DIRS):
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    qmp_path, pid = sys.argv[1], int(sys.argv[2])
    state, fleeced = b"R", False
    while chunk := os.read(0, 64):
        state = chunk[-1:]
        fleeced = (fleeced or b"F" in chunk) and not chunk.endswith(b"C")
    if state != b"P" and not fleeced:
        return
    for _ in range(100):  # QEMU frees the monitor once the engine's connection is gone
        if not pid_alive(pid):
            return
        try:
            qmp = QEMUMonitorProtocol(qmp_path)
            qmp.connect()
        except Exception:  # noqa: BLE001 (refused or not there yet: try again)
            time.sleep(0.1)
            continue
        try:
            if state == b"P":
                qmp.cmd("cont")  # first: the guest runs while the rest goes
            if fleeced:
                clean(qmp)
        finally:
            qmp.close()
        return


if __name__ == "__main__":
    main()
