"""The `vmckpt` command."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
import uvloop
from vmckpt.cli.units import CheckpointId, Duration, Size, parse_checkpoint, physical_ram
from vmckpt.engine.cycle import ON_FULL, EngineOptions
from vmckpt.engine.handoff import preload_path
from vmckpt.engine.heap import bound_heap
from vmckpt.engine.qemu.argv import QemuArgsError
from vmckpt.engine.qemu.fleece import DiskCaptureError
from vmckpt.engine.qemu.qmp import QemuError
from vmckpt.engine.qemu.restore import RestoreError, restore_qemu
from vmckpt.engine.qemu.restore_disks import FORMATS, DiskWriteError, device_id, write_disk
from vmckpt.engine.session import AttachError, run_program
from vmckpt.engine.session import serve as serve_qemu
from vmckpt.engine.tracker import TrackerError
from vmckpt.engine.uffd_access import userfaultfd_problem
from vmckpt.storage import PageStore, StoreError, open_store, restore_image

DEFAULT_STORE = "vmckpt-store"


store_option = click.option(
    "--store", "store_path", type=click.Path(path_type=Path),
    default=lambda: os.environ.get("VMCKPT_STORE", DEFAULT_STORE), show_default=DEFAULT_STORE,
    help="Checkpoint store directory (default: $VMCKPT_STORE, then ./vmckpt-store).")


def _fail(message: str, status: int = 2) -> NoReturn:
    click.echo(f"vmckpt: {message}", err=True)
    sys.exit(status)


class OneLineErrors(click.Group):
    """Usage errors said like every other refusal: one line, "vmckpt: ...", exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kw: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kw)
        try:
            status = super().main(*args, standalone_mode=False, **kw)
        except click.exceptions.Abort:  # Ctrl-C outside the engine
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            _fail(e.format_message() + hint, e.exit_code)
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=OneLineErrors)
@click.option("-v", "--verbose", is_flag=True, help="Say more.")
def main(verbose: bool) -> None:
    """Continuous copy-on-write checkpoints of running VMs (and any program's shared RAM)."""
    logging.basicConfig(level=logging.WARNING, format="vmckpt: %(message)s")
    logging.getLogger("vmckpt").setLevel(logging.DEBUG if verbose else logging.INFO)
    # qemu.qmp logs a lost connection itself; vmckpt says what it means (QEMU exited, ...).
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def engine_options(f: Callable) -> Callable:
    """The options of every command that runs the engine, passed on as one EngineOptions."""

    @functools.wraps(f)
    def wrapper(interval: float, copiers: int | None, buffer_size: int, tracking: str,
                pre_arm: float | str, priority: bool, on_full: str, disks: bool,
                **kw: Any) -> Any:
        lead = None if pre_arm == "auto" else float(pre_arm)
        if tracking == "hybrid" and lead:
            raise click.UsageError("--pre-arm does not combine with --tracking hybrid")
        if lead and lead >= interval:
            raise click.UsageError(f"--pre-arm ({lead:g} s) must be shorter than --interval "
                                   f"({interval:g} s)")
        options = EngineOptions(interval=interval, copiers=copiers or os.cpu_count() or 1,
                                buffer_bytes=buffer_size, tracking=tracking,
                                pre_arm=lead, priority=priority, on_full=on_full, disks=disks)
        bound_heap()  # before the store and the tracker start their threads
        return f(options=options, **kw)

    for opt in reversed([
        click.option("--interval", type=Duration(0, 86400, positive=True), default="1s",
                     show_default=True, help="Time between checkpoints (more than 0, up to 1d)."),
        click.option("--copiers", type=click.IntRange(1, 1024), default=None,
                     help="Copier threads (default: cores)."),
        click.option("--buffer", "buffer_size", default="64M", show_default=True,
                     type=Size(1 << 20, lambda: physical_ram() // 2,
                               " (the top is half this machine's RAM)"),
                     help="Bound on copied pages waiting for the store."),
        click.option("--tracking", type=click.Choice(["wp", "async", "hybrid"]), default="wp",
                     show_default=True,
                     help="wp: write faults drive copy-on-write; async: the kernel records "
                          "writes (WP_ASYNC), the pause copies the written pages; hybrid: "
                          "async between checkpoints, wp while one drains (a second short "
                          "pause after each drain switches back)."),
        click.option("--pre-arm", type=Duration(0, 3600, words=("auto",)), default="auto",
                     show_default=True,
                     help="Do each checkpoint's dirty-set work this long before its pause, "
                          "so the pause handles only pages written since (e.g. 200ms; 0: "
                          "off; auto: 100ms, or a quarter of a shorter interval, off with "
                          "hybrid)."),
        click.option("--priority/--no-priority", default=True, show_default=True,
                     help="Copiers first take the pages after one the guest just wrote (wp)."),
        click.option("--max-checkpoints", type=click.IntRange(1), default=None,
                     help="Stop after this many."),
        click.option("--on-full", type=click.Choice(ON_FULL), default="wait", show_default=True,
                     help="When the store cannot take more (disk full, quota, I/O error) the "
                          "VM runs on: wait (drop checkpoints until it takes writes again) or "
                          "stop (stop checkpointing and exit, leaving the VM running)."),
        click.option("--disks/--no-disks", default=True, show_default=True,
                     help="Capture the VM's writable disks at each checkpoint's pause, in the "
                          "same store (--no-disks: RAM only; every restore then warns that "
                          "the guest sees its disks as they are then)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


ENGINE_ERRORS = (StoreError, AttachError, TrackerError, QemuArgsError, QemuError, RestoreError,
                 DiskCaptureError)


def _last_committed(store: PageStore) -> int | None:
    try:
        return store.get_record("latest")["id"]
    except StoreError:
        return None


def _killed(what: str, signum: int, before: int | None, after: int | None,
            checkpointing: bool) -> str:
    """What to tell the user when the program (the VM) ended by a signal."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    text = f"{Path(what).name} was killed by signal {signum} ({name})"
    if not checkpointing:
        return text
    if after is None or after == before:
        return f"{text}; no checkpoint was committed in this run"
    return f"{text}; the last committed checkpoint is {after}"


def _engine(coro_fn: Callable[[PageStore], Coroutine[Any, Any, int]], store_path: Path,
            what: str, *, create: bool = True, checkpointing: bool = True) -> None:
    """Runs an engine command on the store; exits with its status, or one line on failure.
    A program ended by a signal is said in one line, with the checkpoint it can be restored
    from, and the exit status is the shell's for that signal (128 + N)."""
    try:
        with open_store(store_path, create=create) as store:
            before = _last_committed(store)
            try:
                status = uvloop.run(coro_fn(store))
            except BaseException:
                store.discard_if_unused()  # a run refused before it started leaves no store
                raise
            if status < 0:
                click.echo("vmckpt: " + _killed(what, -status, before, _last_committed(store),
                                                checkpointing), err=True)
    except ENGINE_ERRORS as e:
        _fail(str(e))
    except (FileNotFoundError, PermissionError) as e:  # of the program
        _fail(f"cannot start {what}: {e.strerror}")
    sys.exit(status if status >= 0 else 128 - status)


@main.command()
@store_option
@engine_options
@click.option("--min-ram", type=Size(4096, 1 << 40), default="32M", show_default=True,
              help="Smallest shared mapping taken for guest RAM.")
@click.option("--attach-timeout", type=Duration(0, 86400, positive=True), default="30s",
              show_default=True,
              help="How long the program may take to map its guest RAM.")
@click.option("--detach-on-exit", is_flag=True,
              help="On Ctrl-C, leave the program running untracked instead of stopping it.")
@click.option("--add-memory-backend", is_flag=True,
              help="QEMU with plain -m SIZE: give it a shared memfd backend of that size.")
@click.argument("argv", nargs=-1, required=True)
def run(store_path: Path, options: EngineOptions, max_checkpoints: int | None, min_ram: int,
        attach_timeout: float, detach_on_exit: bool, add_memory_backend: bool,
        argv: tuple[str, ...]) -> None:
    """Start PROGRAM ARGS... (QEMU, or any program with shared guest RAM) and checkpoint it
    every interval until it exits or Ctrl-C."""
    _refuse_without_userfaultfd()
    _engine(lambda store: run_program(
        argv, store, options, attach_timeout=attach_timeout, min_ram=min_ram,
        add_memory_backend=add_memory_backend, detach_on_exit=detach_on_exit,
        max_checkpoints=max_checkpoints), store_path, argv[0])


@main.command()
@store_option
@engine_options
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), required=True,
              help="Unix socket QEMU's preload library connects to ($VMCKPT_SOCKET).")
@click.option("--qmp", "qmp_path", type=click.Path(path_type=Path), required=True,
              help="QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off); vmckpt must be its "
                   "only client.")
def serve(store_path: Path, options: EngineOptions, max_checkpoints: int | None,
          socket_path: Path, qmp_path: Path) -> None:
    """Checkpoint a QEMU started by someone else with LD_PRELOAD=$(vmckpt preload-path) and
    VMCKPT_SOCKET=SOCKET, until it exits or Ctrl-C (QEMU keeps running)."""
    _engine(lambda store: serve_qemu(socket_path, qmp_path, store, options,
                                     max_checkpoints=max_checkpoints), store_path, "serve")


def _refuse_without_userfaultfd() -> None:
    """The program we start runs as we do: if we may not create a userfaultfd, neither may
    its preload library, and it would run untracked. Say so before starting it."""
    if problem := userfaultfd_problem():
        _fail(problem)


def _ckpt(text: str) -> int | str:
    try:
        return parse_checkpoint(text)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@main.command()
@store_option
@click.option("--image", "-o", "--output", "image", type=click.Path(path_type=Path),
              help="Only write an image to this file: the RAM's (sparse: zero pages stay "
                   "holes), or with --disk that disk's (raw, or --disk-format qcow2).")
@click.option("--disk", "disk_device",
              help="With --image/-o: write this disk (its device, e.g. virtio0), not the RAM.")
@click.option("--disk-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the restored VM's disks are written, one new image each "
                   "(default: with the RAM image, /dev/shm). They stay once the guest runs.")
@click.option("--disk-format", type=click.Choice(FORMATS), default="raw", show_default=True,
              help="Format of the restored disks' images.")
@click.option("--workers", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Parallel readers.")
@click.option("--paused", is_flag=True, help="Leave the restored guest paused (debuggers).")
@click.option("--checkpoint", is_flag=True,
              help="Keep checkpointing the restored VM, as a new branch from CKPT.")
@engine_options
@click.argument("ckpt", type=CheckpointId())
@click.argument("argv", nargs=-1)
def restore(store_path: Path, image: Path | None, disk_device: str | None,
            disk_dir: Path | None, disk_format: str, workers: int, paused: bool,
            checkpoint: bool, options: EngineOptions, max_checkpoints: int | None,
            ckpt: int | str, argv: tuple[str, ...]) -> None:
    """Bring checkpoint CKPT (an id, or 'latest') back: into a new QEMU given as
    -- qemu-system-x86_64 ARGS... (the same machine options as the checkpointed VM; each of
    its disks is written into a new image and its drive pointed there, the original images
    are never written), or with --image (-o) FILE into a RAM image file, or with --disk
    DEVICE -o FILE one disk into an image file, bit-exact."""
    which = ckpt
    if disk_device is not None:
        if image is None or argv:
            _fail("--disk DEVICE writes that disk into the file -o FILE names (and starts no "
                  "QEMU)")
        _restore_disk(store_path, which, disk_device, image, disk_format)
        return
    if image is not None:
        try:
            with open_store(store_path, readonly=True) as store:
                stats = restore_image(store, which, image, workers=workers)
        except StoreError as e:
            _fail(str(e))
        except OSError as e:
            _fail(f"cannot write the RAM image {image}: {e.strerror}")
        click.echo(f"restored {stats.pages} pages ({stats.unique_pages} distinct, "
                   f"{stats.bytes / 2**20:.1f} MiB) into {image} in {stats.seconds:.2f} s")
        return
    if not argv:
        _fail("give --image FILE, or the QEMU command line after --")
    if checkpoint:
        _refuse_without_userfaultfd()
    dirs = {"disk_dir": str(disk_dir)} if disk_dir else {}
    _engine(lambda store: restore_qemu(store, which, argv, paused=paused,
                                       checkpoint=options if checkpoint else None,
                                       disk_format=disk_format, **dirs,
                                       max_checkpoints=max_checkpoints), store_path, argv[0],
            create=False, checkpointing=checkpoint)


def _restore_disk(store_path: Path, which: int | str, device: str, output: Path,
                  fmt: str) -> None:
    """`restore CKPT --disk DEVICE -o FILE`: the disk written beside FILE, then renamed to it
    (a failed restore leaves FILE as it was)."""
    try:
        with open_store(store_path, readonly=True) as store:
            rec = store.get_record(which)
            disks = rec.get("disks") or []
            name = next((d["device"] for d in disks if device in (d["device"],
                                                                  device_id(d["device"]))),
                        None)
            if name is None:
                have = ", ".join(device_id(d["device"]) for d in disks) or "none"
                _fail(f"checkpoint {rec['id']} has no disk {device} (its disks: {have})")
            made = write_disk(store, rec, name, output.parent, fmt)
            try:
                os.replace(made.path, output)
            except OSError:
                made.path.unlink()
                raise
    except (StoreError, DiskWriteError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write the disk image {output}: {e.strerror}")
    size = next(d["size"] for d in disks if d["device"] == name)
    click.echo(f"restored disk {device} of checkpoint {rec['id']} ({size} bytes, {fmt}) into "
               f"{output}")


@main.command("preload-path")
def preload_path_cmd() -> None:
    """Print the preload library's path (for LD_PRELOAD)."""
    click.echo(preload_path())


from vmckpt.cli import bench as _bench  # noqa: E402,F401 (registers `vmckpt bench`)
from vmckpt.cli import check as _check  # noqa: E402,F401 (registers check)
from vmckpt.cli import export as _export  # noqa: E402,F401 (registers export)
from vmckpt.cli import inspect as _inspect  # noqa: E402,F401 (registers ls, show, ...)
from vmckpt.cli import maintain as _maintain  # noqa: E402,F401 (registers prune, gc)
from vmckpt.cli import plot as _plot  # noqa: E402,F401 (registers plot)
from vmckpt.cli import transfer as _transfer  # noqa: E402,F401 (registers push, pull)
