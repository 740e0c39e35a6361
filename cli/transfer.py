"""`vmckpt push SRC DST [CKPT...]` and `vmckpt pull SRC [CKPT...]`: checkpoints copied between
any two stores (directories or redis:// URLs), only the pages the destination lacks sent.
--json output is documented in docs/json-schema.md."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
from tqdm import tqdm
from vmckpt.cli.main import main, store_option
from vmckpt.cli.text import emit_json, json_option, size_text, store_errors
from vmckpt.storage import open_store
from vmckpt.storage.transfer import CopyResult, copy_checkpoints

checkpoints_arg = click.argument("checkpoints", nargs=-1, type=int)


def transfer(src: str, dst: str, checkpoints: tuple[int, ...], as_json: bool) -> None:
    with store_errors(src), open_store(src, readonly=True) as source, \
            open_store(dst, create=True) as dest, \
            tqdm(unit="page", unit_scale=True, desc="pages", leave=False,
                 disable=as_json or None) as bar:
        result = copy_checkpoints(source, dest, list(checkpoints) or None,
                                  progress=bar.update)
    if as_json:
        emit_json({**asdict(result), "rate": result.rate})
    else:
        click.echo(summary(result))


def summary(r: CopyResult) -> str:
    return (f"{len(r.checkpoints)} checkpoint(s) copied, {len(r.already)} already there; "
            f"{r.pages_sent:,} pages sent ({size_text(r.bytes_sent)}), {r.pages_there:,} "
            f"already there; {r.rate:,.0f} pages/s over {r.seconds:.1f} s")


@main.command("push")
@click.argument("src")
@click.argument("dst")
@checkpoints_arg
@json_option
def push_cmd(src: str, dst: str, checkpoints: tuple[int, ...], as_json: bool) -> None:
    """Copy checkpoints (all, or the ids given) of store SRC into store DST (made if absent),
    each a directory or redis://HOST:PORT[,...]/NAME. Only pages DST lacks travel; an
    interrupted push resumes where it stopped; checkpoints DST has already are skipped."""
    transfer(src, dst, checkpoints, as_json)


@main.command("pull")
@store_option
@click.argument("src")
@checkpoints_arg
@json_option
def pull_cmd(store_path: Path, src: str, checkpoints: tuple[int, ...], as_json: bool) -> None:
    """Copy checkpoints (all, or the ids given) of store SRC into --store: push SRC --store."""
    transfer(src, str(store_path), checkpoints, as_json)
