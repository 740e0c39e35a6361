"""What every store command shares: one-line errors, the store opened read-only, JSON output,
and the text helpers of tables (sizes, times, glyphs). --json output is documented in
docs/json-schema.md."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from vmckpt.cli.main import _ckpt, _fail
from vmckpt.engine.units import parse_duration
from vmckpt.storage import PageStore, StoreError, open_store

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (docs/json-schema.md).")


SHORT_ID = 12  # hex digits of a page id in tables
UNICODE = {"fork": "├─ ", "bar": "│  ", "zero": " ", "same": "·", "shades": "░▒▓█"}
ASCII = {"fork": "|- ", "bar": "|  ", "zero": " ", "same": ".", "shades": ":+*#"}


def glyphs() -> dict[str, str]:
    """Box-drawing and shading characters, or ASCII where stdout cannot encode them."""
    try:
        "".join(UNICODE.values()).encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def json_safe(value: Any) -> Any:
    """Records as JSON: bytes (page ids) as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(json_safe(value), indent=1))


@contextmanager
def store_errors(store_path: Path) -> Iterator[None]:
    """Any failure to open or read the store ends the command with one line."""
    try:
        yield
    except StoreError as e:
        _fail(str(e))
    except (KeyError, ValueError) as e:  # a record or map that is not what it should be
        _fail(f"cannot read store {store_path} ({type(e).__name__}: {e}); "
              "`vmckpt check` says what is damaged")


@contextmanager
def reading(store_path: Path) -> Iterator[PageStore]:
    """The store opened read-only."""
    with store_errors(store_path), open_store(store_path, readonly=True) as store:
        yield store


def checkpoint_arg(text: str, store_path: Path) -> int | str:
    """An id or 'latest'; ids a store cannot hold (keys are 64-bit) are refused here."""
    which = _ckpt(text)
    if isinstance(which, int) and not 0 < which < 1 << 64:
        _fail(f"no checkpoint {which} in {store_path}")
    return which


def size_text(n: float | None) -> str:
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    scale = 0
    while abs(n) >= 1024 and scale < len(units) - 1:
        n, scale = n / 1024, scale + 1
    return f"{n:.0f} {units[scale]}" if n == int(n) else f"{n:.1f} {units[scale]}"


def ms_text(seconds: float | None, decimals: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{decimals}f}"


def local_time(t: float, *, millis: bool = False) -> str:
    text = datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{int(t * 1000) % 1000:03d}" if millis else text


def table(rows: list[list[str]], left: int = 0) -> None:
    """Prints rows (the first is the header) in aligned columns; the first `left` columns
    are left-aligned (text), the others right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())



def age(text: str) -> float | None:
    """An age like 90s, 10m, 2h, 3d in seconds; None if text is not one."""
    try:
        return parse_duration(text)
    except ValueError:
        return None

