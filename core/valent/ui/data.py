"""What ``valent ui`` shows, read from the results store through a read-only connection.

Nothing here writes: a dispatch whose owner died is shown "owner dead" (``valent list`` or
``get_result`` mark it FAILED). Cancels go through :func:`valent.api.cancel`, as
``valent cancel`` does (server.py).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._store import Store
from ..errors import UnknownDispatchError
from ..status import FINAL_VALUES
from .layout import Layout, layout
from .svg import render_svg

PREVIEW_CHARS = 2000
LOG_CHUNK = 256 * 1024
_SECRET = re.compile(r"pass|secret|token|credential|private|auth", re.I)


class ReadOnlyStore(Store):
    """The store, opened ``mode=ro``: any write fails (SQLite refuses it)."""

    def _initialize(self) -> None:
        self._initialized = True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                               timeout=30, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.row_factory = sqlite3.Row
        return conn

    def exists(self) -> bool:
        return self.path.exists()

    def node_states(self, dispatch_id: str) -> list[tuple]:
        """Only the changing columns of every node, in ``STATE_KEYS`` order (cheap to poll)."""
        return self._conn().execute(
            "SELECT node_id, status, cancel_outcome, start_time, end_time, reason, "
            "cancel_requested_at, cancel_confirmed_at FROM nodes WHERE dispatch_id = ? "
            "ORDER BY node_id", (dispatch_id,)
        ).fetchall()

    def child_counts(self, dispatch_ids: Sequence[str]) -> dict[str, int]:
        """How many child dispatches (sublattices) each of ``dispatch_ids`` has."""
        if not dispatch_ids or not self.has_column("dispatches", "parent_dispatch_id"):
            return {}
        marks = ",".join("?" * len(dispatch_ids))
        return dict(self._conn().execute(
            f"SELECT parent_dispatch_id, COUNT(*) FROM dispatches "
            f"WHERE parent_dispatch_id IN ({marks}) GROUP BY parent_dispatch_id",
            list(dispatch_ids),
        ).fetchall())


STATE_KEYS = ("id", "status", "outcome", "start", "end", "reason", "cancel_requested",
              "cancel_confirmed")


def _secs(start: float | None, end: float | None, now: float) -> float | None:
    if start is None:
        return None
    return (end if end is not None else now) - start


def owner_state(row: Any) -> str:
    """``alive``/``dead`` for an unfinished dispatch's owner process, ``-`` once it is final."""
    if row["status"] in FINAL_VALUES:
        return "-"
    from ..api import _owner_dead

    return "dead" if _owner_dead(row) else "alive"


def dispatch_summary(row: Any, done: int, total: int) -> dict[str, Any]:
    now = time.time()
    return {
        "id": row["dispatch_id"], "lattice": row["lattice_name"], "status": row["status"],
        "created": row["created_at"], "start": row["start_time"], "end": row["end_time"],
        "duration": _secs(row["start_time"] or row["created_at"], row["end_time"], now),
        "done": done, "total": total, "error": row["error"], "owner_pid": row["owner_pid"],
        "owner_host": row["owner_host"], "owner": owner_state(row),
        "cancel_requested": row["cancel_requested_at"] if "cancel_requested_at" in row.keys()
        else None,
        # nesting and redispatch: the dispatch (and node) a child dispatch runs for, the
        # dispatch a redispatch came from
        "parent": _col(row, "parent_dispatch_id"), "parent_node": _col(row, "parent_node_id"),
        "redispatch_of": _col(row, "redispatch_of"),
    }


def _col(row: Any, name: str) -> Any:
    return row[name] if name in row.keys() else None


class _Tracker:
    """Per dispatch: the last node states seen and which nodes changed at each version, so a
    poll with ``since=V`` gets only what changed after V."""

    KEEP = 1000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.state: dict[int, tuple] = {}
        self.log: list[tuple[int, set[int]]] = []
        self.final = False


