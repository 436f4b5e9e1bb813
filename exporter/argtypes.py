"""argparse value types that refuse an out-of-range number while the command line is parsed.

A stage's config dataclass checks its values too, but its message names the field ("steps must be >= 1");
refusing in argparse names the option ("argument --steps: must be >= 1, got -5") and happens before any model
is loaded. Light on purpose: no torch, no numpy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"want a finite number, got {text!r}")
    return value


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """A whole number >= low; `what` says what the bound means (e.g. "0 = skip")."""
    note = f" ({what})" if what else ""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{note}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value" messages
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(_number(text, int))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_above(low: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """A finite number > low (>= low with inclusive=True)."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {value:g}")
        return value

    parse.__name__ = "float"
    return parse


def float_open_unit(text: str) -> float:
    """A share strictly between 0 and 1."""
    value = float(_number(text, float))
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value:g}")
    return value


positive_int = int_at_least(1)
count_or_zero = int_at_least(0, "0 = skip")
positive_float = float_above(0.0)
nonnegative_float = float_above(0.0, inclusive=True)
