"""The results store: one SQLite file (WAL) under the results dir, shared by every process.

Holds dispatches, nodes, statuses, timings, cancel outcomes, errors and outputs (cloudpickle;
outputs over ``INLINE_LIMIT`` bytes go to files beside it), plus the cancel requests other
processes leave for a dispatch's owner. Outputs are pickles: open a store only if you trust
whoever wrote it (see docs/security.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import StoreError, UnknownDispatchError
from .status import FINAL, Status

INLINE_LIMIT = 1 << 20
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS dispatches (
    dispatch_id TEXT PRIMARY KEY,
    lattice_name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    inputs BLOB,
    input_repr TEXT,
    result BLOB,
    result_file TEXT,
    error TEXT,
    owner_pid INTEGER,
    owner_host TEXT,
    owner_started REAL,
    cancel_requested_at REAL,
    node_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dispatches_created ON dispatches (created_at);
CREATE TABLE IF NOT EXISTS nodes (
    dispatch_id TEXT NOT NULL,
    node_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    executor TEXT,
    parents TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL,
    start_time REAL,
    end_time REAL,
    cancel_requested_at REAL,
    cancel_confirmed_at REAL,
    cancel_outcome TEXT,
    reason TEXT,
    output BLOB,
    output_file TEXT,
    error TEXT,
    traceback TEXT,
    stdout TEXT,
    stderr TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    live_output TEXT,
    PRIMARY KEY (dispatch_id, node_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cancel_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dispatch_id TEXT NOT NULL,
    task_ids TEXT,
    requested_at REAL NOT NULL,
    handled_at REAL
);
CREATE INDEX IF NOT EXISTS cancel_requests_open ON cancel_requests (handled_at, dispatch_id);
"""

NODE_FIELDS = (
    "status", "start_time", "end_time", "cancel_requested_at", "cancel_confirmed_at",
    "cancel_outcome", "reason", "output", "output_file", "error", "traceback", "stdout",
    "stderr", "attempts", "executor", "live_output",
)
ADDED_COLUMNS = {"nodes": {"live_output": "TEXT"}}
"""Columns added since schema version 1: a store made by an older valent gains them."""
DISPATCH_FIELDS = (
    "status", "start_time", "end_time", "result", "result_file", "error",
    "cancel_requested_at",
)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) if missing."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(
            f"cannot create the results dir {path}: {exc}; set VALENT_RESULTS_DIR to a "
            "writable folder"
        ) from exc


