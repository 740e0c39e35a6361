"""Keeps a QEMU from staying paused if the engine dies inside a pause.

Run as its own session (a kill of the engine's process group spares it). The engine writes
`P` before it stops the guest and `R` after it resumed it (`S` once a pause found the guest
already stopped: the user's to continue); if the pipe closes after a `P` (the engine died
mid-pause), the keeper connects to the QMP socket the engine held and sends `cont`. Any other
end of the pipe just ends the keeper.

    python -m vmckpt.engine.qemu.keeper QMP_SOCKET QEMU_PID
"""

from __future__ import annotations

import os
import sys
import time

from qemu.qmp.legacy import QEMUMonitorProtocol
from vmckpt.engine.targets.base import pid_alive


def main() -> None:
    qmp_path, pid = sys.argv[1], int(sys.argv[2])
    state = b"R"
    while chunk := os.read(0, 64):
        state = chunk[-1:]
    if state != b"P":
        return
    for _ in range(100):  # QEMU frees the monitor once the engine's connection is gone
        if not pid_alive(pid):
            return
        try:
            qmp = QEMUMonitorProtocol(qmp_path)
            qmp.connect()
            qmp.cmd("cont")
            qmp.close()
            return
        except Exception:  # noqa: BLE001 (refused or not there yet: try again)
            time.sleep(0.1)


if __name__ == "__main__":
    main()
