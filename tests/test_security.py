"""Who may use the engine's sockets: guest RAM goes only to a listener of the VMM's own user (or
root), the control and handoff sockets are born private and check their peers, and clients
that connect and say nothing never stall a checkpoint. Other users are real: child processes
that drop to `nobody` (tests run as root)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import pickle
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import is_root
from vmckpt.engine import handoff
from vmckpt.engine.control import ControlError, ControlServer, ask_engine
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.handoff import HandoffListener, preload_path
from vmckpt.engine.session import TrackedProgram, checkpoint_program
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

NOBODY, OTHER = 65534, 65533
pytestmark = pytest.mark.skipif(not is_root(), reason="other users need root to become")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter and write (tmp_path's parents are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="vmckpt-sec-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=True)


def as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """fn() in a forked child that became uid (no groups, no capabilities): its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out: Any = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 (told to the parent)
            out = ("raised", f"{type(e).__name__}: {e}")
        with os.fdopen(w, "wb") as f:
            pickle.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        kind, value = pickle.loads(f.read())
    os.waitpid(pid, 0)
    assert kind == "ok", value
    return value


# --- 7. the preload library hands guest RAM only to its own user or root -------------------

LISTENER = """
import json, os, socket, sys
os.umask(0)  # any user may connect: only the preload library's own check decides
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
s.settimeout(60)
c, _ = s.accept()
c.settimeout(60)
msg, fds, _, _ = socket.recv_fds(c, 4096, 8)
if fds:
    c.sendall(b"k")
for fd in fds:
    os.close(fd)
print(json.dumps({"fds": len(fds), "bytes": len(msg)}), flush=True)
"""

# A VMM in miniature: one shared 8 MiB memfd mapping, the kind the library hands over.
PROGRAM = """
import mmap, os
fd = os.memfd_create("guest-ram")
os.ftruncate(fd, 8 << 20)
m = mmap.mmap(fd, 8 << 20)
m[0] = 1
print("mapped", flush=True)
"""


def as_uid(uid: int) -> list[str]:
    """Runs a command as uid; with CAP_SYS_PTRACE, which a non-root user needs for a
    userfaultfd here (vm.unprivileged_userfaultfd is 0), but no other privilege."""
    if uid == 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace"]


@pytest.mark.parametrize(("program_uid", "listener_uid", "taken"), [
    (0, NOBODY, False),       # root's VMM, a listener of another user: nothing handed over
    (NOBODY, OTHER, False),   # two ordinary users
    (NOBODY, 0, True),        # a listener of root is trusted
    (NOBODY, NOBODY, True),   # the VMM's own user
])
def test_preload_hands_guest_ram_only_to_its_own_user_or_root(shared_dir, program_uid,
                                                               listener_uid, taken):
    sock = shared_dir / "engine.sock"
    listener = subprocess.Popen([*as_uid(listener_uid), sys.executable, "-c", LISTENER,
                                 str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout and listener.stdout.readline() == "listening\n"
        env = {**os.environ, "LD_PRELOAD": str(preload_path()), "VMCKPT_SOCKET": str(sock),
               "VMCKPT_MIN_BYTES": str(4 << 20)}
        prog = subprocess.run([*as_uid(program_uid), sys.executable, "-c", PROGRAM], env=env,
                              capture_output=True, text=True, timeout=60)
        got = json.loads(listener.stdout.readline())
    finally:
        listener.kill()
        listener.wait()
    assert prog.returncode == 0 and prog.stdout == "mapped\n", prog.stderr  # runs on either way
    if taken:
        assert got["fds"] >= 2 and prog.stderr == "", (got, prog.stderr)
    else:
        assert got == {"fds": 0, "bytes": 0}  # not even the message: the uffd and RAM stay home
        assert prog.stderr.count("vmckpt-preload:") == 1, prog.stderr
        assert (f"the listener on {sock} is uid {listener_uid}, neither this process's user "
                "nor root: guest RAM not handed over, it runs untracked") in prog.stderr


SIGNALLED = """
import mmap, os, signal
signal.signal(signal.SIGUSR1, lambda *_: None)  # interrupts system calls (no SA_RESTART)
fd = os.memfd_create("guest-ram")
os.ftruncate(fd, 8 << 20)
m = mmap.mmap(fd, 8 << 20)
print("mapped", flush=True)
"""


def _blocked_in_read(pid: int) -> bool:
    return Path(f"/proc/{pid}/syscall").read_text().startswith("0 ")  # x86-64 read


def _signal_pending(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd",
                                                                               "ShdPnd"))]
    return any(mask & (1 << (sig - 1)) for mask in pending)


