"""Shared helpers for the benchmarks: one row format and one table printer."""

from __future__ import annotations

from typing import Any


def row(
    case: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str | None = None,
    goal_ratio: float | None = None,
    goal_abs: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One result: ``value`` (in ``unit``), its baseline and ratio, and whether the goal is met."""
    ratio = value / baseline if baseline else None
    met = None
    goal = ""
    if goal_ratio is not None and ratio is not None:
        met, goal = ratio <= goal_ratio, f"<= {goal_ratio}x"
    elif goal_abs is not None:
        met, goal = value <= goal_abs, f"<= {goal_abs:g} {unit}"
    return {
        "case": case, "value": value, "unit": unit, "baseline": baseline,
        "baseline_name": baseline_name, "ratio": ratio, "goal": goal, "met": met, "note": note,
    }


def report(rows: list[dict[str, Any]], json_path: str | None = None) -> None:
    """Print the rows as a table, and write them as JSON when a path is given."""
    print_table(rows)
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print rows as a table (rich when available)."""
    headers = ["case", "valent", "baseline", "ratio", "goal", "met", "note"]
    lines = []
    for r in rows:
        unit = r.get("unit", "")
        base = r.get("baseline")
        lines.append([
            r["case"],
            f"{r['value']:.3g} {unit}",
            "" if base is None else f"{base:.3g} {unit}",
            "" if r.get("ratio") is None else f"{r['ratio']:.2f}x",
            r.get("goal", ""),
            {True: "yes", False: "NO", None: ""}[r.get("met")],
            r.get("note") or (r.get("baseline_name") or ""),
        ])
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(*headers)
        for line in lines:
            t.add_row(*line)
        Console(width=160).print(t)
    except ImportError:
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def compile_valent() -> None:
    """Write bytecode for valent and its plugins, as ``pip install`` does.

    A checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (or from a read-only tree) compiles
    every module from source in each new process; start-up times (``valent list``, the
    CLI) would then measure the compiler, not valent.
    """
    import compileall
    import importlib.util
    import os

    for name in ("valent", "valent_local", "valent_dask", "valent_ssh"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            compileall.compile_dir(os.path.dirname(spec.origin), quiet=2)
