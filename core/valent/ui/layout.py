"""Lay a dispatch's graph out top-down: repeated siblings collapsed into groups, then layered.

Nodes with the same *shape* (same name and kind, parents of the same shapes) are siblings of
a map: when there are at least ``GROUP_AT`` of them they become one box ("task ×1000"), so a
10,000-node fan-out draws as a handful of boxes. The boxes are placed by grandalf's Sugiyama
layout (layers, crossing reduction, dummy points routing long edges); a graph that still has
more than ``SUGIYAMA_MAX`` boxes is placed level by level (longest-path layers, one barycenter
pass), which is linear and keeps a huge, irregular graph openable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ValentError

GROUP_AT = 12
SUGIYAMA_MAX = 800
NODE_H = 38
GROUP_H = 46
X_GAP = 24
Y_GAP = 46
PARAMETER = "parameter"


class MissingUIDependency(ValentError):
    """An optional dependency of the UI (the ``ui`` extra) is not installed."""


@dataclass(slots=True)
class Box:
    """One drawn box: a node (``members == [id]``) or a group of repeated siblings."""

    key: str
    label: str
    kind: str
    members: list[int]
    executor: str | None
    w: float
    h: float
    x: float = 0.0
    y: float = 0.0

    @property
    def group(self) -> bool:
        return len(self.members) > 1 or self.key.startswith("g")


@dataclass
class Layout:
    """Boxes with centres, edges as polylines, the drawing's size, and which box holds a node."""

    boxes: list[Box]
    edges: list[tuple[str, str, list[tuple[float, float]]]]
    width: float
    height: float
    box_of: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "boxes": [
                {"key": b.key, "label": b.label, "kind": b.kind, "members": b.members,
                 "executor": b.executor, "x": round(b.x, 1), "y": round(b.y, 1),
                 "w": b.w, "h": b.h}
                for b in self.boxes
            ],
            "edges": [[s, d, [[round(x, 1), round(y, 1)] for x, y in pts]]
                      for s, d, pts in self.edges],
            "width": round(self.width, 1),
            "height": round(self.height, 1),
        }


LABEL_CHARS = 30


def _width(label: str) -> float:
    return float(max(96, 7 * min(len(label), LABEL_CHARS) + 28))


def layout(
    nodes: Sequence[dict[str, Any]], show_parameters: bool = True, group: bool = True
) -> Layout:
    """Lay out ``nodes`` (dicts with ``node_id, name, kind, parents, executor``)."""
    visible = _topological([n for n in nodes if show_parameters or n["kind"] != PARAMETER])
    shown = {n["node_id"] for n in visible}
    # shape signature: name (kind only for parameters) and the set of the parents' shapes
    sig: dict[int, int] = {}
    shapes: dict[tuple, int] = {}
    by_shape: dict[int, list[int]] = {}
    for n in visible:
        parents = [p for p in n["parents"] if p in shown]
        name = "" if n["kind"] == PARAMETER else n["name"]
        key = (name, n["kind"], frozenset(sig[p] for p in parents))
        s = shapes.setdefault(key, len(shapes))
        sig[n["node_id"]] = s
        by_shape.setdefault(s, []).append(n["node_id"])
    info = {n["node_id"]: n for n in visible}
    boxes: list[Box] = []
    box_of: dict[int, str] = {}
    for n in visible:
        nid = n["node_id"]
        if nid in box_of:
            continue
        members = by_shape[sig[nid]]
        if group and len(members) >= GROUP_AT:
            key = f"g{nid}"
            what = "parameters" if n["kind"] == PARAMETER else n["name"]
            label = f"{what} ×{len(members)}"
            execs = {info[m]["executor"] for m in members}
            executor = execs.pop() if len(execs) == 1 else "mixed"
            width = max(_width(label), 180.0)  # room for "1234/5000 done" beside the executor
            boxes.append(Box(key, label, n["kind"], list(members), executor, width, GROUP_H))
            for m in members:
                box_of[m] = key
        else:
            key = f"n{nid}"
            boxes.append(Box(key, n["name"], n["kind"], [nid], n["executor"],
                             _width(n["name"]), NODE_H))
            box_of[nid] = key
    edge_set: dict[tuple[str, str], None] = {}
    for n in visible:
        d = box_of[n["node_id"]]
        for p in n["parents"]:
            if p in shown and box_of[p] != d:
                edge_set[(box_of[p], d)] = None
    edges = list(edge_set)
    if len(boxes) <= SUGIYAMA_MAX:
        placed = _sugiyama(boxes, edges)
    else:
        placed = _levels(boxes, edges)
    return Layout(boxes, *placed, box_of=box_of)


