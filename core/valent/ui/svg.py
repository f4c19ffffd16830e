"""Render a :class:`~valent.ui.layout.Layout` as SVG: one renderer for ``draw()`` files,
notebooks and the ``valent ui`` dispatch page (whose script then recolours boxes live).

Every box is ``<g class="box s-STATUS" id="b-KEY">``; a group box carries a status bar whose
segments are the share of its members in each status.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from html import escape

from .layout import LABEL_CHARS, PARAMETER, Box, Layout

STATUS_ORDER = ("COMPLETED", "RUNNING", "PENDING", "NEW_OBJECT", "CANCELLED", "FAILED")

STYLE = """
.vg text{font:12px system-ui,-apple-system,'DejaVu Sans',sans-serif;fill:#111827}
.vg .edge{fill:none;stroke:#94a3b8;stroke-width:1.3}
.vg .box rect.frame{stroke:#475569;stroke-width:1;rx:6;fill:#f1f5f9}
.vg .box.k-parameter rect.frame{fill:#fff;stroke-dasharray:3 3;stroke:#94a3b8}
.vg .box.k-parameter text.label{fill:#475569;font-size:11px}
.vg .box text.exec{font-size:9.5px;fill:#475569}
.vg .box text.badge{font-size:9.5px;font-weight:600;fill:#7f1d1d}
.vg .box.sel rect.frame{stroke:#1d4ed8;stroke-width:3}
.vg .s-NEW_OBJECT rect.frame{fill:#e5e7eb}
.vg .s-PENDING rect.frame{fill:#dbeafe}
.vg .s-RUNNING rect.frame{fill:#93c5fd;stroke:#1d4ed8;stroke-width:2}
.vg .s-COMPLETED rect.frame{fill:#86efac}
.vg .s-FAILED rect.frame{fill:#fca5a5;stroke:#b91c1c}
.vg .s-CANCELLED rect.frame{fill:#fde68a;stroke:#b45309}
.vg rect.c-COMPLETED{fill:#16a34a}.vg rect.c-RUNNING{fill:#2563eb}
.vg rect.c-PENDING{fill:#93c5fd}.vg rect.c-NEW_OBJECT{fill:#d1d5db}
.vg rect.c-CANCELLED{fill:#d97706}.vg rect.c-FAILED{fill:#dc2626}
.vg rect.track{fill:#fff;stroke:#64748b;stroke-width:.5}
"""


def box_status(box: Box, statuses: Mapping[int, tuple[str, str | None]]) -> tuple[str, str]:
    """(status class, badge text) of a box from its members' (status, cancel outcome)."""
    if len(box.members) == 1 and not box.key.startswith("g"):
        status, outcome = statuses.get(box.members[0], ("NEW_OBJECT", None))
        return status, outcome or ""
    counts = Counter(statuses.get(m, ("NEW_OBJECT", None))[0] for m in box.members)
    outcomes = Counter(statuses.get(m, ("NEW_OBJECT", None))[1] for m in box.members)
    outcomes.pop(None, None)
    for s in ("RUNNING", "FAILED", "CANCELLED", "PENDING"):
        if counts.get(s):
            status = s
            break
    else:
        status = "COMPLETED" if counts.get("COMPLETED") == len(box.members) else "NEW_OBJECT"
    badge = ", ".join(f"{n} {o}" for o, n in outcomes.most_common(2))
    if not badge:
        done = sum(counts.get(s, 0) for s in ("COMPLETED", "FAILED", "CANCELLED"))
        badge = f"{done}/{len(box.members)} done"
    return status, badge


def _bar(box: Box, statuses: Mapping[int, tuple[str, str | None]]) -> str:
    counts = Counter(statuses.get(m, ("NEW_OBJECT", None))[0] for m in box.members)
    x0 = box.x - box.w / 2 + 6
    width = box.w - 12
    y = box.y + 1
    parts, x = [f'<rect class="track" x="{x0:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="5"/>'], x0
    for s in STATUS_ORDER:
        if counts.get(s):
            w = width * counts[s] / len(box.members)
            parts.append(f'<rect class="c-{s}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                         f'height="5"/>')
            x += w
    return f'<g class="bar">{"".join(parts)}</g>'


def render_svg(
    lay: Layout,
    statuses: Mapping[int, tuple[str, str | None]] | None = None,
    title: str = "",
    standalone: bool = True,
) -> str:
    """SVG text of ``lay``; ``statuses`` maps node id to (status, cancel outcome)."""
    statuses = statuses or {}
    out: list[str] = []
    w = max(lay.width, 120, 7.5 * len(title) + 16)
    h = max(lay.height, 60) + (24 if title else 0)
    top = 24 if title else 0
    attrs = 'xmlns="http://www.w3.org/2000/svg" ' if standalone else ""
    out.append(f'<svg {attrs}class="vg" width="{w:.0f}" height="{h:.0f}" '
               f'viewBox="0 0 {w:.0f} {h:.0f}">')
    out.append(f"<style>{STYLE}</style>")
    out.append('<defs><marker id="vg-arrow" viewBox="0 0 8 8" refX="8" refY="4" '
               'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
               '<path d="M0,0 L8,4 L0,8 z" fill="#94a3b8"/></marker></defs>')
    if title:
        out.append(f'<text x="8" y="16" style="font-weight:600">{escape(title)}</text>')
    out.append(f'<g transform="translate(0,{top})">')
    boxes = {b.key: b for b in lay.boxes}
    out.append('<g class="edges">')
    for s, d, pts in lay.edges:
        a, b = boxes[s], boxes[d]
        pts = list(pts)
        pts[0] = (pts[0][0], a.y + a.h / 2)
        pts[-1] = (pts[-1][0], b.y - b.h / 2)
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polyline class="edge" data-s="{s}" data-d="{d}" points="{path}" '
                   'marker-end="url(#vg-arrow)"/>')
    out.append("</g>")
    for b in lay.boxes:
        status, badge = box_status(b, statuses)
        kind = "parameter" if b.kind == PARAMETER else b.kind
        x, y = b.x - b.w / 2, b.y - b.h / 2
        label = b.label if len(b.label) <= LABEL_CHARS else b.label[: LABEL_CHARS - 3] + "..."
        tip = b.label if b.key.startswith("g") else f"{b.label}({b.members[0]})"
        out.append(f'<g class="box s-{status} k-{kind}" id="b-{b.key}" data-key="{b.key}">'
                   f"<title>{escape(tip)}</title>"
                   f'<rect class="frame" x="{x:.1f}" y="{y:.1f}" width="{b.w:.0f}" '
                   f'height="{b.h:.0f}" rx="6"/>')
        ty = b.y - 6 if b.key.startswith("g") else b.y + (4 if b.kind == PARAMETER else -2)
        out.append(f'<text class="label" x="{b.x:.1f}" y="{ty:.1f}" '
                   f'text-anchor="middle">{escape(label)}</text>')
        if b.kind != PARAMETER:
            if b.executor:
                out.append(f'<text class="exec" x="{x + 5:.1f}" y="{y + b.h - 4:.1f}">'
                           f"{escape(b.executor)}</text>")
            out.append(f'<text class="badge" x="{x + b.w - 5:.1f}" y="{y + b.h - 4:.1f}" '
                       f'text-anchor="end">{escape(badge)}</text>')
        if b.key.startswith("g"):
            out.append(_bar(b, statuses))
        out.append("</g>")
    out.append("</g></svg>")
    return "".join(out)
