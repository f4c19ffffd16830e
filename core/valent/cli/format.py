"""Formatting for the dispatch commands of the CLI: times, tables, JSON, colors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from ..checks import MAX_SECONDS, fmt_number, number_problem
from ..status import Status
from .progress import dispatch_seconds, fmt_secs, node_counts

STATUS_COLORS = {
    "COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow", "CANCELLING": "magenta",
    "RUNNING": "cyan", "PENDING": "blue",
}


class Seconds(click.ParamType):
    """A finite number (of seconds, by default) in ``[low, high]``: no inf, nan or 1e300.

    (``click.FloatRange`` lets ``nan`` through: it compares False with both bounds.)
    """

    def __init__(self, low: float = 0.0, high: float = MAX_SECONDS, what: str = "seconds"):
        self.low, self.high, self.name = low, high, what

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number ({self.name})", param, ctx)
        problem = number_problem(number, ge=self.low, le=self.high)
        if problem:
            self.fail(
                f"{problem}; give a finite number from {fmt_number(self.low)} to "
                f"{fmt_number(self.high)}",
                param,
                ctx,
            )
        return number


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def ts(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC).isoformat()


def local(value: float | None) -> str:
    return "-" if value is None else datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def seconds(start: float | None, end: float | None, running: bool) -> float | None:
    if start is None:
        return None
    if end is None:
        return time.time() - start if running else None
    return max(0.0, end - start)


duration = dispatch_seconds


def node_duration(n: Any) -> float | None:
    return seconds(n["start_time"], n["end_time"], n["status"] == Status.RUNNING)


def node_note(n: Any) -> str:
    """The reason a node ended as it did (cancel reason, or the first line of its error)."""
    if n["error"]:
        return one_line(n["error"])[:100]
    return n["reason"] or ""


def label(n: Any) -> str:
    return f"{n['name']}({n['node_id']})"


def styled(status: str) -> str:
    return click.style(status, fg=STATUS_COLORS.get(status))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], color_col: int = -1) -> str:
    """Plain aligned columns (colored status when the output is a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in cells:
        parts = [
            (styled(c) + " " * (w - len(c))) if i == color_col else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def dispatch_json(row: Any, nodes: Sequence[Any]) -> dict[str, Any]:
    done, total, counts = node_counts(nodes)
    return {
        "dispatch_id": row["dispatch_id"],
        "lattice_name": row["lattice_name"],
        "status": row["status"],
        "created_at": ts(row["created_at"]),
        "start_time": ts(row["start_time"]),
        "end_time": ts(row["end_time"]),
        "duration": duration(row),
        "error": row["error"],
        "owner": {"pid": row["owner_pid"], "host": row["owner_host"]},
        "nodes_done": done,
        "node_count": total,
        "node_statuses": dict(counts),
    }


def node_json(n: Any) -> dict[str, Any]:
    return {
        "node_id": n["node_id"],
        "name": n["name"],
        "kind": n["kind"],
        "status": n["status"],
        "executor": n["executor"],
        "cancel_outcome": n["cancel_outcome"],
        "start_time": ts(n["start_time"]),
        "end_time": ts(n["end_time"]),
        "duration": node_duration(n),
        "cancel_requested_at": ts(n["cancel_requested_at"]),
        "cancel_confirmed_at": ts(n["cancel_confirmed_at"]),
        "reason": n["reason"],
        "error": n["error"],
        "attempts": n["attempts"],
    }


class Nested:
    """A node row with its depth in a dispatch's tree (0: the dispatch's own nodes; 1: the
    nodes of a sublattice's child dispatch, shown under its node; ...)."""

    __slots__ = ("row", "depth")

    def __init__(self, row: Any, depth: int):
        self.row = row
        self.depth = depth

    def __getitem__(self, key: str) -> Any:
        return self.row[key]

    def keys(self) -> Any:
        return self.row.keys()


def node_tree(store: Any, dispatch_id: str, nodes: Sequence[Any], depth: int = 0) -> list[Any]:
    """``nodes`` with, after each sublattice node, the nodes of its child dispatch (and theirs,
    recursively), each knowing its depth."""
    out: list[Any] = []
    subs: dict[int, str] = {}
    if any(n["kind"] == "sublattice" for n in nodes):
        subs = {c["parent_node_id"]: c["dispatch_id"] for c in store.child_dispatches(dispatch_id)}
    for n in nodes:
        out.append(Nested(n, depth))
        child = subs.get(n["node_id"])
        if child is not None:
            inner = store.node_rows(child, with_outputs=False)
            out += node_tree(store, child, inner, depth + 1)
    return out


def _indent(n: Any) -> str:
    return "  " * getattr(n, "depth", 0)


def tree_id(n: Any) -> str:
    """The node's id, indented by its depth in the tree."""
    return f"{_indent(n)}{n['node_id']}"


def tree_name(n: Any) -> str:
    return f"{_indent(n)}{n['name']}"


def tree_label(n: Any) -> str:
    return f"{_indent(n)}{label(n)}"


def node_table(nodes: Sequence[Any]) -> str:
    rows = [
        (
            tree_id(n), tree_name(n), n["status"], n["executor"] or "-",
            n["cancel_outcome"] or "-", fmt_secs(node_duration(n)), node_note(n),
        )
        for n in nodes
    ]
    return table(
        ("ID", "NAME", "STATUS", "EXECUTOR", "CANCEL", "DURATION", "REASON"), rows, color_col=2
    )


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def safe_repr(get: Callable[[], Any]) -> str:
    try:
        return repr(get())
    except Exception as exc:
        return f"<cannot be loaded here: {exc!r}>"