def _topological(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``nodes`` parents first (tracing adds an electron before its parameter nodes), ties in
    id order."""
    ids = {n["node_id"]: n for n in nodes}
    waiting = {i: sum(1 for p in n["parents"] if p in ids) for i, n in ids.items()}
    children: dict[int, list[int]] = {i: [] for i in ids}
    for i, n in ids.items():
        for p in n["parents"]:
            if p in ids:
                children[p].append(i)
    import heapq

    ready = [i for i, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(ids[i])
        for c in children[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    return out


def _sugiyama(boxes: list[Box], edges: list[tuple[str, str]]):
    try:
        from grandalf.graphs import Edge, Graph, Vertex
        from grandalf.layouts import SugiyamaLayout
    except ImportError as exc:
        raise MissingUIDependency(
            "drawing a graph needs grandalf (the graph layout library); install the UI extra: "
            "pip install 'valent[ui]'"
        ) from exc

    class _View:
        __slots__ = ("w", "h", "xy")

        def __init__(self, w: float, h: float):
            self.w, self.h, self.xy = w, h, (0.0, 0.0)

    class _EdgeView:
        __slots__ = ("pts",)

        def __init__(self) -> None:
            self.pts: list = []

        def setpath(self, pts: list) -> None:
            self.pts = pts

    verts = {}
    for b in boxes:
        v = Vertex(b.key)
        v.view = _View(b.w, b.h)
        verts[b.key] = v
    gedges = []
    for s, d in edges:
        e = Edge(verts[s], verts[d])
        e.view = _EdgeView()
        gedges.append(e)
    graph = Graph(list(verts.values()), gedges)
    x0 = 0.0
    out_edges: list[tuple[str, str, list[tuple[float, float]]]] = []
    height = 0.0
    # biggest component first, the others to its right
    for comp in sorted(graph.C, key=lambda c: -len(c.sV)):
        sug = SugiyamaLayout(comp)
        sug.xspace, sug.yspace = X_GAP, Y_GAP
        roots = [v for v in comp.sV if len(v.e_in()) == 0]
        sug.init_all(roots=roots or None, optimize=True)
        sug.draw(3)
        xs = [v.view.xy[0] - v.view.w / 2 for v in comp.sV]
        xe = [v.view.xy[0] + v.view.w / 2 for v in comp.sV]
        ys = [v.view.xy[1] - v.view.h / 2 for v in comp.sV]
        ye = [v.view.xy[1] + v.view.h / 2 for v in comp.sV]
        dx, dy = x0 - min(xs), -min(ys)
        for v in comp.sV:
            v.view.xy = (v.view.xy[0] + dx, v.view.xy[1] + dy)
        for e in comp.sE:
            pts = [(x + dx, y + dy) for x, y in e.view.pts] if e.view.pts else [
                e.v[0].view.xy, e.v[1].view.xy]
            out_edges.append((e.v[0].data, e.v[1].data, pts))
        x0 += max(xe) - min(xs) + X_GAP * 2
        height = max(height, max(ye) - min(ys))
    for b in boxes:
        b.x, b.y = verts[b.key].view.xy
    return _pad(boxes, out_edges, max(x0 - X_GAP * 2, 0.0), height)


def _levels(boxes: list[Box], edges: list[tuple[str, str]]):
    """Longest-path layers and one barycenter pass: linear, for graphs too big for Sugiyama."""
    index = {b.key: i for i, b in enumerate(boxes)}
    parents: list[list[int]] = [[] for _ in boxes]
    for s, d in edges:
        parents[index[d]].append(index[s])
    level = [0] * len(boxes)
    for i in range(len(boxes)):  # boxes come parents first
        if parents[i]:
            level[i] = 1 + max(level[p] for p in parents[i])
    rows: dict[int, list[int]] = {}
    for i, lv in enumerate(level):
        rows.setdefault(lv, []).append(i)
    pos = [0.0] * len(boxes)
    width = 0.0
    y = 0.0
    for lv in sorted(rows):
        row = rows[lv]
        if lv:
            row.sort(key=lambda i: sum(pos[p] for p in parents[i]) / len(parents[i])
                     if parents[i] else 0.0)
        x = 0.0
        h = max(boxes[i].h for i in row)
        for i in row:
            b = boxes[i]
            b.x, b.y = x + b.w / 2, y + h / 2
            pos[i] = b.x
            x += b.w + X_GAP
        width = max(width, x - X_GAP)
        y += h + Y_GAP
    out = [(s, d, [(boxes[index[s]].x, boxes[index[s]].y),
                   (boxes[index[d]].x, boxes[index[d]].y)]) for s, d in edges]
    return _pad(boxes, out, width, max(y - Y_GAP, 0.0))


def _pad(boxes, edges, width, height, pad: float = 16.0):
    for b in boxes:
        b.x += pad
        b.y += pad
    edges = [(s, d, [(x + pad, y + pad) for x, y in pts]) for s, d, pts in edges]
    return edges, width + 2 * pad, height + 2 * pad
