"""The CLI's sizes, durations and checkpoint ids as click types: a bad value is a usage error
(exit 2) in one line that names the option and says what it takes, never a traceback."""

from __future__ import annotations

import os
from typing import Any

import click
from vmckpt.engine.units import duration_text, parse_duration, parse_size, shown, size_text

MAX_ID = (1 << 64) - 1  # store keys are 64-bit


def physical_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Size(click.ParamType):
    """Bytes within [lo, hi] (hi: an int, or a callable for a machine-dependent bound)."""

    name = "size"

    def __init__(self, lo: int = 0, hi: int | Any = 1 << 40, why: str = "") -> None:
        self.lo, self._hi, self.why = lo, hi, why

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            n = parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        hi = self._hi() if callable(self._hi) else self._hi
        if not self.lo <= n <= hi:
            self.fail(f"{shown(value)} is out of range: {size_text(self.lo)} to {size_text(hi)}"
                      f"{self.why}", param, ctx)
        return n


class Duration(click.ParamType):
    """Seconds within [lo, hi]; positive: lo itself is excluded (0 means 'more than 0').
    words: values passed through as they are (e.g. 'auto')."""

    name = "duration"

    def __init__(self, lo: float = 0.0, hi: float = 86400.0, *, positive: bool = False,
                 words: tuple[str, ...] = ()) -> None:
        self.lo, self.hi, self.positive, self.words = lo, hi, positive, words

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float | str:
        if isinstance(value, float) or value in self.words:
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            words = " or ".join(map(repr, self.words))
            self.fail(f"{words} or a duration: {e}" if words else str(e), param, ctx)
        low_ok = seconds > self.lo if self.positive else seconds >= self.lo
        if not (low_ok and seconds <= self.hi):
            lo = ("more than " if self.positive else "") + (duration_text(self.lo)
                                                            if self.lo else "0")
            self.fail(f"{shown(value)} is out of range: {lo} to {duration_text(self.hi)}",
                      param, ctx)
        return seconds


def parse_checkpoint(text: str) -> int | str:
    """A checkpoint id (a whole number, not negative) or 'latest'; ValueError otherwise."""
    if text == "latest":
        return text
    if text.isascii() and text.isdigit():
        return int(text)
    raise ValueError(f"a checkpoint is a number or 'latest' (ids are 0 to {MAX_ID}), "
                     f"not {shown(text)}")


class CheckpointId(click.ParamType):
    """A checkpoint id a store can hold (keys are 64-bit), or 'latest'."""

    name = "ckpt"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        try:
            which = parse_checkpoint(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if isinstance(which, int) and which > MAX_ID:
            self.fail(f"no checkpoint {shown(value)} can exist: ids are 0 to {MAX_ID}",
                      param, ctx)
        return which