class Store:
    """A results store at ``<results_dir>/valent.db``; safe to use from many threads."""

    def __init__(self, results_dir: str | os.PathLike[str]):
        self.dir = Path(results_dir).expanduser().absolute()
        self.path = self.dir / "valent.db"
        self.outputs_dir = self.dir / "outputs"
        self._local = threading.local()
        self._initialized = False
        self._init_lock = threading.Lock()

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if not self._initialized:
                self._initialize()
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _read_only_media(self) -> bool:
        """True when the store exists on a file system we cannot write (read it as is then)."""
        return self.path.exists() and not os.access(self.dir, os.W_OK)

    def _connect(self) -> sqlite3.Connection:
        if self._read_only_media():
            try:
                # immutable: nobody can write read-only media, so no locks or -shm are needed
                conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro&immutable=1", uri=True, isolation_level=None
                )
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot open the read-only results store {self.path}: {exc}"
                ) from exc
            conn.row_factory = sqlite3.Row
            return conn
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the results store {self.path}: {exc}; check that the folder "
                "is writable and the disk not full, or set VALENT_RESULTS_DIR"
            ) from exc
        conn.row_factory = sqlite3.Row
        return conn

    def _initialize(self) -> None:
        with self._init_lock:
            if self._initialized:
                return
            if self._read_only_media():
                self._initialized = True  # read what is there; writes will say why they fail
                return
            ensure_private_dir(self.dir)
            conn = self._connect()
            try:
                conn.executescript(SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                for table, cols in ADDED_COLUMNS.items():
                    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                    for col, decl in cols.items():
                        if col not in have:
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot initialize the results store {self.path}: {exc}") from exc
            finally:
                conn.close()
            self._initialized = True

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _write(self, fn, *args: Any) -> Any:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn, *args)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot write to the results store {self.path}: {exc}; free disk space or "
                "make the folder writable (nothing already stored was changed)"
            ) from exc

    # ------------------------------------------------------------------ writes

    def create_dispatch(
        self,
        row: dict[str, Any],
        nodes: Sequence[dict[str, Any]] | Sequence[tuple],
        node_columns: Sequence[str] | None = None,
    ) -> None:
        """Insert a new dispatch and all its nodes in one transaction.

        ``nodes`` are dicts, or tuples in the order of ``node_columns`` (faster for big graphs).
        """
        if nodes and node_columns is None:
            node_columns = list(nodes[0])  # type: ignore[arg-type]
            nodes = [tuple(n[k] for k in node_columns) for n in nodes]  # type: ignore[index]

        def op(conn: sqlite3.Connection) -> None:
            cols = ", ".join(row)
            conn.execute(
                f"INSERT INTO dispatches ({cols}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            if nodes:
                names = ", ".join(node_columns)  # type: ignore[arg-type]
                marks = ", ".join("?" * len(node_columns))  # type: ignore[arg-type]
                conn.executemany(f"INSERT INTO nodes ({names}) VALUES ({marks})", nodes)

        self._write(op)

    def apply(
        self,
        node_updates: Iterable[tuple[str, int, dict[str, Any]]],
        dispatch_updates: Iterable[tuple[str, dict[str, Any]]] = (),
    ) -> None:
        """Apply many node and dispatch updates in one transaction (the dispatcher's batch)."""
        groups: dict[tuple[str, ...], list[tuple]] = defaultdict(list)
        for did, nid, fields in node_updates:
            keys = tuple(fields)
            groups[keys].append((*fields.values(), did, nid))
        dgroups: dict[tuple[str, ...], list[tuple]] = defaultdict(list)
        for did, fields in dispatch_updates:
            dgroups[tuple(fields)].append((*fields.values(), did))
        if not groups and not dgroups:
            return

        def op(conn: sqlite3.Connection) -> None:
            for keys, rows in groups.items():
                sets = ", ".join(f"{k} = ?" for k in keys)
                conn.executemany(
                    f"UPDATE nodes SET {sets} WHERE dispatch_id = ? AND node_id = ?", rows
                )
            for keys, rows in dgroups.items():
                sets = ", ".join(f"{k} = ?" for k in keys)
                conn.executemany(f"UPDATE dispatches SET {sets} WHERE dispatch_id = ?", rows)

        self._write(op)

    def output_fields(self, dispatch_id: str, node_id: int | None, blob: bytes) -> dict[str, Any]:
        """Store fields for an output: inline, or a file for large ones (then its path)."""
        if len(blob) <= INLINE_LIMIT:
            return {"output": blob, "output_file": None}
        folder = self.outputs_dir / dispatch_id
        ensure_private_dir(folder)
        name = "result.pkl" if node_id is None else f"node-{node_id}.pkl"
        path = folder / name
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"cannot write output file {path}: {exc}") from exc
        return {"output": None, "output_file": str(path)}

    def request_cancel(self, dispatch_id: str, task_ids: list[int] | None) -> None:
        """Leave a cancel request for the dispatch's owner (from any process)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO cancel_requests (dispatch_id, task_ids, requested_at) "
                "VALUES (?, ?, ?)",
                (dispatch_id, None if task_ids is None else json.dumps(task_ids), time.time()),
            )

        self._write(op)

    def take_cancel_requests(self, dispatch_ids: Iterable[str]) -> list[tuple[str, Any]]:
        """Claim the open cancel requests for these dispatches: [(dispatch_id, task_ids)]."""
        ids = list(dispatch_ids)
        if not ids:
            return []
        conn = self._conn()
        rows = conn.execute(
            "SELECT id, dispatch_id, task_ids FROM cancel_requests WHERE handled_at IS NULL"
        ).fetchall()
        wanted = set(ids)
        mine = [r for r in rows if r["dispatch_id"] in wanted]
        if not mine:
            return []

        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE cancel_requests SET handled_at = ? WHERE id = ?",
                [(time.time(), r["id"]) for r in mine],
            )

        self._write(op)
        return [
            (r["dispatch_id"], None if r["task_ids"] is None else json.loads(r["task_ids"]))
            for r in mine
        ]

    def mark_orphaned(self, dispatch_id: str, error: str) -> bool:
        """Mark a dispatch whose owner died FAILED and its unfinished nodes CANCELLED."""
        final = tuple(s.value for s in FINAL)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"UPDATE dispatches SET status = ?, error = ?, end_time = ? "
                f"WHERE dispatch_id = ? AND status NOT IN ({', '.join('?' * len(final))})",
                (Status.FAILED.value, error, time.time(), dispatch_id, *final),
            )
            if cur.rowcount == 0:
                return False
            conn.execute(
                f"UPDATE nodes SET status = ?, reason = ?, end_time = ? "
                f"WHERE dispatch_id = ? AND status NOT IN ({', '.join('?' * len(final))})",
                (Status.CANCELLED.value, "owner process died", time.time(), dispatch_id, *final),
            )
            return True

        return self._write(op)

    # ------------------------------------------------------------------ reads

    def resolve(self, id_or_prefix: str) -> str:
        """The full dispatch id for an id or a unique prefix (>= 4 characters) of one.

        A prefix is matched literally, as text: only hex digits and dashes (what dispatch ids
        are made of) are taken, so ``%``, ``_`` or ``*`` never act as wildcards.
        """
        conn = self._conn()
        row = conn.execute(
            "SELECT dispatch_id FROM dispatches WHERE dispatch_id = ?", (id_or_prefix,)
        ).fetchone()
        if row:
            return row[0]
        prefix = id_or_prefix.strip().lower()
        if not prefix or set(prefix) - set("0123456789abcdef-"):
            raise UnknownDispatchError(
                id_or_prefix, str(self.path),
                "not a dispatch id: ids are hex digits and dashes, like 3f2a9c1e-...",
            )
        if len(prefix) < 4:
            raise UnknownDispatchError(
                id_or_prefix, str(self.path), "a prefix needs at least 4 characters"
            )
        # a range on the primary key: every id that starts with exactly these characters
        rows = conn.execute(
            "SELECT dispatch_id FROM dispatches WHERE dispatch_id >= ? AND dispatch_id < ? "
            "LIMIT 2",
            (prefix, prefix + "~"),  # "~" sorts after every hex digit and "-"
        ).fetchall()
        if len(rows) == 1:
            return rows[0][0]
        if len(rows) > 1:
            raise UnknownDispatchError(
                id_or_prefix, str(self.path), "ambiguous prefix; give more characters"
            )
        raise UnknownDispatchError(id_or_prefix, str(self.path))

    def dispatch_row(self, dispatch_id: str) -> sqlite3.Row:
        row = self._conn().execute(
            "SELECT * FROM dispatches WHERE dispatch_id = ?", (dispatch_id,)
        ).fetchone()
        if row is None:
            raise UnknownDispatchError(dispatch_id, str(self.path))
        return row

    def node_row(self, dispatch_id: str, node_id: int) -> sqlite3.Row:
        """One node of a dispatch (it must exist)."""
        return self._conn().execute(
            "SELECT * FROM nodes WHERE dispatch_id = ? AND node_id = ?", (dispatch_id, node_id)
        ).fetchone()

    def node_rows(self, dispatch_id: str, with_outputs: bool = True) -> list[sqlite3.Row]:
        cols = "*" if with_outputs else (
            "dispatch_id, node_id, name, kind, executor, parents, status, start_time, end_time,"
            " cancel_requested_at, cancel_confirmed_at, cancel_outcome, reason, error, attempts"
        )
        return self._conn().execute(
            f"SELECT {cols} FROM nodes WHERE dispatch_id = ? ORDER BY node_id", (dispatch_id,)
        ).fetchall()

    def dispatch_status(self, dispatch_id: str) -> str | None:
        row = self._conn().execute(
            "SELECT status FROM dispatches WHERE dispatch_id = ?", (dispatch_id,)
        ).fetchone()
        return row[0] if row else None

    def list_dispatches(self, status: str | None = None, limit: int = 20) -> list[sqlite3.Row]:
        """Recent dispatches, newest first, with done/total node counts."""
        sql = (
            "SELECT d.dispatch_id, d.lattice_name, d.status, d.created_at, d.start_time, "
            "d.end_time, d.node_count, d.error, d.owner_pid, d.owner_host, d.owner_started, "
            "(SELECT COUNT(*) FROM nodes n WHERE n.dispatch_id = d.dispatch_id "
            " AND n.status IN ('COMPLETED','FAILED','CANCELLED')) AS done "
            "FROM dispatches d"
        )
        args: list[Any] = []
        if status:
            sql += " WHERE d.status = ?"
            args.append(status)
        sql += " ORDER BY d.created_at DESC LIMIT ?"
        args.append(limit)
        return self._conn().execute(sql, args).fetchall()


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def get_store(results_dir: str | os.PathLike[str] | None = None) -> Store:
    """The store for ``results_dir`` (default: the configured results dir), shared per path."""
    if results_dir is None:
        from .config import results_dir as configured

        results_dir = configured()
    key = Path(results_dir).expanduser().absolute()
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = Store(key)
        return store


def _forget_stores_after_fork() -> None:
    """A forked child must not use its parent's SQLite connections: it opens its own."""
    global _stores_lock
    _stores.clear()
    _stores_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_stores_after_fork)
