"""Sizes, durations and CPU shares as written in policy files, and back.

A reviewer reads `memory: 512MiB`, not `memory: 536870912`, so the files use units; the code
uses plain numbers (bytes, seconds, cores). Parsing is strict on purpose: units are
case-sensitive (`mb` is rejected rather than guessed to be MB or MiB, since the two differ by
5%), there is one number and one unit (no `1h30m`), and a value that is zero, negative, not
finite or absurdly large is an error whose message says what to write instead.

The parsers raise `ValueError`; they run inside pydantic validators, which attach the field
and the loader attaches the file and line.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, WithJsonSchema

SIZE_UNITS: Final[dict[str, int]] = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
DURATION_UNITS: Final[dict[str, Decimal]] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
# Kernel interfaces (rlimits, cgroup files, tmpfs size=) take signed 64-bit numbers.
MAX_SIZE: Final = (1 << 63) - 1
# A wall-clock limit longer than this is a typo (seconds meant as milliseconds), not a policy.
MAX_DURATION_SECONDS: Final = 30 * 24 * 3600.0
MAX_CPU: Final = 4096.0

_SIZE_HINT = "use a size like 512MiB (units: " + ", ".join(SIZE_UNITS) + ") or a number of bytes"
_DURATION_HINT = 'use a duration like 60s, "250ms", "5m" or "1h", or a number of seconds'
_NUMBER_UNIT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s?(?P<unit>[A-Za-z]*)")
_COMPOUND = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[a-z]+){2,}")
# Spellings from other tools that mean something we can say precisely.
_SIZE_LOOKALIKES: Final[dict[str, str]] = {
    "K": "unit 'K' is ambiguous; write KiB (1024) or kB (1000)",
    "M": "unit 'M' is ambiguous; write MiB (2^20) or MB (10^6)",
    "G": "unit 'G' is ambiguous; write GiB (2^30) or GB (10^9)",
    "T": "unit 'T' is ambiguous; write TiB (2^40) or TB (10^12)",
    "Ki": "write KiB, with the B",
    "Mi": "write MiB, with the B",
    "Gi": "write GiB, with the B",
    "Ti": "write TiB, with the B",
}


def parse_size(value: Any) -> int:
    """Return `value` (an int of bytes, or a string like "512MiB") as a positive byte count."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        message = f"{_show(value)} is not a size; {_SIZE_HINT}"
        raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    if isinstance(value, int):
        return _check_size(value, _show(value))
    match = _NUMBER_UNIT.fullmatch(value.strip())
    if match is None:
        if value.strip().startswith("-"):
            raise ValueError(f"{_show(value)} is negative; {_SIZE_HINT}")
        raise ValueError(f"{_show(value)} is not a size; {_SIZE_HINT}")
    unit = match["unit"] or "B"
    if unit not in SIZE_UNITS:
        raise ValueError(f"{_show(value)}: {_unit_hint(unit)}; {_SIZE_HINT}")
    exact = Decimal(match["number"]) * SIZE_UNITS[unit]
    if exact != exact.to_integral_value():
        raise ValueError(f"{_show(value)} is not a whole number of bytes; {_SIZE_HINT}")
    return _check_size(int(exact), _show(value))


def parse_duration(value: Any) -> float:
    """Return `value` (a number of seconds, or a string like "250ms") as positive seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        message = f"{_show(value)} is not a duration; {_DURATION_HINT}"
        raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _NUMBER_UNIT.fullmatch(value.strip())
        if match is None:
            if value.strip().startswith("-"):
                raise ValueError(f"{_show(value)} is negative; {_DURATION_HINT}")
            if _COMPOUND.fullmatch(value.strip()):
                raise ValueError(
                    f"{_show(value)}: one number and one unit, so write 90m rather than 1h30m;"
                    f" {_DURATION_HINT}"
                )
            raise ValueError(f"{_show(value)} is not a duration; {_DURATION_HINT}")
        unit = match["unit"] or "s"
        if unit not in DURATION_UNITS:
            raise ValueError(
                f"{_show(value)}: unknown unit {unit!r}; {_DURATION_HINT}"
            )
        seconds = float(Decimal(match["number"]) * DURATION_UNITS[unit])
    if not math.isfinite(seconds):
        raise ValueError(f"{_show(value)} is not a finite duration; {_DURATION_HINT}")
    if seconds <= 0:
        raise ValueError(f"{_show(value)} must be more than zero; {_DURATION_HINT}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{_show(value)} is longer than 30 days; {_DURATION_HINT}")
    return seconds


def parse_cpu(value: Any) -> float:
    """Return `value` (a number of cores such as 0.5 or 2) as a positive float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        message = f"{_show(value)} is not a number of cores; use a number like 0.5 or 2"
        raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    cores = float(value)
    if not math.isfinite(cores) or cores <= 0:
        raise ValueError(f"{_show(value)} must be a number of cores more than zero, like 0.5")
    if cores > MAX_CPU:
        raise ValueError(f"{_show(value)} is more than {MAX_CPU:g} cores; use a smaller number")
    return cores


def format_size(n: int) -> str:
    """Write a byte count the way a person would in a policy file (exact, largest unit)."""
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "kB"):
        if n >= SIZE_UNITS[unit] and n % SIZE_UNITS[unit] == 0:
            return f"{n // SIZE_UNITS[unit]}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    """Write seconds as the shortest exact duration string ("5m", "250ms", "1.5s")."""
    exact = Decimal(repr(seconds))
    for unit in ("h", "m", "s", "ms"):
        count = exact / DURATION_UNITS[unit]
        if count >= 1 and count == count.to_integral_value():
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def _check_size(n: int, shown: str) -> int:
    if n <= 0:
        raise ValueError(f"{shown} must be more than zero; {_SIZE_HINT}")
    if n > MAX_SIZE:
        raise ValueError(f"{shown} is larger than the kernel accepts (2^63-1 bytes)")
    return n


def _unit_hint(unit: str) -> str:
    by_lower = {known.lower(): known for known in SIZE_UNITS}
    if unit in _SIZE_LOOKALIKES:
        return _SIZE_LOOKALIKES[unit]
    if unit.lower() in by_lower:
        return f"units are case-sensitive (write {by_lower[unit.lower()]})"
    return f"unknown unit {unit!r}"


def _show(value: Any) -> str:
    """A short, quoted rendering of a user's value for messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)? ?(" + "|".join(SIZE_UNITS) + r")?$"
_DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)? ?(ms|s|m|h)?$"

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_SIZE},
                {"type": "string", "pattern": _SIZE_PATTERN},
            ],
            "description": "Bytes, or a number and a unit: " + ", ".join(SIZE_UNITS) + ".",
            "examples": ["512MiB", "1GiB", 65536],
        }
    ),
]
"""A byte count; validated from an int or a string like "512MiB"."""

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DURATION_SECONDS},
                {"type": "string", "pattern": _DURATION_PATTERN},
            ],
            "description": "Seconds, or a number and a unit: ms, s, m, h.",
            "examples": ["60s", "250ms", "5m", "1h", 30],
        }
    ),
]
"""A duration in seconds; validated from a number or a string like "5m"."""

Cores = Annotated[
    float,
    BeforeValidator(parse_cpu),
    WithJsonSchema(
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": MAX_CPU,
            "description": "CPU cores (may be fractional, e.g. 0.5).",
        }
    ),
]
"""A number of CPU cores, more than zero."""