def _until(cond: Callable[[], bool]) -> None:
    for _ in range(60_000):  # a bound, not a measure: each turn is a look at /proc
        if cond():
            return
        time.sleep(0.001)
    raise AssertionError("the program never got there")


def test_a_signal_while_the_vmm_waits_for_the_engine_does_not_lose_the_handoff(shared_dir):
    # QEMU's main thread takes signals while it starts: one that lands while the library waits
    # for the engine's answer made it give up, though the engine held the fds by then.
    sock = shared_dir / "engine.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen(1)
        env = {**os.environ, "LD_PRELOAD": str(preload_path()), "VMCKPT_SOCKET": str(sock),
               "VMCKPT_MIN_BYTES": str(4 << 20)}
        prog = subprocess.Popen([sys.executable, "-c", SIGNALLED], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn:
                _msg, fds, _, _ = socket.recv_fds(conn, 4096, 8)
                for fd in fds:
                    os.close(fd)
                _until(lambda: _blocked_in_read(prog.pid))  # waiting for our answer
                os.kill(prog.pid, signal.SIGUSR1)
                _until(lambda: not _signal_pending(prog.pid, signal.SIGUSR1))  # delivered
                with contextlib.suppress(BrokenPipeError):
                    conn.sendall(b"k")
            out, err = prog.communicate(timeout=60)
        finally:
            prog.kill()
            prog.wait()
    assert (out, err) == ("mapped\n", "")


# --- 8. the control socket --------------------------------------------------------------------

def _ask_gc(path: Path) -> str:
    try:
        return json.dumps(ask_engine(path, {"op": "gc", "dry_run": True}))
    except ControlError as e:
        return f"refused: {e}"


def test_control_socket_is_born_private_and_refuses_other_users(shared_dir, monkeypatch):
    # A chmod after bind leaves a window in which anyone may connect: the socket must be
    # private without one, whatever the umask (here none at all).
    monkeypatch.setattr(pathlib.Path, "chmod", lambda self, mode: None)
    old_umask = os.umask(0)
    try:
        async def go() -> tuple[int, str, str, str]:
            with open_store(shared_dir / "store", create=True) as store:
                server = await ControlServer.start(store, lambda: None)
                assert server is not None
                path = store.control_socket()
                assert path is not None
                os.umask(old_umask)
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                os.chmod(path.parent, 0o755)  # others may reach it from here on
                denied = await asyncio.to_thread(as_user, NOBODY, lambda: _ask_gc(path))
                os.chmod(path, 0o666)  # as if its mode were lost: the peer check still stands
                refused = await asyncio.to_thread(as_user, NOBODY, lambda: _ask_gc(path))
                ours = await asyncio.to_thread(_ask_gc, path)
                await server.close()
            return mode, denied, refused, ours
        mode, denied, refused, ours = asyncio.run(go())
    finally:
        os.umask(old_umask)
    assert mode == 0o600
    assert denied.startswith("refused: the engine's control socket") and "is not yours" in \
        denied, denied
    assert refused == (f"refused: the engine refuses this request: uid {NOBODY} is neither "
                       "this engine's user (uid 0) nor root"), refused
    assert not ours.startswith("refused"), ours


# --- 9. the handoff socket: private, peers checked, strays never stall anything -------------

def _fake_handoff(pid: int) -> tuple[bytes, list[int]]:
    """A well-formed handoff of two memfds (as the preload library would send)."""
    uffd, ram = os.memfd_create("uffd"), os.memfd_create("ram")
    data = handoff._HANDOFF.pack(handoff._MAGIC, handoff._VERSION, handoff._HANDOFF.size, 0,
                                 4096, 0, 0, pid, 4096, 0, b"/memfd:ram")
    return data, [uffd, ram]


def _hand_over(path: Path) -> str:
    """Sends a fake handoff as the calling process; the engine's answer ('' if none)."""
    data, fds = _fake_handoff(os.getpid())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        socket.send_fds(s, [data], fds)
        for fd in fds:
            os.close(fd)
        return s.recv(1).decode()


def _unanswered(s: socket.socket) -> bool:
    """The engine has neither answered nor closed this connection."""
    try:
        s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


def test_handoff_socket_is_private_and_takes_only_its_users_handoffs(shared_dir):
    async def go() -> tuple[int, str, str]:
        listener = HandoffListener(shared_dir / "engine.sock")
        try:
            mode = stat.S_IMODE(os.lstat(listener.path).st_mode)
            accepted = asyncio.ensure_future(listener.accept())
            os.chmod(listener.path, 0o666)  # as if its mode were lost
            foreign = await asyncio.to_thread(as_user, NOBODY,
                                              lambda: _hand_over(listener.path))
            assert not accepted.done() and listener.taken() == []
            ours = await asyncio.to_thread(_hand_over, listener.path)
            (await accepted).close()
            return mode, foreign, ours
        finally:
            listener.close()
    mode, foreign, ours = asyncio.run(go())
    assert (mode, foreign, ours) == (0o600, "n", "k")


def test_a_silent_client_does_not_hold_up_another_handoff(shared_dir):
    async def go() -> tuple[bool, str]:
        listener = HandoffListener(shared_dir / "engine.sock", timeout=60)
        stray = socket.socket(socket.AF_UNIX)
        try:
            stray.connect(str(listener.path))
            accepted = asyncio.ensure_future(listener.accept())
            answer = await asyncio.to_thread(_hand_over, listener.path)
            (await accepted).close()
            return _unanswered(stray), answer
        finally:
            stray.close()
            listener.close()
    assert asyncio.run(go()) == (True, "k")


def test_a_silent_client_is_dropped_after_the_timeout(shared_dir):
    async def go() -> bytes:
        listener = HandoffListener(shared_dir / "engine.sock", timeout=0.2)
        try:
            accepting = asyncio.ensure_future(listener.accept())
            with socket.socket(socket.AF_UNIX) as stray:
                stray.connect(str(listener.path))
                stray.setblocking(False)
                answer = await asyncio.get_running_loop().sock_recv(stray, 1)
            accepting.cancel()
            return answer
        finally:
            listener.close()
    assert asyncio.run(go()) == b"n"


STRAYS, COMMITS_WITH_STRAYS = 4, 6


def test_idle_clients_on_the_handoff_socket_never_stall_checkpoints(tmp_path, monkeypatch):
    # Strays stay connected, silent, far longer than the run needs (60 s each): checkpoints
    # must go on meanwhile. Each pause follows the commit of the checkpoint before it, so the
    # pauses seen while every stray is still waiting count commits made with strays around.
    monkeypatch.setattr(handoff, "HANDOFF_TIMEOUT", 60.0, raising=False)
    sock = tmp_path / "engine.sock"
    strays: list[socket.socket] = []
    waiting: list[bool] = []
    done = asyncio.Event()

    def paused(engine: Engine) -> None:
        if not strays:
            for _ in range(STRAYS):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(sock))
                strays.append(s)
            return
        waiting.append(all(_unanswered(s) for s in strays))
        if len(waiting) == COMMITS_WITH_STRAYS:
            done.set()

    async def go() -> None:
        with open_store(tmp_path / "store", create=True) as store:
            prog = await TrackedProgram.start(synth("--size", "16M", "--rate", "2000"), sock,
                                              min_ram=4 << 20)
            await checkpoint_program(prog, store, EngineOptions(interval=0.05),
                                     stop=done, max_checkpoints=200,
                                     on_engine=lambda e: setattr(e, "on_paused", paused))

    try:
        asyncio.run(go())
    finally:
        for s in strays:
            s.close()
    assert done.is_set() and waiting == [True] * COMMITS_WITH_STRAYS, waiting
