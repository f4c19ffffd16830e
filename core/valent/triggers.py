"""Triggers: run a dispatched workflow again when something happens. No server.

``@ct.lattice(triggers=DirTrigger(...))`` (or ``trigger.lattice_dispatch_id = id;
trigger.register()``) makes *this process* watch: a file or folder changing
(:class:`DirTrigger`), time passing (:class:`TimeTrigger`), new rows in a SQLite table
(:class:`SQLiteTrigger`), rows matching a query in any database SQLAlchemy reaches
(:class:`DatabaseTrigger`). Each time one fires, the dispatch is redispatched
(``ct.redispatch``); the new dispatch records the trigger (``valent list`` shows where it
came from). A lattice with triggers is dispatched *pending*: nothing runs until a trigger
fires, and the first firing runs that very dispatch (as Covalent does).

Triggers live as long as the process that registered them (``join()`` waits for them) and
are recorded in the results store, so ``valent triggers`` lists them and ``valent triggers
stop`` stops them from any terminal; ``ct.stop_triggers(dispatch_id)`` stops every trigger of
a dispatch, in this process or another. A pending dispatch whose triggers all stop before
any fired ends CANCELLED (nothing of it ran).
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import sys
import threading
import time
import traceback
from typing import Any

from .errors import ValentError

SUPERVISE_EVERY = 0.25
"""How often (s) this process looks in the store for stop requests from other processes."""

_lock = threading.RLock()
_active: dict[int, BaseTrigger] = {}  # trigger id -> trigger observing in this process
_pending: dict[str, Any] = {}  # dispatch id -> its run, dispatched pending (not started)
_supervisor: threading.Thread | None = None


class TriggerError(ValentError):
    """A trigger that cannot observe what it was given (missing folder, table, package)."""


class BaseTrigger:
    """A condition that redispatches a dispatch each time it happens.

    Subclasses implement :meth:`poll`, which returns how many events happened since the last
    call, and set ``poll_interval``; or, as Covalent's triggers do, override
    :meth:`observe` (a loop that calls :meth:`trigger` until :meth:`stop`) and ``stop``.

    :param lattice_dispatch_id: the dispatch to redispatch (set by ``@ct.lattice(triggers=)``).
    :param dispatcher_addr: accepted for Covalent's signature; there is no server.
    :param triggers_server_addr: accepted for Covalent's signature; there is no server.
    """

    poll_interval: float = 1.0

    def __init__(
        self,
        lattice_dispatch_id: str | None = None,
        dispatcher_addr: str | None = None,
        triggers_server_addr: str | None = None,
    ):
        self.lattice_dispatch_id = lattice_dispatch_id
        self.dispatcher_addr = dispatcher_addr
        self.triggers_server_addr = triggers_server_addr
        self.new_dispatch_ids: list[str] = []
        self.id: int | None = None
        self.stop_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    # -------------------------------------------------------------- for subclasses

    def settings(self) -> dict[str, Any]:
        """What this trigger watches, as shown by ``valent triggers``."""
        return {}

    def prepare(self) -> None:
        """Check what it watches exists (raise ``TriggerError``) and take its first state."""

    def poll(self) -> int:
        """How many events happened since the last call."""
        return 0

    def observe(self) -> None:
        """Watch until stopped, calling :meth:`trigger` for each firing (the default polls
        :meth:`poll` every ``poll_interval`` seconds)."""
        while not self.stop_flag.wait(self.poll_interval):
            for _ in range(self.poll()):
                if self.stop_flag.is_set():
                    return
                self.trigger()

    def stop(self) -> None:
        """Stop observing (in this process)."""
        self.stop_flag.set()

    # -------------------------------------------------------------- machinery

    def register(self) -> None:
        """Start observing, in this process, for ``lattice_dispatch_id``."""
        from . import api
        from ._store import get_store

        if not self.lattice_dispatch_id:
            raise TriggerError(
                f"{type(self).__name__}.register(): set lattice_dispatch_id first (the "
                "dispatch it redispatches), or pass it with @ct.lattice(triggers=...)"
            )
        if self._thread is not None:
            raise TriggerError(f"{self!r} is already registered; make another one")
        store = get_store()
        self.lattice_dispatch_id = store.resolve(self.lattice_dispatch_id)
        self.prepare()
        dispatcher = api.get_dispatcher()
        self._store = store
        self.id = store.add_trigger(
            self.lattice_dispatch_id, type(self).__name__,
            json.dumps(self.settings(), default=str), dispatcher.owner,
        )
        self.stop_flag.clear()
        with _lock:
            _active[self.id] = self
            _ensure_supervisor()
        self._thread = threading.Thread(
            target=self._run, name=f"valent-trigger-{self.id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        reason = "stopped"
        try:
            self.observe()
        except Exception as exc:  # noqa: BLE001 - say why it stopped, in the store too
            reason = f"failed: {type(exc).__name__}: {exc}"
            print(f"valent: trigger {self.id} ({type(self).__name__}) {reason}", file=sys.stderr)
        finally:
            if not self.stop_flag.is_set():
                self._finish(reason)

    def trigger(self) -> None:
        """Fire: redispatch ``lattice_dispatch_id`` (the first firing of a pending dispatch
        runs that dispatch itself)."""
        if not self.lattice_dispatch_id:
            raise TriggerError(f"{type(self).__name__}: no lattice_dispatch_id to trigger")
        from . import api
        from ._redispatch import redispatch

        did = self.lattice_dispatch_id
        try:
            with _lock:
                run = _pending.pop(did, None)
            if run is not None:
                api.get_dispatcher().start(run)
                new = did
            else:
                new = redispatch(did)()
            self.new_dispatch_ids.append(new)
            if self._store is not None and self.id is not None:
                self._store.trigger_fired(self.id, new)
        except Exception:  # noqa: BLE001 - a failed firing does not stop the trigger
            print(f"valent: trigger {self.id} could not redispatch {did}:", file=sys.stderr)
            traceback.print_exc()

    def _finish(self, reason: str) -> None:
        """It stopped: forget it here, record it, and end a pending dispatch nobody fired."""
        self.stop_flag.set()
        with _lock:
            _active.pop(self.id, None)
            orphan = None
            did = self.lattice_dispatch_id
            if did in _pending and not any(
                t.lattice_dispatch_id == did for t in _active.values()
            ):
                orphan = _pending.pop(did)
        if self._store is not None and self.id is not None:
            try:
                self._store.trigger_stopped([self.id], reason)
            except ValentError as exc:
                print(f"valent: trigger {self.id}: cannot record its stop: {exc}",
                      file=sys.stderr)
        if orphan is not None:
            from . import api

            api.get_dispatcher().start(orphan, cancelled=True)

    def halt(self, reason: str = "stopped", wait: float = 5.0) -> None:
        """Stop it, wait for its thread (up to ``wait`` s) and record why."""
        if self.id is None or self.id not in _active:
            return
        try:
            self.stop()
        finally:
            self.stop_flag.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)
        self._finish(reason)

    def fresh(self, dispatch_id: str) -> BaseTrigger:
        """A copy of this (unregistered) trigger for ``dispatch_id``."""
        other = copy.copy(self)
        other.lattice_dispatch_id = dispatch_id
        other.new_dispatch_ids = []
        other.id = None
        other.stop_flag = threading.Event()
        other._thread = None
        other._store = None
        return other

    def to_dict(self) -> dict[str, Any]:
        """Covalent's description of a trigger: its settings and its name."""
        return {**self.settings(), "lattice_dispatch_id": self.lattice_dispatch_id,
                "name": type(self).__name__}

    def __repr__(self) -> str:
        what = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({what})"


