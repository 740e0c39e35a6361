"""Maintenance (prune, gc) of a store, run where the store is open for writing: by the CLI
itself, or, while an engine holds the store (RocksDB lets one process write), by the engine on
its control socket, a Unix socket in the store directory. One JSON line each way: the request
{"op": "prune" | "gc", "dry_run": bool, "policy": {...}}, then {"result": {...}} or
{"error": "one line"}."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vmckpt.engine.peers import bind_private, peer_credentials, refusal
from vmckpt.storage import PageStore, StoreError
from vmckpt.storage.gc import collect_garbage
from vmckpt.storage.prune import Policy, prune

log = logging.getLogger("vmckpt")


class ControlError(Exception):
    """The engine could not do what was asked; str() is one line."""


class NoEngine(ControlError):
    """No engine answers on the control socket."""


def perform(store: PageStore, request: dict, *, engine_parent: int | None = None,
            engine_running: bool = False) -> dict:
    """Runs one maintenance request on store. While an engine runs, a prune keeps the
    checkpoint the engine continues from (engine_parent, or the newest if it just committed
    one and has not yet taken it as its parent)."""
    dry_run = bool(request.get("dry_run"))
    if request.get("op") == "gc":
        return asdict(collect_garbage(store, dry_run=dry_run))
    if request.get("op") == "prune":
        policy = Policy(**request.get("policy", {}),
                        keep_ids=() if engine_parent is None else (engine_parent,),
                        keep_newest=engine_running)
        return asdict(prune(store, policy, dry_run=dry_run))
    raise ControlError(f"unknown request {request.get('op')!r}")


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """path, or the same place by a name short enough for a Unix socket address (108 bytes)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """The engine's side: runs each request in a thread so that the engine's cycle goes on
    (the store's own locks make prune and gc safe against its puts and commits, and run one
    at a time)."""

    def __init__(self, store: PageStore, path: Path, parent: Callable[[], int | None]) -> None:
        self.store, self.path, self.parent = store, path, parent
        self.server: asyncio.AbstractServer | None = None
        self.serving: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, store: PageStore, parent: Callable[[], int | None]
                    ) -> ControlServer | None:
        """Serves on the store's control socket; None (and a warning) if it cannot: the
        engine runs on without it."""
        path = store.control_socket()
        if path is None:
            return None
        self = cls(store, path, parent)
        sock = socket.socket(socket.AF_UNIX)
        try:
            path.unlink(missing_ok=True)  # a stale one: we hold the store, nobody serves it
            with _short(path) as where:
                bind_private(sock, where)  # 0600 from birth: no window for other users
            sock.listen(8)
            self.server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as e:
            sock.close()
            log.warning("no control socket at %s (%s): prune and gc cannot reach this engine",
                        path, e.strerror)
            return None
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)
        pid, uid = peer_credentials(writer.get_extra_info("socket"))
        try:
            line = await reader.readline()  # read first: a refusal is then the answer to it
            if why := refusal(uid):
                log.warning("refused a control request from pid %d: %s", pid, why)
                raise ControlError(f"the engine refuses this request: {why}")
            request = json.loads(line)
            reply = {"result": await asyncio.to_thread(
                perform, self.store, request, engine_parent=self.parent(), engine_running=True)}
        except (StoreError, ControlError) as e:
            reply = {"error": str(e)}
        except Exception as e:  # the engine goes on; the client says what happened
            log.exception("control request failed")
            reply = {"error": f"the engine failed to do it: {type(e).__name__}: {e}"}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def close(self) -> None:
        """Stops serving; a request in flight is finished first (the store closes next)."""
        if self.server:
            self.server.close()
            await asyncio.gather(*self.serving, return_exceptions=True)
            self.path.unlink(missing_ok=True)


def ask_engine(path: Path, request: dict) -> dict[str, Any]:
    """The client's side: sends request to the engine serving the control socket at path and
    waits for its result (a gc of a large store takes as long as it takes)."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            with _short(path) as where:
                sock.connect(where)
        except PermissionError:
            raise ControlError(f"the engine's control socket {path} is not yours: run this "
                               "as the user the engine runs as (or root)") from None
        except OSError as e:
            raise NoEngine(f"no engine answers on {path} ({e.strerror})") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise ControlError(f"the engine on {path} stopped before answering")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply["result"]
