"""`vmckpt check --repair`: what the salvage of a damaged store keeps, drops and rewrites,
said before it is done (or instead, with --dry-run). --json output is documented in
docs/json-schema.md."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
from vmckpt.cli.text import emit_json, store_errors
from vmckpt.storage.errors import id_ranges
from vmckpt.storage.repair import RepairResult, repair_store


def repair_store_cmd(store_path: Path, *, dry_run: bool, as_json: bool) -> None:
    with store_errors(store_path):
        result = repair_store(store_path, dry_run=dry_run,
                              announce=None if as_json else tell)  # said before it is done
    if as_json:
        emit_json({**asdict(result), "needed": result.needed})
    elif result.damaged_store:
        done(result)


def tell(plan: RepairResult) -> None:
    for line in plan.problems:
        click.echo(line)
    if not plan.needed:
        click.echo(f"nothing to repair: all {plan.checkpoints} checkpoints are intact")
        return
    verb = "would" if plan.dry_run else "will"
    if plan.rocksdb_repair:
        aside = f", setting aside {', '.join(plan.set_aside)}" if plan.set_aside else ""
        click.echo(f"RocksDB's repair {verb} rebuild the store's manifest from its table "
                   f"files{aside}")
    click.echo(f"the repair {verb} keep {len(plan.kept)} of {plan.checkpoints} checkpoints, "
               f"drop {len(plan.dropped)} and rewrite {len(plan.rewritten)} map(s) as full maps")
    for what, ids in (("kept", plan.kept), ("dropped", plan.dropped),
                      ("full maps", plan.rewritten)):
        if ids:
            click.echo(f"  {what:<10} {id_ranges(ids)}")
    click.echo(f"the kept checkpoints and their verified pages {verb} be copied into a new "
               "store; the damaged one is kept aside, renamed")


def done(result: RepairResult) -> None:
    click.echo(f"repaired: {len(result.kept)} checkpoints kept, {len(result.dropped)} dropped, "
               f"{result.pages} pages copied; the damaged store is kept at "
               f"{result.damaged_store} (remove it once the repaired store serves you)")
