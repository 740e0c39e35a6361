"""QEMU set-ups beyond the test guest's own, on a real QEMU (TCG, small guests that need not
boot): which RAM is tracked when a shared pc-dimm backend comes before the machine's, a VM (or
a program) its user keeps stopped, a device-state save QEMU refuses, and memfd backends without
share= (QEMU shares them by default), also in the JSON -object syntax libvirt writes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from engine_with_refs import HookedCli, image_digest
from qemu.qmp.legacy import QEMUMonitorProtocol
from test_crash import proc_state
from test_qemu import qemu_status
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.handoff import GuestRam
from vmckpt.engine.qemu.argv import QemuArgsError, find_ram_backend
from vmckpt.engine.qemu.qmp import QemuError, Qmp
from vmckpt.engine.qemu.ram import RamMismatch, machine_ram
from vmckpt.engine.qemu.testguest import qemu_argv
from vmckpt.engine.session import TrackedProgram, uses_terminal
from vmckpt.engine.targets.base import pid_alive
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import open_store

VMCKPT = str(Path(sys.executable).with_name("vmckpt"))
MACHINE = ["-machine", "pc,memory-backend=mem0"]


def vmckpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMCKPT, *args], capture_output=True, text=True, timeout=180)


def bare(pidfile: Path) -> list[str]:
    """The test guest's QEMU without a RAM backend (each test adds its own)."""
    return [*qemu_argv(mem="64M", backend="none", serial="none"), "-pidfile", str(pidfile)]


def kill_qemu(pidfile: Path) -> None:
    if pidfile.exists() and pid_alive(pid := int(pidfile.read_text())):
        os.kill(pid, signal.SIGKILL)


def checkpoints(store: Path) -> list[dict]:
    if not store.exists():
        return []
    with open_store(store, readonly=True) as s:
        return s.list_checkpoints()


# --- 10. the tracked region is the machine's RAM ---------------------------------------------

@pytest.mark.parametrize("dimm", ["64M", "96M"])  # the machine's size, or another
def test_a_shared_dimm_backend_before_the_machines_is_refused_not_tracked(tmp_path, dimm):
    # QEMU maps the dimm's memfd first: its region is the first handed over.
    store, pidfile = tmp_path / "store", tmp_path / "qemu.pid"
    argv = [*bare(pidfile), "-m", "64M,slots=1,maxmem=512M",
            "-object", f"memory-backend-memfd,id=dimm0,size={dimm},share=on",
            "-device", "pc-dimm,memdev=dimm0",
            "-object", "memory-backend-memfd,id=mem0,size=64M,share=on", *MACHINE]
    try:
        r = vmckpt("run", "--store", str(store), "--max-checkpoints", "2", "--interval", "0.2s",
                   "--", *argv)
        assert r.returncode == 2, r.stderr
        assert (f"QEMU has shared RAM besides the machine's backend mem0: dimm0 "
                f"({dimm[:-1]} MiB); x-ignore-shared leaves shared RAM out of the device state"
                in r.stderr), r.stderr
        assert "Traceback" not in r.stderr
        assert not pidfile.exists() or not pid_alive(int(pidfile.read_text()))
        assert checkpoints(store) == []
    finally:
        kill_qemu(pidfile)


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_file_backend_is_recognised_by_its_mem_path(tmp_path, where):
    # The handed fd must be the mem-path's file (or, mem-path a directory, one QEMU made
    # there and unlinked): the check must not refuse the real thing.
    shm = Path(tempfile.mkdtemp(prefix="vmckpt-test-", dir="/dev/shm"))
    mem_path = shm / "ram" if where == "file" else shm
    store, pidfile = tmp_path / "store", tmp_path / "qemu.pid"
    try:
        r = vmckpt("run", "--store", str(store), "--max-checkpoints", "2", "--interval", "0.2s",
                   "--", *bare(pidfile), "-object",
                   f"memory-backend-file,id=mem0,size=64M,mem-path={mem_path},share=on",
                   *MACHINE)
        assert r.returncode == 0, r.stderr
        assert len(checkpoints(store)) == 2
    finally:
        kill_qemu(pidfile)
        shutil.rmtree(shm)


