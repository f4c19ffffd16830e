"""One set of checks for numbers a user gives valent (electron arguments, config settings).

A number here is an ``int`` or ``float`` but never a ``bool`` (``True`` is an ``int`` in
Python, and ``timeout=True`` is a mistake, not one second). ``number_problem`` and
``seconds_problem`` return the problem as text (or ``None``), so each caller can name where the
value came from and raise its own ``ValentError`` subclass; ``require`` raises, for an
executor's ``__init__``. ``Ge``/``Gt``/``Le`` (and the ``Seconds``, ``PositiveSeconds``,
``Count`` aliases) declare an executor setting's bounds, which the config check reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

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
    lt: float | None = None,
) -> str | None:
    """What is wrong with ``value`` as a number with these bounds, or None if nothing."""
    kind = "a whole number" if integer else "a number"
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{_r(value)} is not {kind}"
    if not is_number(value):
        return f"{_r(value)} is not {kind}"
    if isinstance(value, float) and not math.isfinite(value):  # (an int is always finite)
        return f"{_r(value)} is not a finite number"
    if ge is not None and value < ge:
        return f"{_r(value)} is less than {fmt_number(ge)}"
    if gt is not None and value <= gt:
        return f"{_r(value)} is not greater than {fmt_number(gt)}"
    if le is not None and value > le:
        return f"{_r(value)} is more than {fmt_number(le)}"
    if lt is not None and value >= lt:
        return f"{_r(value)} is not less than {fmt_number(lt)}"
    return None


def bounds_text(
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> str:
    """``a finite number >= 0 and <= 10``: what a value must be, for an error's "give ..."."""
    parts = [f"{op} {fmt_number(v)}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
             if v is not None]
    kind = "a whole number" if integer else "a finite number"
    return " and ".join([f"{kind} {parts[0]}" if parts else kind, *parts[1:]])


def _r(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


# Bounds an executor declares on a setting, with ``typing.Annotated``; the config check reads
# them (objects with ``ge``/``gt``/``le``/``lt`` attributes, so ``annotated_types``' work too).


@dataclass(frozen=True, slots=True)
class Ge:
    """The value must be >= ``ge``."""

    ge: float


@dataclass(frozen=True, slots=True)
class Gt:
    """The value must be > ``gt``."""

    gt: float


@dataclass(frozen=True, slots=True)
class Le:
    """The value must be <= ``le``."""

    le: float


Seconds = Annotated[float, Ge(0), Le(MAX_SECONDS)]
"""A setting in seconds that may be 0 (a grace period)."""
PositiveSeconds = Annotated[float, Gt(0), Le(MAX_SECONDS)]
"""A setting in seconds that must be more than 0 (a timeout)."""
Count = Annotated[int, Ge(1)]
"""A whole number >= 1 (workers, connections)."""


def require(
    owner: str,
    key: str,
    value: Any,
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` naming ``owner(key=...)``, the problem and the fix, unless ``value`` is a
    finite number within the bounds. For executors' ``__init__`` checks of their settings."""
    problem = number_problem(value, integer=integer, ge=ge, gt=gt, le=le)
    if problem:
        want = bounds_text(integer=integer, ge=ge, gt=gt, le=le)
        raise error(f"{owner}({key}=...): {problem}; give {want}")