def _positive(name: str, value: Any, what: str) -> float:
    from .checks import number_problem

    problem = number_problem(value, gt=0)
    if problem:
        raise TriggerError(f"{name}({what}={value!r}): {problem}; give a number of seconds > 0")
    return float(value)


class TimeTrigger(BaseTrigger):
    """Fire every ``time_gap`` seconds (the first time ``time_gap`` after registering)."""

    def __init__(self, time_gap: float, **kw: Any):
        super().__init__(**kw)
        self.time_gap = _positive("TimeTrigger", time_gap, "time_gap")
        self.poll_interval = self.time_gap

    def settings(self) -> dict[str, Any]:
        return {"time_gap": self.time_gap}

    def poll(self) -> int:
        return 1


_EVENTS = ("created", "deleted", "modified", "moved", "closed")


class DirTrigger(BaseTrigger):
    """Fire when files in a folder (or one file) are created, deleted, modified or moved.

    :param dir_path: the folder (its entries, not recursively) or file to watch.
    :param event_names: one or more of ``created``, ``deleted``, ``modified``, ``moved``.
    :param batch_size: fire once every this many events.
    :param poll_interval: seconds between looks (the folder is polled: no extra package).
    """

    def __init__(
        self, dir_path: str, event_names: str | list[str], batch_size: int = 1,
        poll_interval: float = 0.25, **kw: Any,
    ):
        super().__init__(**kw)
        names = [event_names] if isinstance(event_names, str) else list(event_names)
        bad = [n for n in names if n not in _EVENTS]
        if bad or not names:
            raise TriggerError(
                f"DirTrigger(event_names={event_names!r}): give one or more of "
                f"{', '.join(_EVENTS[:4])}"
            )
        if "closed" in names:
            raise TriggerError(
                "DirTrigger: the 'closed' event cannot be seen by polling a folder; use "
                "'modified' (it fires once a write changed the file)"
            )
        from .checks import number_problem

        if number_problem(batch_size, integer=True, ge=1):
            raise TriggerError(f"DirTrigger(batch_size={batch_size!r}): give a whole number >= 1")
        self.dir_path = str(dir_path)
        self.event_names = names
        self.batch_size = int(batch_size)
        self.poll_interval = _positive("DirTrigger", poll_interval, "poll_interval")
        self.n_changes = 0
        self._seen: dict[str, tuple[int, int, int]] = {}

    def settings(self) -> dict[str, Any]:
        return {"dir_path": self.dir_path, "event_names": self.event_names,
                "batch_size": self.batch_size}

    def _snapshot(self) -> dict[str, tuple[int, int, int]]:
        out: dict[str, tuple[int, int, int]] = {}
        if os.path.isdir(self.dir_path):
            with os.scandir(self.dir_path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    # a folder's own time changes with its content: not a modification
                    mtime = 0 if e.is_dir(follow_symlinks=False) else st.st_mtime_ns
                    out[e.path] = (st.st_ino, mtime, st.st_size if mtime else 0)
        else:
            try:
                st = os.stat(self.dir_path)
            except FileNotFoundError:
                return out
            out[self.dir_path] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    def prepare(self) -> None:
        if not os.path.exists(self.dir_path):
            raise TriggerError(f"DirTrigger: {self.dir_path} does not exist")
        self._seen = self._snapshot()

    def poll(self) -> int:
        now = self._snapshot()
        old = self._seen
        self._seen = now
        gone = {p: v for p, v in old.items() if p not in now}
        new = {p: v for p, v in now.items() if p not in old}
        moved_inodes = {v[0] for v in gone.values()} & {v[0] for v in new.values()}
        counts = {
            "created": sum(1 for v in new.values() if v[0] not in moved_inodes),
            "deleted": sum(1 for v in gone.values() if v[0] not in moved_inodes),
            "moved": len(moved_inodes),
            "modified": sum(1 for p, v in now.items() if p in old and old[p][1:] != v[1:]),
        }
        events = sum(counts[n] for n in self.event_names)
        fire = 0
        for _ in range(events):
            self.n_changes += 1
            if self.n_changes >= self.batch_size:
                self.n_changes = 0
                fire += 1
        return fire


def _table_name(cls: str, name: Any) -> str:
    """``name`` checked to be a usable table name (any text SQL can quote: spaces and quotes
    are fine, it is always quoted, never pasted into SQL as is)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise TriggerError(f"{cls}(table_name={name!r}): give the table's name as a string")
    return name


def _quoted(name: str) -> str:
    """An SQL identifier in double quotes (SQLite's and standard SQL's quoting)."""
    return '"' + name.replace('"', '""') + '"'


class SQLiteTrigger(BaseTrigger):
    """Fire once for each new row of a SQLite table whose ``status`` is ``"pending"``
    (every new row when the table has no ``status`` column). Rows are told apart by their
    ``id`` column (or rowid): each fires once.

    :param db_path: the SQLite file.
    :param table_name: the table's name (quoted in SQL: any name the database has).
    :param poll_interval: seconds between looks.
    :param status: the status a row must have to fire.
    """

    def __init__(
        self, db_path: str, table_name: str, poll_interval: float = 1.0,
        status: str = "pending", **kw: Any,
    ):
        super().__init__(**kw)
        self.db_path = str(db_path)
        self.table_name = _table_name("SQLiteTrigger", table_name)
        self.poll_interval = _positive("SQLiteTrigger", poll_interval, "poll_interval")
        self.status = status
        self.last_id = 0
        self._sql = ""

    def settings(self) -> dict[str, Any]:
        return {"db_path": self.db_path, "table_name": self.table_name, "status": self.status}

    def _connect(self) -> sqlite3.Connection:
        if not os.path.exists(self.db_path):
            raise TriggerError(f"SQLiteTrigger: no database file {self.db_path}")
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)

    def prepare(self) -> None:
        conn = self._connect()
        try:
            cols = {r[1] for r in conn.execute(f"PRAGMA table_info({_quoted(self.table_name)})")}
        finally:
            conn.close()
        if not cols:
            raise TriggerError(f"SQLiteTrigger: {self.db_path} has no table {self.table_name!r}")
        key = "id" if "id" in cols else "rowid"
        self._sql = f"SELECT {key} FROM {_quoted(self.table_name)} WHERE {key} > ?"
        if "status" in cols:
            self._sql += " AND status = ?"
        self._sql += f" ORDER BY {key}"

    def poll(self) -> int:
        conn = self._connect()
        try:
            args: tuple = (self.last_id, self.status) if "status = ?" in self._sql else (
                self.last_id,
            )
            ids = [r[0] for r in conn.execute(self._sql, args)]
        finally:
            conn.close()
        if ids:
            self.last_id = ids[-1]
        return len(ids)


class DatabaseTrigger(BaseTrigger):
    """Fire when rows of a table match ``where_clauses``, read through SQLAlchemy (any
    database it reaches), polled every ``poll_interval`` s; once every ``trigger_after_n``
    polls that find rows (as Covalent's). Needs the ``sqlalchemy`` package."""

    def __init__(
        self, db_path: str, table_name: str, poll_interval: float = 1.0,
        where_clauses: list[str] | None = None, trigger_after_n: int = 1, **kw: Any,
    ):
        super().__init__(**kw)
        try:
            import sqlalchemy  # noqa: F401
        except ImportError as exc:
            raise TriggerError(
                "DatabaseTrigger needs SQLAlchemy (pip install sqlalchemy); for a SQLite file, "
                "ct.triggers.SQLiteTrigger needs nothing more"
            ) from exc
        self.db_path = db_path
        self.table_name = _table_name("DatabaseTrigger", table_name)
        self.poll_interval = _positive("DatabaseTrigger", poll_interval, "poll_interval")
        self.where_clauses = list(where_clauses or [])
        self.trigger_after_n = int(trigger_after_n)
        self._count = 0
        self._engine: Any = None

    def settings(self) -> dict[str, Any]:
        return {"db_path": self.db_path, "table_name": self.table_name,
                "where_clauses": self.where_clauses, "trigger_after_n": self.trigger_after_n}

    def prepare(self) -> None:
        from sqlalchemy import create_engine

        self._engine = create_engine(self.db_path)

    def poll(self) -> int:
        from sqlalchemy import literal_column, select, table, text

        # the table name is quoted by SQLAlchemy as the database's dialect wants
        query = select(literal_column("1")).select_from(table(self.table_name))
        for clause in self.where_clauses:
            query = query.where(text(f"({clause})"))
        with self._engine.connect() as conn:
            found = conn.execute(query.limit(1)).first() is not None
        if not found:
            return 0
        self._count += 1
        if self._count >= self.trigger_after_n:
            self._count = 0
            return 1
        return 0


# ---------------------------------------------------------------------- process-wide


def _ensure_supervisor() -> None:
    """(under _lock) One thread that stops this process's triggers when another process
    asks (``valent triggers stop``) through the store."""
    global _supervisor
    if _supervisor is not None and _supervisor.is_alive():
        return
    _supervisor = threading.Thread(target=_supervise, name="valent-triggers", daemon=True)
    _supervisor.start()


def _supervise() -> None:
    while True:
        time.sleep(SUPERVISE_EVERY)
        with _lock:
            mine = dict(_active)
        if not mine:
            continue
        by_store: dict[int, tuple[Any, list[int]]] = {}
        for t in mine.values():
            by_store.setdefault(id(t._store), (t._store, []))[1].append(t.id)  # type: ignore
        for store, ids in by_store.values():
            try:
                asked = store.trigger_stop_requests(ids)
            except ValentError:
                continue
            for tid in asked:
                mine[tid].halt("stopped from another process")


def track_pending(run: Any) -> None:
    """A dispatch of a lattice with triggers: kept, not started, until one fires."""
    with _lock:
        _pending[run.id] = run


def stop_triggers(dispatch_ids: str | list[str], triggers_server_addr: str | None = None) -> None:
    """Stop every trigger of these dispatches: those observing in this process at once,
    those of other processes through the store (their owner stops them within a fraction of
    a second). ``triggers_server_addr`` is accepted for Covalent's signature."""
    from ._store import get_store

    ids = [dispatch_ids] if isinstance(dispatch_ids, str) else list(dispatch_ids)
    store = get_store()
    ids = [store.resolve(d) for d in ids]
    with _lock:
        mine = [t for t in _active.values() if t.lattice_dispatch_id in ids]
    for t in mine:
        t.halt("stopped (ct.stop_triggers)")
    store.request_trigger_stop(dispatch_ids=ids)


def active() -> list[BaseTrigger]:
    """The triggers observing in this process."""
    with _lock:
        return list(_active.values())


def join(timeout: float | None = None) -> bool:
    """Wait until every trigger of this process stopped (by ``stop_triggers`` or ``valent
    triggers stop`` from anywhere); False if some still run after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            left = list(_active.values())
        if not left:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_all(reason: str) -> None:
    """Stop every trigger of this process (at exit, on Ctrl-C)."""
    for t in active():
        t.halt(reason, wait=1.0)


def check_triggers(triggers: Any) -> list[BaseTrigger]:
    """``@ct.lattice(triggers=...)``: one trigger or a list of them."""
    items = [triggers] if isinstance(triggers, BaseTrigger) else list(triggers or [])
    bad = [t for t in items if not isinstance(t, BaseTrigger)]
    if bad:
        raise TriggerError(
            f"@ct.lattice(triggers=...) takes triggers (ct.triggers.DirTrigger, TimeTrigger, "
            f"SQLiteTrigger, DatabaseTrigger), got {bad[0]!r}"
        )
    return items


__all__ = [
    "BaseTrigger", "DatabaseTrigger", "DirTrigger", "SQLiteTrigger", "TimeTrigger",
    "TriggerError", "active", "join", "stop_triggers",
]


def _after_fork_in_child() -> None:
    """A forked child observes nothing: the parent's triggers are the parent's."""
    global _lock, _supervisor
    _lock = threading.RLock()
    _active.clear()
    _pending.clear()
    _supervisor = None


os.register_at_fork(after_in_child=_after_fork_in_child)
