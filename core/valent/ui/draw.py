"""``lattice.draw(...)`` and ``result.draw()``: a picture of a graph, without running anything.

In a notebook the returned :class:`Drawing` renders inline (``_repr_svg_``/``_repr_html_``).
Elsewhere it is also written, as a standalone HTML file, to ``<results dir>/drawings/`` (where
``valent ui`` lists it) and its path is printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from html import escape
from pathlib import Path
from typing import Any

from .layout import layout
from .svg import render_svg

DRAWINGS = "drawings"


class Drawing:
    """An SVG picture of a lattice's or a dispatch's graph."""

    def __init__(self, title: str, svg: str, path: Path | None = None):
        self.title = title
        self.svg = svg
        self.path = path

    def _repr_svg_(self) -> str:
        return self.svg

    def _repr_html_(self) -> str:
        return f'<div style="overflow:auto;max-height:80vh">{self.svg}</div>'

    def html(self) -> str:
        """A standalone HTML page holding the picture."""
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{escape(self.title)}</title></head><body style='margin:12px'>"
            f"{self.svg}</body></html>"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the picture to ``path``: SVG if it ends in ``.svg``, else HTML."""
        path = Path(path)
        text = self.svg if path.suffix.lower() == ".svg" else self.html()
        path.write_text(text, encoding="utf-8")
        return path

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"<Drawing {self.title!r}{where}>"


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _publish(title: str, svg: str) -> Drawing:
    drawing = Drawing(title, svg)
    if _in_notebook():
        return drawing
    from ..config import results_dir

    root = Path(results_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)  # the results dir stays private
    folder = root / DRAWINGS
    folder.mkdir(exist_ok=True, mode=0o700)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", title)[:60] or "graph"
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
    path = folder / f"{safe}-{stamp}.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(drawing.html())
    drawing.path = path
    print(f"valent: drew {title} to {path}")
    return drawing


def graph_nodes(graph: Any) -> list[dict[str, Any]]:
    """A traced Graph's nodes as the dicts :func:`~valent.ui.layout.layout` takes, each
    electron with the executor it would run on (its own, else the lattice's, else the
    config's default)."""
    from ..config import default_executor_name

    try:
        default = default_executor_name()
    except Exception:  # a bad config is reported when dispatching; a drawing still helps
        default = "local"

    def executor(node: Any) -> str | None:
        if node.kind != "electron":
            return None
        spec = getattr(node.electron, "executor", None) or graph.executor or default
        return spec if isinstance(spec, str) else getattr(spec, "name", str(spec))

    return [
        {"node_id": n.id, "name": n.name, "kind": n.kind, "parents": list(n.parents),
         "executor": executor(n)}
        for n in graph.nodes
    ]


def draw_lattice(lattice: Any, *args: Any, **kwargs: Any) -> Drawing:
    """Trace ``lattice`` with these arguments (nothing runs) and draw its graph."""
    graph = lattice.build_graph(*args, **kwargs)
    lay = layout(graph_nodes(graph))
    return _publish(lattice.name, render_svg(lay, title=f"{lattice.name} (not dispatched)"))


def draw_result(result: Any) -> Drawing:
    """Draw a dispatch's graph with its nodes coloured by status and their cancel outcomes."""
    nodes = [
        {"node_id": r["node_id"], "name": r["name"], "kind": r["kind"],
         "parents": json.loads(r["parents"]), "executor": r["executor"]}
        for r in result._nodes
    ]
    statuses = {r["node_id"]: (r["status"], r["cancel_outcome"]) for r in result._nodes}
    title = f"{result.lattice_name} {result.dispatch_id[:8]} {result.status}"
    return _publish(f"{result.lattice_name}-{result.dispatch_id[:8]}",
                    render_svg(layout(nodes), statuses, title=title))