def test_a_region_that_is_not_the_backend_is_refused(tmp_path):
    # Regions as the handoff gives them, checked against a real QEMU's backend: another file of
    # the same size, or a memfd of another size, is not its RAM.
    shm = Path(tempfile.mkdtemp(prefix="vmckpt-test-", dir="/dev/shm"))
    sock = tmp_path / "qmp.sock"
    for name in ("ram", "other"):
        with open(shm / name, "wb") as f:
            f.truncate(64 << 20)
    qemu = subprocess.Popen([*qemu_argv(mem="64M", backend=str(shm / "ram"), serial="none"),
                             "-S", "-qmp", f"unix:{sock},server=on,wait=off"])

    def region(path: Path, length: int = 64 << 20) -> GuestRam:
        return GuestRam(-1, os.open(path, os.O_RDONLY), 0, length, 0, 0, qemu.pid, 4096,
                        str(path))

    async def go() -> list[str]:
        qmp = await Qmp.connect(sock, pid=qemu.pid)
        refused = []
        try:
            for handed in ([region(shm / "other")], [region(shm / "ram", 32 << 20)],
                           [region(shm / "ram"), region(shm / "other")]):
                with pytest.raises(RamMismatch) as e:
                    await machine_ram(qmp, handed)
                refused.append(str(e.value))
                for ram in handed:
                    ram.close()
            mine = region(shm / "ram")
            assert await machine_ram(qmp, [mine]) is mine
            mine.close()
        finally:
            await qmp.close()
        return refused

    try:
        refused = asyncio.run(go())
    finally:
        qemu.kill()
        qemu.wait()
        shutil.rmtree(shm)
    assert refused == [
        f"QEMU handed over shared RAM that is not only its machine's backend mem0 "
        f"(memory-backend-file, 64 MiB, {shm}/ram): {got}" for got in (
            f"{shm}/other, 64 MiB", f"{shm}/ram, 32 MiB",
            f"{shm}/ram, 64 MiB; {shm}/other, 64 MiB")]


# --- 12. memfd without share=, and JSON -object -----------------------------------------------

@pytest.mark.parametrize("args,uses", [
    (["-display", "none", "-serial", "file:log"], False), (["-nographic"], True),
    (["-serial", "mon:stdio"], True), (["-chardev", "stdio,id=c0"], True),
    (["-display", "curses"], True)])
def test_a_qemu_that_does_not_use_the_terminal_gets_its_own_session(args, uses):
    # Else a Ctrl-C in the terminal ends QEMU too (test_qemu.py::test_ctrl_c).
    assert uses_terminal(["qemu-system-x86_64", *args], None) is uses


def test_argv_accepts_memfd_without_share_and_json_objects():
    for obj in ["memory-backend-memfd,id=mem0,size=64M",
                '{"qom-type":"memory-backend-memfd","id":"mem0","size":67108864}',
                '{"qom-type":"memory-backend-memfd","id":"mem0","size":67108864,"share":true}',
                "memory-backend-file,id=mem0,size=64M,mem-path=/dev/shm/x,share=on",
                '{"qom-type":"memory-backend-file","id":"mem0","size":67108864,'
                '"mem-path":"/dev/shm/x","share":true}']:
        backend = find_ram_backend(["qemu-system-x86_64", "-object", obj, *MACHINE])
        assert backend.size == 64 << 20 and backend.opts["id"] == "mem0", obj
    for obj, why in [
            ("memory-backend-memfd,id=mem0,size=64M,share=off", "must be shared"),
            ('{"qom-type":"memory-backend-memfd","id":"mem0","size":67108864,"share":false}',
             "must be shared"),
            # A file backend is private unless share=on (QEMU's default).
            ("memory-backend-file,id=mem0,size=64M,mem-path=/dev/shm/x", "must be shared"),
            ('{"qom-type":"memory-backend-file","id":"mem0","size":67108864,'
             '"mem-path":"/dev/shm/x"}', "must be shared"),
            ('{"qom-type":"memory-backend-ram","id":"mem0","size":67108864}',
             "is memory-backend-ram"),
            ('{"qom-type": "memory-backend-memfd", "id": "mem0",', "is not valid JSON")]:
        with pytest.raises(QemuArgsError, match=why):
            find_ram_backend(["qemu-system-x86_64", "-object", obj, *MACHINE])


@pytest.mark.parametrize("obj", [
    "memory-backend-memfd,id=mem0,size=64M",
    json.dumps({"qom-type": "memory-backend-memfd", "id": "mem0", "size": 64 << 20}),
], ids=["keyval", "json"])
def test_memfd_without_share_is_checkpointed(tmp_path, obj):
    store, pidfile = tmp_path / "store", tmp_path / "qemu.pid"
    try:
        r = vmckpt("run", "--store", str(store), "--max-checkpoints", "2", "--interval", "0.2s",
                   "--", *bare(pidfile), "-object", obj, *MACHINE)
        assert r.returncode == 0, r.stderr
        recs = checkpoints(store)
        assert [c["ram_size"] for c in recs] == [64 << 20] * 2
        assert all(c["device_state"] for c in recs)
    finally:
        kill_qemu(pidfile)


# --- 11. a VM its user keeps stopped stays stopped ---------------------------------------------

