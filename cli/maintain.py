"""`vmckpt prune/gc`: dropping checkpoints by policy and reclaiming the pages no checkpoint
needs. They write to the store: if an engine holds it, the engine does the work (its control
socket). --json output is documented in docs/json-schema.md."""

from __future__ import annotations

import math
from pathlib import Path

import click
from vmckpt.cli.main import _fail, main, store_option
from vmckpt.cli.text import emit_json, json_option, size_text, store_errors
from vmckpt.cli.units import Duration
from vmckpt.engine.control import ControlError, NoEngine, ask_engine, perform
from vmckpt.storage import StoreLocked, open_store
from vmckpt.storage.errors import id_ranges
from vmckpt.storage.rocks import control_socket

dry_run_option = click.option("--dry-run", is_flag=True,
                              help="Only say what would be done; the store is not changed.")


def maintain(store_path: Path, request: dict) -> dict:
    """Runs request on the store, or has the engine holding it run it."""
    with store_errors(store_path):
        try:
            store = open_store(store_path)
        except StoreLocked:
            return forward(store_path, request)
        with store:
            return {**perform(store, request), "forwarded": False}


def forward(store_path: Path, request: dict) -> dict:
    path = control_socket(store_path)
    try:
        return {**ask_engine(path, request), "forwarded": True}
    except NoEngine as e:
        _fail(f"store {store_path} is locked by another process and {e}: a program that "
              "holds the store open, or an engine of an older vmckpt")
    except ControlError as e:
        _fail(f"the engine holding {store_path}: {e}")


def by_engine(result: dict) -> str:
    return " (by the engine that holds the store)" if result["forwarded"] else ""


@main.command("prune")
@store_option
@click.option("--keep-last", type=int, help="Keep the newest N checkpoints.")
@click.option("--keep-every", type=int,
              help="Keep every checkpoint whose id is a multiple of K (by id, so that the "
                   "same policy run again keeps the same ones).")
@click.option("--keep-within", type=Duration(0, math.inf),
              help="Keep the checkpoints taken within this age: 30m, 2h, 1d.")
@dry_run_option
@json_option
def prune_cmd(store_path: Path, keep_last: int | None, keep_every: int | None,
              keep_within: float | None, dry_run: bool, as_json: bool) -> None:
    """Drop the checkpoints no policy keeps (the policies given add up). Kept checkpoints stay
    restorable bit-exact: a map whose chain went through a dropped checkpoint is rewritten as
    a full map. While an engine runs, the checkpoint it continues from is kept too. Pages go
    only with `vmckpt gc`."""
    for name, n in (("--keep-last", keep_last), ("--keep-every", keep_every)):
        if n is not None and n < 1:
            _fail(f"{name} takes a number, 1 or more")
    if keep_last is None and keep_every is None and keep_within is None:
        _fail("prune needs a policy: --keep-last N, --keep-every K or --keep-within AGE")
    result = maintain(store_path, {"op": "prune", "dry_run": dry_run, "policy": {
        "keep_last": keep_last, "keep_every": keep_every, "keep_within": keep_within}})
    if as_json:
        emit_json(result)
        return
    dropped, kept, rewritten = result["dropped"], result["kept"], result["rewritten"]
    if not dropped:
        click.echo(f"nothing to drop: the policy keeps all {result['checkpoints']} "
                   f"checkpoints{by_engine(result)}")
        return
    verb = ("would drop", "rewrite") if dry_run else ("dropped", "rewrote")
    click.echo(f"{verb[0]} {len(dropped)} of {result['checkpoints']} checkpoints and {verb[1]} "
               f"{len(rewritten)} map(s) as full maps{by_engine(result)}")
    for what, ids in (("dropped", dropped), ("kept", kept), ("full maps", rewritten)):
        if ids:
            click.echo(f"  {what:<10} {id_ranges(ids)}")
    if not dry_run:
        click.echo("their pages stay in the store until `vmckpt gc`")


@main.command("gc")
@store_option
@dry_run_option
@json_option
def gc_cmd(store_path: Path, dry_run: bool, as_json: bool) -> None:
    """Delete the stored pages no checkpoint needs (mark and sweep). Safe while an engine
    checkpoints into the store: pages of a checkpoint in flight are kept."""
    result = maintain(store_path, {"op": "gc", "dry_run": dry_run})
    if as_json:
        emit_json(result)
        return
    freed, stored = result["pages_freed"], result["pages_stored"]
    amount = f"{freed:,} of {stored:,} pages ({size_text(result['bytes_freed'])})"
    if dry_run:
        click.echo(f"would free {amount}{by_engine(result)}")
        return
    click.echo(f"freed {amount} in {result['seconds']:.1f} s{by_engine(result)}; pages on disk "
               f"{size_text(result['disk_bytes_before'])} -> "
               f"{size_text(result['disk_bytes_after'])}")