class Data:
    """Read-side of the UI: dispatch list, graph, changes, node detail, logs, timeline."""

    def __init__(self, results_dir: str | os.PathLike[str]):
        self.store = ReadOnlyStore(results_dir)
        self.dir = Path(results_dir).expanduser().absolute()
        self._trackers: dict[str, _Tracker] = {}
        self._layouts: dict[tuple[str, bool, bool], tuple[Layout, str, list[dict]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ list

    def dispatches(self, q: str = "", status: str = "", limit: int = 200) -> list[dict[str, Any]]:
        if not self.store.exists():
            return []
        q = q.strip().lower()
        # top-level dispatches only (a sublattice's dispatch is reached from its node), but a
        # search finds child dispatches too
        rows = self.store.list_dispatches(status=status or None, limit=limit if not q else 10**6,
                                          children=bool(q))
        out = []
        for r in rows:
            if q and q not in r["lattice_name"].lower() and not r["dispatch_id"].startswith(q):
                continue
            out.append(dispatch_summary(r, r["done"], r["node_count"]))
            if len(out) >= limit:
                break
        subs = self.store.child_counts([d["id"] for d in out])
        for d in out:
            d["subs"] = subs.get(d["id"], 0)
        return out

    def resolve(self, did: str) -> str:
        if not self.store.exists():
            raise UnknownDispatchError(did, str(self.store.path))
        return self.store.resolve(did)

    # ------------------------------------------------------------------ graph

    def graph(self, did: str, show_parameters: bool, group: bool) -> dict[str, Any]:
        key = (did, show_parameters, group)
        with self._lock:
            cached = self._layouts.get(key)
        if cached is None:  # a dispatch's graph never changes: laid out once per view option
            nodes = self.store.node_rows(did, with_outputs=False)
            info = [{"node_id": n["node_id"], "name": n["name"], "kind": n["kind"],
                     "parents": json.loads(n["parents"]), "executor": n["executor"]}
                    for n in nodes]
            lay = layout(info, show_parameters=show_parameters, group=group)
            statuses = {n["node_id"]: (n["status"], n["cancel_outcome"]) for n in nodes}
            cached = (lay, render_svg(lay, statuses, standalone=False), info)
            with self._lock:
                if len(self._layouts) > 32:
                    self._layouts.pop(next(iter(self._layouts)))
                self._layouts[key] = cached
        lay, svg, info = cached
        return {
            "svg": svg,
            "boxes": {b.key: b.members for b in lay.boxes if b.key.startswith("g")},
            "nodes": [[n["node_id"], n["name"], n["kind"], n["executor"]] for n in info],
            "parents": [n["parents"] for n in info],
        }

    def changes(self, did: str, since: int) -> dict[str, Any]:
        """Node states changed after version ``since`` (all of them for 0 or a lost cursor)."""
        with self._lock:
            tr = self._trackers.get(did)
            if tr is None:
                if len(self._trackers) >= 64:  # the oldest viewed dispatch starts over
                    self._trackers.pop(next(iter(self._trackers)))
                tr = self._trackers[did] = _Tracker()
        row = self.store.dispatch_row(did)
        with tr.lock:
            if not tr.final or not tr.state:
                changed = set()
                for st in self.store.node_states(did):
                    st = tuple(st)
                    if tr.state.get(st[0]) != st:
                        tr.state[st[0]] = st
                        changed.add(st[0])
                if changed:
                    tr.version += 1
                    tr.log.append((tr.version, changed))
                    del tr.log[: -_Tracker.KEEP]
                tr.final = row["status"] in FINAL_VALUES
            full = since <= 0 or not tr.log or since < tr.log[0][0] - 1 or since > tr.version
            if full:
                ids: Sequence[int] = sorted(tr.state)
            else:
                wanted: set[int] = set()
                for v, c in reversed(tr.log):
                    if v <= since:
                        break
                    wanted |= c
                ids = sorted(wanted)
            states = [dict(zip(STATE_KEYS, tr.state[i], strict=True)) for i in ids]
            done = sum(1 for s in tr.state.values() if s[1] in FINAL_VALUES)
            version = tr.version
        return {"version": version, "full": full, "nodes": states,
                "dispatch": dispatch_summary(row, done, len(tr.state))}

    # ------------------------------------------------------------------ node

    def node(self, did: str, nid: int) -> dict[str, Any]:

        n = self.store.node_row(did, nid)
        if n is None:
            raise KeyError(nid)
        out: dict[str, Any] = {k: n[k] for k in (
            "node_id", "name", "kind", "executor", "status", "start_time", "end_time",
            "cancel_requested_at", "cancel_confirmed_at", "cancel_outcome", "reason", "error",
            "traceback", "attempts")}
        out["duration"] = _secs(n["start_time"], n["end_time"], time.time())
        out["parents"] = []
        for p in json.loads(n["parents"]):
            pr = self.store.node_row(did, p)
            item = {"node_id": p, "name": pr["name"], "kind": pr["kind"], "status": pr["status"]}
            if pr["kind"] == "parameter" or pr["status"] == "COMPLETED":
                item["value"], _ = self._preview_row(pr)
            out["parents"].append(item)
        if n["status"] == "COMPLETED" or n["kind"] == "parameter":
            out["output"], out["output_truncated"] = self._preview_row(n)
            out["output_file"] = n["output_file"]
        out["settings"] = self._settings(n["executor"])
        # a sublattice node: the dispatch(es) it ran its inner workflow as
        out["children"] = [
            dispatch_summary(c, c["done"], c["node_count"])
            for c in self.store.child_dispatches(did) if c["parent_node_id"] == nid
        ]
        return out

    def output_text(self, did: str, nid: int) -> str:
        n = self.store.node_row(did, nid)
        if n is None:
            raise KeyError(nid)
        return repr(self._load(did, n))[: 10 * 1024 * 1024]

    def _load(self, did: str, row: Any) -> Any:
        """A node's output, unpickled the way ``Result`` does it (with whatever checks that
        store applies before unpickling); a string saying why when it cannot be loaded."""
        from ..result import Result

        return Result(self.store.dispatch_row(did), [], str(self.dir))._output(row)

    def _preview_row(self, row: Any) -> tuple[str, bool]:
        """A node output's repr, cut to ``PREVIEW_CHARS``; an output the store keeps in a file
        (over 1 MiB pickled) is not loaded for a preview, only named."""
        if row["output_file"]:
            try:
                size = os.path.getsize(row["output_file"])
            except OSError as exc:
                return f"<output file unreadable: {exc}>", False
            return f"<large output: {size:,} bytes pickled; open it with the link>", True
        return self._preview(lambda: self._load(row["dispatch_id"], row))

    @staticmethod
    def _preview(get) -> tuple[str, bool]:
        try:
            text = repr(get())
        except Exception as exc:
            return f"<cannot be loaded here: {exc!r}>", False
        if len(text) > PREVIEW_CHARS:
            return text[:PREVIEW_CHARS] + " ...", True
        return text, False

    @staticmethod
    def _settings(executor: str | None) -> dict[str, Any]:
        """The ``[executors.NAME]`` settings of this machine's config, secrets hidden."""
        if not executor:
            return {}
        try:
            from ..config import load_config

            table = load_config().get("executors", {}).get(executor, {})
        except Exception as exc:
            return {"(config)": f"cannot be read: {exc}"}
        return {k: ("(hidden)" if _SECRET.search(k) else v) for k, v in table.items()}

    # ------------------------------------------------------------------ logs

    def logs(self, did: str, nid: int, offsets: dict[str, int]) -> dict[str, Any]:
        """A task's output after ``offsets`` while it runs (from the files its worker
        writes, as ``valent logs --follow`` reads them); the stored output once it ended."""
        from ..cli.dispatches import _live_paths

        row = self.store.dispatch_row(did)
        n = self.store.node_row(did, nid)
        if n is None:
            raise KeyError(nid)
        if n["status"] in FINAL_VALUES or n["status"] != "RUNNING":
            return {"status": n["status"], "live": False, "stdout": n["stdout"] or "",
                    "stderr": n["stderr"] or "", "offsets": offsets}
        paths = _live_paths(row, n) or {}
        got: dict[str, str] = {}
        new = dict(offsets)
        for s in ("stdout", "stderr"):
            got[s] = ""
            if s not in paths:
                continue
            try:
                with open(paths[s], "rb") as f:
                    if os.fstat(f.fileno()).st_size < offsets.get(s, 0):
                        continue  # truncated: its worker moved on to another task
                    f.seek(offsets.get(s, 0))
                    data = f.read(LOG_CHUNK)
            except OSError:
                continue
            for cut in range(4):  # never split a UTF-8 character between two reads
                try:
                    got[s] = data[: len(data) - cut].decode("utf-8")
                    new[s] = offsets.get(s, 0) + len(data) - cut
                    break
                except UnicodeDecodeError:
                    continue
            else:
                got[s] = data.decode("utf-8", "replace")
                new[s] = offsets.get(s, 0) + len(data)
        return {"status": n["status"], "live": bool(paths), "stdout": got["stdout"],
                "stderr": got["stderr"], "offsets": new}

    # ------------------------------------------------------------------ timeline

    def timeline(self, did: str) -> dict[str, Any]:
        """Bars per node on rows per executor slot (a slot: tasks of one executor that never
        overlap in time, packed greedily, as many rows as ran at once)."""
        row = self.store.dispatch_row(did)
        nodes = [n for n in self.store.node_rows(did, with_outputs=False)
                 if n["kind"] == "electron" and n["start_time"] is not None]
        now = time.time()
        nodes.sort(key=lambda n: n["start_time"])
        lanes: dict[str, list[float]] = {}
        bars = []
        for n in nodes:
            ex = n["executor"] or "?"
            ends = lanes.setdefault(ex, [])
            end = n["end_time"] if n["end_time"] is not None else now
            for i, e in enumerate(ends):
                if e <= n["start_time"]:
                    ends[i] = end
                    slot = i
                    break
            else:
                ends.append(end)
                slot = len(ends) - 1
            bars.append({"id": n["node_id"], "name": n["name"], "executor": ex, "slot": slot,
                         "start": n["start_time"], "end": n["end_time"], "status": n["status"],
                         "outcome": n["cancel_outcome"]})
        t0 = row["start_time"] or row["created_at"]
        t1 = row["end_time"] or now
        return {"t0": t0, "t1": max(t1, t0 + 0.001), "now": now,
                "rows": [[ex, len(ends)] for ex, ends in sorted(lanes.items())], "bars": bars}

    # ------------------------------------------------------------------ drawings

    def drawings(self) -> list[dict[str, Any]]:
        folder = self.dir / "drawings"
        try:
            files = [p for p in folder.iterdir() if p.suffix in (".html", ".svg")]
        except OSError:
            return []
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [{"name": p.name, "mtime": p.stat().st_mtime} for p in files[:200]]

    def drawing(self, name: str) -> bytes:
        if name not in {d["name"] for d in self.drawings()}:
            raise KeyError(name)
        return (self.dir / "drawings" / name).read_bytes()
