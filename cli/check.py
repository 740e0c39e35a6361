"""`vmckpt check`: verifying a store, and with --repair salvaging its intact checkpoints.
--json output is documented in docs/json-schema.md."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path

import click
from vmckpt.cli.main import _fail, main, store_option
from vmckpt.cli.text import emit_json, json_option, store_errors
from vmckpt.cli.units import Duration
from vmckpt.engine.units import duration_text
from vmckpt.storage import Damaged, open_store
from vmckpt.storage.errors import id_ranges
from vmckpt.storage.inspect import CheckReport, Problem, check_store, damage_text

EXIT_PROBLEMS, EXIT_INCOMPLETE = 1, 3
REPAIR = "`vmckpt check --repair` keeps the intact ones"


@main.command()
@store_option
@click.option("--read-data", is_flag=True,
              help="Also read every stored page and verify it hashes to its id.")
@click.option("--max-duration", type=Duration(0, math.inf),
              help="Stop after this long (30s, 5m); the check is then "
                   f"incomplete: exit status {EXIT_INCOMPLETE}.")
@click.option("--repair", is_flag=True,
              help="Salvage a damaged store: keep its intact checkpoints (verified with "
                   "--read-data), drop the damaged ones, rewrite as full maps the maps whose "
                   "chain went through them; the damaged store is kept aside.")
@click.option("--dry-run", is_flag=True, help="With --repair: only say what it would do.")
@json_option
def check(store_path: Path, read_data: bool, max_duration: float | None, repair: bool,
          dry_run: bool, as_json: bool) -> None:
    """Verify the store: every record and map reads back whole, every map chain resolves,
    every page a checkpoint needs is stored and readable (and with --read-data, is what its id
    says); says which checkpoints are damaged and which are intact. Exit status 0: sound; 1:
    problems (each listed, by checkpoint and page); 3: stopped by --max-duration before the
    end, no problem so far; 2: the check could not run."""
    if dry_run and not repair:
        _fail("--dry-run goes with --repair")
    if repair:
        if max_duration is not None:
            _fail("--repair checks the whole store: it does not take --max-duration")
        from vmckpt.cli.repair import repair_store_cmd  # only --repair needs it

        repair_store_cmd(store_path, dry_run=dry_run, as_json=as_json)
        return
    with store_errors(store_path):
        try:
            store = open_store(store_path, readonly=True)
        except Damaged as e:  # a store RocksDB cannot open at all: the check's finding
            report = CheckReport(read_data, problems=[Problem("store", damage_text(e))])
            show_report(report, as_json, read_data, max_duration, opened=False)
            sys.exit(EXIT_PROBLEMS)
        with store:
            report = check_store(store, read_data=read_data, max_seconds=max_duration,
                                 progress=sys.stderr.isatty())
    show_report(report, as_json, read_data, max_duration)
    if not report.sound:
        sys.exit(EXIT_PROBLEMS if report.problems else EXIT_INCOMPLETE)


def show_report(report: CheckReport, as_json: bool, read_data: bool, max_duration: float | None,
                *, opened: bool = True) -> None:
    if as_json:
        emit_json({**asdict(report), "sound": report.sound, "opened": opened})
        return
    for p in report.problems:
        click.echo(p.message)
    if not opened:
        click.echo(f"damaged: the store cannot be opened, no checkpoint can be read; {REPAIR}")
        return
    if report.damaged:
        click.echo(f"damaged: checkpoint{'s' if len(report.damaged) > 1 else ''} "
                   f"{id_ranges(report.damaged)} cannot be restored")
        click.echo("intact:  " + (f"checkpoint{'s' if len(report.intact) > 1 else ''} "
                                  f"{id_ranges(report.intact)}" if report.intact else "none"))
    pages = (f", {report.pages_checked} of {report.pages_stored} stored pages hashed"
             if read_data else "")
    done = f"{report.maps_checked} of {report.checkpoints} checkpoints checked{pages}"
    verdict = ("sound" if report.sound else f"{len(report.problems)} problem(s)"
               if report.problems else "incomplete")
    stopped = ("" if report.complete or max_duration is None
               else f", stopped by --max-duration {duration_text(max_duration)}")
    advice = f"; {REPAIR}" if report.damaged and report.intact else ""
    click.echo(f"{verdict}: {done} in {report.seconds:.1f} s{stopped}{advice}")
