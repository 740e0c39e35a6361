"""The `vmckpt` command."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import click
import uvloop
from vmckpt.engine.cycle import ON_FULL, EngineOptions
from vmckpt.engine.handoff import preload_path
from vmckpt.engine.qemu.argv import QemuArgsError
from vmckpt.engine.qemu.qmp import QemuError
from vmckpt.engine.qemu.restore import RestoreError, restore_qemu
from vmckpt.engine.session import AttachError, run_program
from vmckpt.engine.session import serve as serve_qemu
from vmckpt.engine.tracker import TrackerError
from vmckpt.storage import PageStore, StoreError, open_store, restore_image

DEFAULT_STORE = "vmckpt-store"


def _duration(text: str) -> float:
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


store_option = click.option(
    "--store", "store_path", type=click.Path(path_type=Path),
    default=lambda: os.environ.get("VMCKPT_STORE", DEFAULT_STORE), show_default=DEFAULT_STORE,
    help="Checkpoint store directory (default: $VMCKPT_STORE, then ./vmckpt-store).")


def _fail(message: str) -> NoReturn:
    click.echo(f"vmckpt: {message}", err=True)
    sys.exit(2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Say more.")
def main(verbose: bool) -> None:
    """Continuous copy-on-write checkpoints of running VMs (and any program's shared RAM)."""
    logging.basicConfig(level=logging.WARNING, format="vmckpt: %(message)s")
    logging.getLogger("vmckpt").setLevel(logging.DEBUG if verbose else logging.INFO)


def engine_options(f: Callable) -> Callable:
    """The options of every command that runs the engine, passed on as one EngineOptions."""

    @functools.wraps(f)
    def wrapper(interval: str, copiers: int | None, buffer_size: str, tracking: str,
                pre_arm: str, priority: bool, on_full: str, **kw: Any) -> Any:
        lead = None if pre_arm == "auto" else _duration(pre_arm)
        if tracking == "hybrid" and lead:
            raise click.UsageError("--pre-arm does not combine with --tracking hybrid")
        options = EngineOptions(interval=_duration(interval),
                                copiers=copiers or os.cpu_count() or 1,
                                buffer_bytes=_size(buffer_size), tracking=tracking,
                                pre_arm=lead, priority=priority, on_full=on_full)
        return f(options=options, **kw)

    for opt in reversed([
        click.option("--interval", default="1s", show_default=True,
                     help="Time between checkpoints."),
        click.option("--copiers", type=int, default=None, help="Copier threads (default: cores)."),
        click.option("--buffer", "buffer_size", default="64M", show_default=True,
                     help="Bound on copied pages waiting for the store."),
        click.option("--tracking", type=click.Choice(["wp", "async", "hybrid"]), default="wp",
                     show_default=True,
                     help="wp: write faults drive copy-on-write; async: the kernel records "
                          "writes (WP_ASYNC), the pause copies the written pages; hybrid: "
                          "async between checkpoints, wp while one drains (a second short "
                          "pause after each drain switches back)."),
        click.option("--pre-arm", default="auto", show_default=True,
                     help="Do each checkpoint's dirty-set work this long before its pause, "
                          "so the pause handles only pages written since (e.g. 200ms; 0: "
                          "off; auto: 100ms, or a quarter of a shorter interval, off with "
                          "hybrid)."),
        click.option("--priority/--no-priority", default=True, show_default=True,
                     help="Copiers first take the pages after one the guest just wrote (wp)."),
        click.option("--max-checkpoints", type=int, default=None, help="Stop after this many."),
        click.option("--on-full", type=click.Choice(ON_FULL), default="wait", show_default=True,
                     help="When the store cannot take more (disk full, quota, I/O error) the "
                          "VM runs on: wait (drop checkpoints until it takes writes again) or "
                          "stop (stop checkpointing and exit, leaving the VM running)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


ENGINE_ERRORS = (StoreError, AttachError, TrackerError, QemuArgsError, QemuError, RestoreError)


def _engine(coro_fn: Callable[[PageStore], Coroutine[Any, Any, int]], store_path: Path,
            what: str, *, create: bool = True) -> None:
    """Runs an engine command on the store; exits with its status, or one line on failure."""
    try:
        with open_store(store_path, create=create) as store:
            try:
                status = uvloop.run(coro_fn(store))
            except BaseException:
                store.discard_if_unused()  # a run refused before it started leaves no store
                raise
    except ENGINE_ERRORS as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"cannot start {what}: {e.strerror}")
    sys.exit(status if status >= 0 else 128 - status)


@main.command()
@store_option
@engine_options
@click.option("--min-ram", default="32M", show_default=True,
              help="Smallest shared mapping taken for guest RAM.")
@click.option("--attach-timeout", default="30s", show_default=True,
              help="How long the program may take to map its guest RAM.")
@click.option("--detach-on-exit", is_flag=True,
              help="On Ctrl-C, leave the program running untracked instead of stopping it.")
@click.option("--add-memory-backend", is_flag=True,
              help="QEMU with plain -m SIZE: give it a shared memfd backend of that size.")
@click.argument("argv", nargs=-1, required=True)
def run(store_path: Path, options: EngineOptions, max_checkpoints: int | None, min_ram: str,
        attach_timeout: str, detach_on_exit: bool, add_memory_backend: bool,
        argv: tuple[str, ...]) -> None:
    """Start PROGRAM ARGS... (QEMU, or any program with shared guest RAM) and checkpoint it
    every interval until it exits or Ctrl-C."""
    _engine(lambda store: run_program(
        argv, store, options, attach_timeout=_duration(attach_timeout), min_ram=_size(min_ram),
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


def _ckpt(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        _fail(f"checkpoint id must be a number or 'latest', not {text!r}")


@main.command()
@store_option
@click.option("--image", type=click.Path(path_type=Path),
              help="Only write the RAM image to this file (sparse: zero pages stay holes).")
@click.option("--workers", type=int, default=4, show_default=True, help="Parallel readers.")
@click.option("--paused", is_flag=True, help="Leave the restored guest paused (debuggers).")
@click.option("--checkpoint", is_flag=True,
              help="Keep checkpointing the restored VM, as a new branch from CKPT.")
@engine_options
@click.argument("ckpt")
@click.argument("argv", nargs=-1)
def restore(store_path: Path, image: Path | None, workers: int, paused: bool, checkpoint: bool,
            options: EngineOptions, max_checkpoints: int | None, ckpt: str,
            argv: tuple[str, ...]) -> None:
    """Bring checkpoint CKPT (an id, or 'latest') back: into a new QEMU given as
    -- qemu-system-x86_64 ARGS... (the same machine options as the checkpointed VM), or with
    --image into a RAM image file, bit-exact."""
    which = _ckpt(ckpt)
    if image is not None:
        try:
            with open_store(store_path, readonly=True) as store:
                stats = restore_image(store, which, image, workers=workers)
        except StoreError as e:
            _fail(str(e))
        click.echo(f"restored {stats.pages} pages ({stats.unique_pages} distinct, "
                   f"{stats.bytes / 2**20:.1f} MiB) into {image} in {stats.seconds:.2f} s")
        return
    if not argv:
        _fail("give --image FILE, or the QEMU command line after --")
    _engine(lambda store: restore_qemu(store, which, argv, paused=paused,
                                       checkpoint=options if checkpoint else None,
                                       max_checkpoints=max_checkpoints), store_path, argv[0],
            create=False)


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
