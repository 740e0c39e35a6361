"""`vmckpt check`: verifying a store, and with --repair salvaging its intact checkpoints.
--json output is documented in docs/json-schema.md."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import click
from vmckpt.cli.main import _duration, _fail, main, store_option
from vmckpt.cli.text import emit_json, json_option, reading
from vmckpt.storage.inspect import check_store

EXIT_PROBLEMS, EXIT_INCOMPLETE = 1, 3


@main.command()
@store_option
@click.option("--read-data", is_flag=True,
              help="Also read every stored page and verify it hashes to its id.")
@click.option("--max-duration", help="Stop after this long (30s, 5m); the check is then "
                                     f"incomplete: exit status {EXIT_INCOMPLETE}.")
@json_option
def check(store_path: Path, read_data: bool, max_duration: str | None, as_json: bool) -> None:
    """Verify the store: every checkpoint has its map, every map chain resolves, every page a
    checkpoint needs is stored (and with --read-data, is what its id says). Exit status 0:
    sound; 1: problems (each listed, by checkpoint and page); 3: stopped by --max-duration
    before the end, no problem so far; 2: the check could not run."""
    try:
        seconds = _duration(max_duration) if max_duration is not None else None
    except ValueError:
        _fail(f"--max-duration takes a duration (30s, 5m), not {max_duration!r}")
    with reading(store_path) as store:
        report = check_store(store, read_data=read_data, max_seconds=seconds,
                             progress=sys.stderr.isatty())
    if as_json:
        emit_json({**asdict(report), "sound": report.sound})
    else:
        for p in report.problems:
            click.echo(p.message)
        pages = (f", {report.pages_checked} of {report.pages_stored} stored pages hashed"
                 if read_data else "")
        done = f"{report.maps_checked} of {report.checkpoints} checkpoints checked{pages}"
        verdict = ("sound" if report.sound else f"{len(report.problems)} problem(s)"
                   if report.problems else "incomplete")
        stopped = "" if report.complete else f", stopped by --max-duration {max_duration}"
        click.echo(f"{verdict}: {done} in {report.seconds:.1f} s{stopped}")
    if not report.sound:
        sys.exit(EXIT_PROBLEMS if report.problems else EXIT_INCOMPLETE)
