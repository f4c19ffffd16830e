"""``Result``: what ``get_result`` returns, read from the store (so from any process)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle

from ._store import StoreTrustError, check_store_trusted, read_trusted_file
from .status import Status


def _col(row: Any, key: str, keys: list[str] | None = None) -> Any:
    """``row[key]``, or None in a store made before that column existed (``keys``: the
    row's ``keys()`` when the caller has them already)."""
    return row[key] if key in (row.keys() if keys is None else keys) else None


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def load_blob(blob: bytes | None, path: str | None, results_dir: str | Path | None = None) -> Any:
    """Unpickle an output stored inline or in a file (None when there is none).

    With ``results_dir``, the store (its folder, ``valent.db`` and WAL, and the output file)
    must be yours and writable by you only, or ``StoreTrustError`` is raised: unpickling
    runs code chosen by whoever wrote the pickle.
    """
    if path:
        if results_dir is None:
            results_dir = Path(path).parent.parent.parent
        blob = read_trusted_file(path, results_dir)
    elif blob is not None and results_dir is not None:
        check_store_trusted(results_dir)
    if blob is None:
        return None
    return cloudpickle.loads(blob)


class Result:
    """A dispatch's status, inputs, result, error, timings and per-node detail.

    Attributes follow Covalent's: ``status``, ``result``, ``error``, ``inputs``,
    ``start_time``, ``end_time``, ``dispatch_id``, ``results_dir``, plus ``lattice_name``.
    """

    def __init__(
        self, row: sqlite3.Row, nodes: list[sqlite3.Row] | None, results_dir: str,
        store: Any = None,
    ):
        """``nodes``: the dispatch's node rows, or None to read them from ``store`` (the
        ``Store`` ``row`` came from) when first needed (``get_result`` of a big final
        dispatch: its status, result and timings are there at once)."""
        self.dispatch_id: str = row["dispatch_id"]
        self.lattice_name: str = row["lattice_name"]
        self.status: Status = Status(row["status"])
        self.error: str | None = row["error"]
        self.start_time = _ts(row["start_time"])
        self.end_time = _ts(row["end_time"])
        self.created_at = _ts(row["created_at"])
        self.results_dir = results_dir
        self.cancel_requested_at = _ts(row["cancel_requested_at"])
        keys = row.keys()  # once: a list of the columns (a store made before some lacks them)
        self.parent_dispatch_id: str | None = _col(row, "parent_dispatch_id", keys)
        """The dispatch whose sublattice node this dispatch ran (None at the top level)."""
        self.parent_node_id: int | None = _col(row, "parent_node_id", keys)
        self.root_dispatch_id: str = _col(row, "root_dispatch_id", keys) or self.dispatch_id
        """The top-level dispatch of this one's tree (itself at the top level)."""
        self.redispatch_of: str | None = _col(row, "redispatch_of", keys)
        """The dispatch this one redispatched (``ct.redispatch``), if any."""
        self._row = row
        self._node_rows = nodes
        self._store = store
        self._outputs: dict[int, Any] = {}
        self._trusted = False

    def _load(self, blob: bytes | None, path: str | None) -> Any:
        """Unpickle from this store once it is known to be yours alone (checked once)."""
        if blob is not None and not self._trusted:
            check_store_trusted(self.results_dir)
            self._trusted = True
        return load_blob(blob, path, self.results_dir if path else None)

    # ------------------------------------------------------------------ values

    @property
    def result(self) -> Any:
        """The lattice's return value (None unless COMPLETED)."""
        return self._load(self._row["result"], self._row["result_file"])

    @property
    def inputs(self) -> dict[str, Any]:
        """``{"args": [...], "kwargs": {...}}`` the lattice was dispatched with."""
        try:
            args, kwargs = self._load(self._row["inputs"], None) or ((), {})
        except StoreTrustError:
            raise
        except Exception:
            return {"args": [], "kwargs": {}}
        return {"args": list(args), "kwargs": dict(kwargs)}

    def _output(self, row: sqlite3.Row) -> Any:
        nid = row["node_id"]
        if nid not in self._outputs:
            try:
                self._outputs[nid] = self._load(row["output"], row["output_file"])
            except StoreTrustError:
                raise
            except Exception as exc:
                self._outputs[nid] = f"<output cannot be loaded here: {exc!r}>"
        return self._outputs[nid]

    # ------------------------------------------------------------------ nodes

    @property
    def _nodes(self) -> list[sqlite3.Row]:
        """The node rows, read on first use when they were not given (a final dispatch's
        rows; a late node of a cancel, one that ran to completion, may be newer than
        ``status``). The same store file as ``status`` came from, or ``StoreLostError``."""
        if self._node_rows is None:
            rows = self._store.node_rows(self.dispatch_id)
            if len(rows) != (self._row["node_count"] or 0):
                from ._store import StoreLostError

                raise StoreLostError(
                    f"the results store {self.results_dir} no longer holds the nodes of "
                    f"dispatch {self.dispatch_id} (it was removed after get_result); call "
                    "get_result again"
                )
            self._node_rows = rows
            self._store = None
        return self._node_rows

    @property
    def node_count(self) -> int:
        if self._node_rows is None:
            return self._row["node_count"] or 0
        return len(self._node_rows)

    def _row_for(self, node_id: int) -> sqlite3.Row:
        if not 0 <= node_id < len(self._nodes):
            raise KeyError(f"dispatch {self.dispatch_id} has no node {node_id}")
        return self._nodes[node_id]

    def sublattice_result(self, node_id: int) -> Result | None:
        """The Result of the child dispatch a sublattice node ran (None for other nodes, or
        before it was built)."""
        sub = _col(self._row_for(node_id), "sub_dispatch_id")
        if not sub:
            return None
        from ._store import get_store

        store = get_store(self.results_dir)
        return Result(store.dispatch_row(sub), store.node_rows(sub), self.results_dir)

    def get_node_result(self, node_id: int) -> dict[str, Any]:
        """One node: ``node_id, node_name, status, output, error, start_time, end_time,
        cancel_outcome, sublattice_result`` and more (``executor, reason, traceback, stdout,
        stderr, attempts, cancel_requested_at, cancel_confirmed_at, parents,
        sub_dispatch_id``). ``sublattice_result`` is the inner Result of a sublattice node
        (None for others); ``reason`` says ``reused from <id>`` for a node a redispatch took
        from an earlier dispatch."""
        r = self._row_for(node_id)
        return {
            "node_id": r["node_id"],
            "node_name": r["name"],
            "status": Status(r["status"]),
            "output": self._output(r),
            "error": r["error"],
            "start_time": _ts(r["start_time"]),
            "end_time": _ts(r["end_time"]),
            "cancel_outcome": r["cancel_outcome"],
            "executor": r["executor"],
            "reason": r["reason"],
            "traceback": r["traceback"],
            "stdout": r["stdout"] or "",
            "stderr": r["stderr"] or "",
            "attempts": r["attempts"],
            "cancel_requested_at": _ts(r["cancel_requested_at"]),
            "cancel_confirmed_at": _ts(r["cancel_confirmed_at"]),
            "parents": json.loads(r["parents"]),
            "sub_dispatch_id": _col(r, "sub_dispatch_id"),
            "sublattice_result": self.sublattice_result(node_id),
        }

    def get_all_node_results(self) -> list[dict[str, Any]]:
        """``get_node_result`` for every node, in node order."""
        return [self.get_node_result(i) for i in range(len(self._nodes))]

    def get_all_node_outputs(self) -> dict[str, Any]:
        """``{"task_1(0)": value, ":parameter:10(1)": 10, ...}``; None where there is none."""
        return {f"{r['name']}({r['node_id']})": self._output(r) for r in self._nodes}

    def node_statuses(self) -> dict[str, Status]:
        return {f"{r['name']}({r['node_id']})": Status(r["status"]) for r in self._nodes}

    # ------------------------------------------------------------------ printing

    def __str__(self) -> str:
        inputs = self.inputs
        try:
            result = self.result
        except StoreTrustError:
            raise
        except Exception as exc:
            result = f"<cannot be loaded here: {exc!r}>"
        lines = [
            "",
            "Lattice Result",
            "==============",
            f"status: {self.status}",
            f"result: {result}",
            f"input args: {inputs['args']}",
            f"input kwargs: {inputs['kwargs']}",
            f"error: {self.error}",
            "",
            f"start_time: {self.start_time}",
            f"end_time: {self.end_time}",
            "",
            f"results_dir: {self.results_dir}",
            f"dispatch_id: {self.dispatch_id}",
            "",
            "Node Outputs",
            "------------",
        ]
        for r in self._nodes:
            detail = r["status"]
            if r["cancel_outcome"]:
                detail += f", {r['cancel_outcome']}"
            elif r["status"] == Status.CANCELLED and r["reason"]:
                detail += f", {r['reason']}"
            lines.append(f"{r['name']}({r['node_id']}): {self._output(r)!r}  [{detail}]")
        return "\n".join(lines) + "\n"

    def draw(self) -> Any:
        """Draw the graph, nodes coloured by status with their cancel outcomes (as
        ``Lattice.draw``: inline in a notebook, else an HTML file whose path is printed)."""
        from .ui.draw import draw_result

        return draw_result(self)

    def __repr__(self) -> str:
        return f"<Result {self.dispatch_id} {self.lattice_name} {self.status}>"
