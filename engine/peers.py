"""Unix sockets only the engine's own user (or root) may use: born private, every peer checked.

The engine's sockets carry guest RAM (the handoff) and store maintenance (control): a socket
bound first and chmod'ed after leaves a window in which anyone may connect, so it is bound
under a umask that makes it 0600 from birth, and each connection's SO_PEERCRED is checked too
(the mode alone is lost to a later chmod, or a socket path inside a directory others control).
"""

from __future__ import annotations

import os
import socket
import struct

_PEERCRED = struct.Struct("3i")


def bind_private(sock: socket.socket, path: str) -> None:
    """Binds sock to path, created 0600 (the umask is the process's: other files created in
    this instant are only born more private)."""
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket."""
    pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def refusal(uid: int) -> str | None:
    """Why a peer of uid may not use the engine's sockets; None if it may (ours, or root)."""
    if uid in (os.geteuid(), 0):
        return None
    return f"uid {uid} is neither this engine's user (uid {os.geteuid()}) nor root"
