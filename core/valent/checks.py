"""One set of checks for numbers a user gives valent (electron arguments, config settings).

A number here is an ``int`` or ``float`` but never a ``bool`` (``True`` is an ``int`` in
Python, and ``timeout=True`` is a mistake, not one second). Every check returns the problem
as text (or ``None``), so each caller can name where the value came from and raise its own
``ValentError`` subclass.
"""

from __future__ import annotations

import math
from typing import Any

MAX_SECONDS = 365 * 24 * 3600.0
"""The longest duration valent accepts (one year): longer ones overflow clocks and timers."""


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def number_problem(
    value: Any,
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> str | None:
    """What is wrong with ``value`` as a number with these bounds, or None if nothing."""
    kind = "a whole number" if integer else "a number"
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{value!r} is not {kind}"
    if not is_number(value):
        return f"{value!r} is not {kind}"
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if ge is not None and value < ge:
        return f"{value!r} is less than {fmt_number(ge)}"
    if gt is not None and value <= gt:
        return f"{value!r} is not greater than {fmt_number(gt)}"
    if le is not None and value > le:
        return f"{value!r} is more than {fmt_number(le)}"
    return None


def fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def seconds_problem(value: Any, *, allow_zero: bool = False) -> str | None:
    """What is wrong with ``value`` as a duration in seconds (positive, finite, <= 1 year)."""
    problem = number_problem(
        value, ge=0 if allow_zero else None, gt=None if allow_zero else 0, le=MAX_SECONDS
    )
    if problem is None:
        return None
    bound = ">= 0" if allow_zero else "> 0"
    return (
        f"{problem}; give seconds as a finite number {bound} and at most "
        f"{MAX_SECONDS:.0f} (1 year)"
    )