def test_a_stopped_vm_stays_stopped_while_it_is_checkpointed(tmp_path):
    # -S: the user starts the VM stopped and owns a monitor of their own to continue it.
    store, pidfile, user = tmp_path / "store", tmp_path / "qemu.pid", tmp_path / "user.sock"
    argv = [*qemu_argv(mem="64M", serial="none"), "-S", "-pidfile", str(pidfile),
            "-qmp", f"unix:{user},server=on,wait=off"]
    try:
        with open(tmp_path / "stderr", "w+") as err:  # not a pipe: QEMU keeps it open
            r = subprocess.run([VMCKPT, "run", "--store", str(store), "--max-checkpoints", "3",
                                "--interval", "0.2s", "--detach-on-exit", "--", *argv],
                               stderr=err, timeout=180)
            err.seek(0)
            said = err.read()
        assert r.returncode == 0, said
        assert said.count("QEMU is not running (prelaunch): checkpointed as it is and left "
                          "stopped") == 1, said
        assert len(checkpoints(store)) == 3
        monitor = QEMUMonitorProtocol(str(user))
        monitor.connect()
        try:
            status = monitor.cmd("query-status")
            assert status["running"] is False, status
            monitor.cmd("cont")  # still the user's to continue, and it does
            assert monitor.cmd("query-status")["running"] is True
        finally:
            monitor.close()
    finally:
        kill_qemu(pidfile)


def test_a_refused_device_state_save_fails_instead_of_hanging(tmp_path):
    # QEMU takes the migration fd, then refuses to migrate a VM stopped since the last
    # migration: the save must fail at once, not wait for an end of stream that never comes.
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen([*qemu_argv(mem="64M", serial="none"), "-S",
                             "-qmp", f"unix:{sock},server=on,wait=off"])

    async def go() -> str:
        qmp = await Qmp.connect(sock, pid=qemu.pid)
        try:
            await qmp.set_ignore_shared()
            _data, outcome = await qmp.save_device_state()
            await outcome
            with pytest.raises(QemuError) as refused:
                await asyncio.wait_for(qmp.save_device_state(), 60)
            return str(refused.value)
        finally:
            await qmp.close()

    try:
        assert "paused due to previous migration" in asyncio.run(go())
    finally:
        qemu.kill()
        qemu.wait()


def test_a_restore_paused_and_checkpointed_stays_paused(tmp_path):
    store, user = str(tmp_path / "store"), tmp_path / "user.sock"
    plain = qemu_argv(mem="64M", backend="none", serial="none")
    r = vmckpt("run", "--store", store, "--add-memory-backend", "--max-checkpoints", "1",
               "--", *plain)
    assert r.returncode == 0, r.stderr
    # The restored branch: checkpoints 2, 3, 4; Ctrl-C lands while 4 is committing (the
    # engine holds there until it is sent).
    run = HookedCli(tmp_path / "refs", "-v", "restore", "--store", store, "1", "--paused",
                    "--checkpoint", "--interval", "0.2s", "--", *plain,
                    "-qmp", f"unix:{user},server=on,wait=off", hold="commit:3")
    try:
        assert run.held() == ("commit", 3)
        status = qemu_status(user)
        assert status["running"] is False, status
        run.ctrl_c()
        run.release()
        assert run.wait(timeout=60) == 0, run.stderr
    finally:
        run.kill()
    with open_store(store, readonly=True) as s:
        assert [(r["id"], r["parent"]) for r in s.list_checkpoints()] == \
            [(1, None), (2, 1), (3, 2), (4, 3)]
    # Paused throughout: each checkpoint of the branch is its RAM at the pause, which is
    # checkpoint 1's.
    first = image_digest(Path(store), 1, tmp_path)
    for ckpt in (2, 3, 4):
        assert image_digest(Path(store), ckpt, tmp_path) == run.ref(ckpt) == first, ckpt


def test_a_stopped_program_stays_stopped_while_it_is_checkpointed(tmp_path):
    # The process target's pause is SIGSTOP, its resume SIGCONT: a program the user had
    # stopped (kill -STOP) was continued by the first checkpoint, and by the keeper at exit.
    async def go() -> list[str]:
        async with await TrackedProgram.start(
                synth("--size", "16M", "--fill", "0.5", "--rate", "1000", "--seed", "5"),
                tmp_path / "s.sock", copiers=1, min_ram=4 << 20, stdout=PIPE) as prog:
            assert (await prog.proc.stdout.readline()).startswith(b"READY")
            pid = prog.proc.pid
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.2)
            with open_store(tmp_path / "store", create=True) as store:
                engine = Engine(prog.target, prog.tracker, store,
                                EngineOptions(copiers=1, pre_arm=0.0))
                states = []
                for _ in range(3):
                    await engine.checkpoint()
                    states.append(proc_state(pid))
            await prog.target.close()
            await asyncio.sleep(0.2)
            states.append(proc_state(pid))
            os.kill(pid, signal.SIGCONT)
            return states

    assert asyncio.run(go()) == ["T"] * 4
