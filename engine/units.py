"""Sizes and durations as people write them: one set of rules for every command and tool.

Sizes: whole bytes, or a number with K, M, G or T (binary: 1K = 1024), optionally followed by
B or iB, in any case: 4096, 64M, 1.5G, 512KiB. Durations: a number with s, ms, us, m, h or d,
or a plain number of seconds: 1s, 200ms, 1.5, 10m, 2h, 3d. Both refuse anything else with a
ValueError whose message states the rule (callers add the option's name and its bounds)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "h": 3600.0,
                  "d": 86400.0}
SIZE_RULE = "a size is bytes or a number with K, M, G or T (e.g. 4096, 64M, 1.5G)"
DURATION_RULE = "a duration is a number with s, ms, us, m, h or d (e.g. 1s, 200ms, 10m)"

# Digits only: no sign, exponent, inf or nan, so every match is finite and not negative.
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE = re.compile(_NUMBER + r"\s*(?:([KMGT])(?:I?B)?|B)?", re.IGNORECASE)
_DURATION = re.compile(_NUMBER + r"\s*(ms|us|s|m|h|d)?")


def shown(text: str) -> str:
    """text quoted for an error message, cut short: the message stays one line."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_size(text: str) -> int:
    """Bytes in text (see the module's rules)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{SIZE_RULE}, not {shown(text)}")
    value = Decimal(m[1]) * SIZE_UNITS[(m[2] or "").upper()]
    if value != value.to_integral_value():
        raise ValueError(f"{shown(text)} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str) -> float:
    """Seconds in text (see the module's rules)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{DURATION_RULE}, not {shown(text)}")
    seconds = float(Decimal(m[1]) * Decimal(repr(DURATION_UNITS[m[2] or ""])))
    if not math.isfinite(seconds):
        raise ValueError(f"{shown(text)} is too long")
    return seconds


def size_text(n: int) -> str:
    """n bytes in the largest unit it fills, the way parse_size reads them (1.5G, 64M)."""
    for unit in ("T", "G", "M", "K"):
        if n >= SIZE_UNITS[unit]:
            return f"{n / SIZE_UNITS[unit]:.4g}{unit}"
    return str(n)


def duration_text(seconds: float) -> str:
    """seconds in the largest unit they fill, the way parse_duration reads them (1d, 200ms)."""
    for unit in ("d", "h", "m", "s", "ms", "us"):
        if seconds >= DURATION_UNITS[unit]:
            return f"{seconds / DURATION_UNITS[unit]:.4g}{unit}"
    return f"{seconds:g}s"
