"""The results store: one SQLite file (WAL) under the results dir, shared by every process.

Holds dispatches, nodes, statuses, timings, cancel outcomes, errors and outputs (cloudpickle;
outputs over ``INLINE_LIMIT`` bytes go to files beside it), plus the cancel requests other
processes leave for a dispatch's owner. Outputs are pickles: open a store only if you trust
whoever wrote it (see docs/security.md).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
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
RESERVE_NAME = "valent.reserve"
RESERVE_MIN = 256 << 10
RESERVE_MAX = 2 << 20
"""A file of this size (1% of the file system, within these bounds) is kept in the results
dir and freed when the disk fills, so that the final state of the dispatches can still be
written (``Store.write_after_error``)."""
KEEP_TEXT = 4096
"""After a disk-full error, stdout/stderr/tracebacks are cut to their last this many chars."""

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
    node_count INTEGER NOT NULL DEFAULT 0,
    parent_dispatch_id TEXT,
    parent_node_id INTEGER,
    root_dispatch_id TEXT,
    redispatch_of TEXT,
    lattice BLOB,
    trigger_id INTEGER
);
CREATE INDEX IF NOT EXISTS dispatches_created ON dispatches (created_at);
CREATE INDEX IF NOT EXISTS dispatches_status ON dispatches (status);
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
    sub_dispatch_id TEXT,
    fn_digest TEXT,
    in_digest TEXT,
    out_digest TEXT,
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

ADDED_COLUMNS = {
    "nodes": {
        "live_output": "TEXT", "sub_dispatch_id": "TEXT", "fn_digest": "TEXT",
        "in_digest": "TEXT", "out_digest": "TEXT",
    },
    "dispatches": {
        "parent_dispatch_id": "TEXT", "parent_node_id": "INTEGER", "root_dispatch_id": "TEXT",
        "redispatch_of": "TEXT", "lattice": "BLOB", "trigger_id": "INTEGER",
    },
}
"""Columns added since schema version 1: a store made by an older valent gains them."""

ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS dispatches_parent ON dispatches (parent_dispatch_id)
    WHERE parent_dispatch_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dispatches_root ON dispatches (root_dispatch_id);
"""
"""Indexes on added columns (made once the columns exist): a dispatch's child dispatches
(``child_dispatches``: only sublattices' children are in it) and the dispatches of one tree
(``mark_orphaned``)."""


class StoreLostError(StoreError):
    """The store file was deleted, replaced or truncated while this process used it."""


class StoreFullError(StoreError):
    """A write failed because the disk (or the file system holding the store) is full."""


class StoreTrustError(StoreError):
    """A store, folder or output file that another user owns or can write: valent will not
    write there nor unpickle from it (unpickling runs code chosen by whoever wrote it)."""


def _whose(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _not_yours(path: Path | str, st: os.stat_result, what: str) -> StoreTrustError:
    return StoreTrustError(
        f"the {what} {path} is owned by {_whose(st.st_uid)}, not by you (uid {os.geteuid()}): "
        "valent neither writes to nor unpickles from a store another user controls; set "
        "VALENT_RESULTS_DIR to a folder of your own (or, if you trust its content, copy it "
        "into one)"
    )


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` a private folder (mode 0700), creating it and any missing parents 0700
    whatever the umask; an existing one of yours is tightened, one of another user refused."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue  # made by another process meanwhile: checked below like any other
            os.chmod(d, 0o700)  # the umask may have taken bits off (or left them on)
        st = os.stat(path)
    except OSError as exc:
        raise StoreError(
            f"cannot create the results dir {path}: {exc}; set VALENT_RESULTS_DIR to a "
            "writable folder"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(
            f"the results dir {path} is not a folder; set VALENT_RESULTS_DIR to a folder"
        )
    secure_path(path, st, "results folder", 0o700)


def secure_path(path: Path, st: os.stat_result, what: str, mode: int) -> None:
    """Make ``path`` (yours) private: take off the bits ``mode`` lacks. Refuse (raise
    ``StoreTrustError``) one another user owns, and a file others could write (they may have
    put code in it: valent does not silently adopt it)."""
    if st.st_uid != os.geteuid():
        raise _not_yours(path, st, what)
    if not stat.S_ISDIR(st.st_mode):
        check_trusted(path, st, what)
    if stat.S_IMODE(st.st_mode) & ~mode:
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except OSError as exc:
            raise StoreTrustError(
                f"the {what} {path} is open to other users (mode {oct(stat.S_IMODE(st.st_mode))})"
                f" and cannot be made private: {exc}; run `chmod {oct(mode)[2:]} {path}`"
            ) from exc


def check_trusted(path: Path | str, st: os.stat_result | None = None, what: str = "file") -> None:
    """Raise ``StoreTrustError`` unless ``path`` is yours and no one else can write it."""
    if st is None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot check the {what} {path}: {exc}") from exc
    if st.st_uid != os.geteuid():
        raise _not_yours(path, st, what)
    if st.st_mode & 0o022:
        fix = "700" if stat.S_ISDIR(st.st_mode) else "600"
        raise StoreTrustError(
            f"the {what} {path} is writable by other users (mode "
            f"{oct(stat.S_IMODE(st.st_mode))}): anyone of them could have put code in it, so "
            f"valent will not unpickle from it; if you trust its content, run "
            f"`chmod {fix} {path}` (valent makes its results folder 0700 and its files 0600)"
        )


def check_store_trusted(results_dir: Path | str) -> None:
    """The results dir, its ``valent.db`` and WAL are yours and writable by you only."""
    d = Path(results_dir)
    check_trusted(d, what="results folder")
    for name in ("valent.db", "valent.db-wal"):
        check_trusted(d / name, what="results store")


def read_trusted_file(path: Path | str, results_dir: Path | str | None = None) -> bytes:
    """The bytes of an output file, after checking it (and its folders up to ``results_dir``)
    is yours and writable by you only. Raise ``StoreTrustError`` otherwise."""
    path = Path(path)
    if results_dir is not None:
        root = Path(results_dir)
        d = path.parent
        while True:
            check_trusted(d, what="results folder")
            if d == root or d.parent == d or root not in d.parents:
                break
            d = d.parent
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StoreError(f"cannot read the output file {path}: {exc}") from exc
    try:
        check_trusted(path, os.fstat(fd), "output file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


SQLITE_MAGIC = b"SQLite format 3\x00"


def _whole_sqlite_file(path: Path, st: os.stat_result) -> bool:
    """Is a store file that became smaller still a whole SQLite database?

    SQLite itself shrinks the file: a checkpoint truncates it to the committed size (under
    many connections that size can step back a few pages), and so does a ``VACUUM``. A file
    cut by someone else is empty, lost its header, or ends inside a page.
    """
    if st.st_size < 100:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return False
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return False
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    return page >= 512 and st.st_size % page == 0


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class Store:
    """A results store at ``<results_dir>/valent.db``; safe to use from many threads.

    It remembers which file it opened (device, inode, size): a write or read after the file
    was deleted, replaced or truncated raises ``StoreLostError`` instead of writing into a
    file nobody will read or reading another store's rows.
    """

    def __init__(self, results_dir: str | os.PathLike[str]):
        self.dir = Path(results_dir).expanduser().absolute()
        self.path = self.dir / "valent.db"
        self.outputs_dir = self.dir / "outputs"
        self.reserve_path = self.dir / RESERVE_NAME
        self._local = threading.local()
        self._initialized = False
        self._init_lock = threading.Lock()
        self._ident: tuple[int, int] | None = None
        self._size_seen = 0
        self.lost: str | None = None
        """Why this store can no longer be used (its file was deleted, replaced...), or None."""
        self.read_only = False
        self._reserve_missing = False
        self._columns: dict[str, set[str]] = {}
        self._size_lock = threading.Lock()
        self.replaced: str | None = None
        """Set by ``get_store`` when this store replaced one whose file was lost (why)."""

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
        """True when the store exists in a folder we cannot write (read it as is then)."""
        return self.path.exists() and not os.access(self.dir, os.W_OK)

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            conn = self._connect_read_only()
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

    def _connect_read_only(self) -> sqlite3.Connection:
        """Open the store for reading only: ``mode=ro``, which reads the WAL (a live store's
        newest rows) through its -shm file. A store with no WAL left (closed by its last
        writer) on a file system nobody can write is opened ``immutable`` instead: SQLite
        cannot make the -shm file there, and no writer can be changing it."""
        wal = Path(f"{self.path}-wal")
        try:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=30
            )
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as exc:
            first = exc
        try:
            has_wal = wal.stat().st_size > 0
        except FileNotFoundError:
            has_wal = False
        except OSError:
            has_wal = True
        if not has_wal and not os.access(self.dir, os.W_OK):
            try:
                conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro&immutable=1", uri=True, isolation_level=None
                )
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.Error as exc:
                first = exc
        raise StoreError(
            f"cannot read the results store {self.path} without write access to its folder: "
            f"{first}. A store in use keeps its newest rows in {self.path.name}-wal, which "
            f"SQLite can read only through {self.path.name}-shm: both must exist and be "
            "readable by you (or the folder writable). Read it as its owner, or ask the owner "
            "for a copy (`sqlite3 valent.db .backup copy.db`)"
        ) from first

    def _secure_files(self) -> None:
        """Create ``valent.db`` 0600 (SQLite gives its -wal and -shm the db's mode) and
        tighten what exists; refuse files another user owns."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(
                f"cannot create the results store {self.path}: {exc}; check that the folder "
                "is writable and the disk not full, or set VALENT_RESULTS_DIR"
            ) from exc
        for name in (self.path.name, f"{self.path.name}-wal", f"{self.path.name}-shm",
                     RESERVE_NAME):
            p = self.dir / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StoreTrustError(
                    f"{p} is not a regular file (a link or device): valent will not use it; "
                    "remove it or set VALENT_RESULTS_DIR to another folder"
                )
            secure_path(p, st, "results store" if name != RESERVE_NAME else "file", 0o600)
        if self.outputs_dir.exists():
            ensure_private_dir(self.outputs_dir)

    def _initialize(self) -> None:
        with self._init_lock:
            if self._initialized:
                return
            if self._read_only_media():
                self.read_only = True  # read what is there; writes will say why they fail
                self._remember_file()
                self._initialized = True
                return
            ensure_private_dir(self.dir)
            self._secure_files()
            self._remember_file()
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
                conn.executescript(ADDED_INDEXES)
            except sqlite3.Error as exc:
                what = f"cannot initialize the results store {self.path}"
                raise self._error(what, exc) from exc
            finally:
                conn.close()
            self._make_reserve()
            self._initialized = True

    def _remember_file(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise StoreError(f"cannot open the results store {self.path}: {exc}") from exc
        self._ident = _identity(st)
        self._size_seen = st.st_size

    def check_file(self) -> None:
        """Raise ``StoreLostError`` if the store file was deleted, replaced or truncated
        since this store opened it (checked before every write and read)."""
        if self.lost is not None:
            raise StoreLostError(self.lost)
        if self._ident is None:
            return
        # stat and compare under a lock: a thread's older (smaller) size compared with the
        # size a newer stat of another thread recorded would look like a truncation
        with self._size_lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                what = "deleted"
            except OSError as exc:
                raise StoreError(f"cannot check the results store {self.path}: {exc}") from exc
            else:
                if _identity(st) != self._ident:
                    what = "replaced by another file"
                elif st.st_size < self._size_seen and not _whole_sqlite_file(self.path, st):
                    what = f"truncated (from {self._size_seen} to {st.st_size} bytes)"
                else:
                    self._size_seen = st.st_size
                    return
        self.lost = (
            f"the results store {self.path} was {what} while this process was using it: "
            "the dispatches it held (and what this process wrote since) are lost, and "
            "nothing more is written to it; do not delete or edit valent.db while valent "
            "runs. A new dispatch (or `valent`) starts a new store there."
        )
        self._drop_connections()
        raise StoreLostError(self.lost)

    def _drop_connections(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _error(self, what: str, exc: BaseException) -> StoreError:
        if _is_full(exc):
            return StoreFullError(
                f"{what}: the disk is full ({exc}); free disk space (the results dir is "
                f"{self.dir})"
            )
        return StoreError(
            f"{what}: {exc}; free disk space or make the folder writable (nothing already "
            "stored was changed)"
        )

    def _write(self, fn, *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in one transaction: all of it is written, or nothing."""
        if self.read_only:
            raise StoreError(
                f"cannot write to the results store {self.path}: it is readonly here (its "
                "folder is not writable by you, or the file system is mounted read-only); "
                "what it holds can still be read; set VALENT_RESULTS_DIR to a writable folder"
            )
        self.check_file()
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            out = fn(conn, *args)
            conn.execute("COMMIT")
            return out
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    # SQLite may have rolled back itself (disk full, I/O error): start over
                    self._drop_connections()
            if isinstance(exc, sqlite3.Error):
                raise self._error(f"cannot write to the results store {self.path}", exc) from exc
            raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        self.check_file()
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot read the results store {self.path}: {exc}; if the file was damaged, "
                "move it away (valent starts a new one) or set VALENT_RESULTS_DIR"
            ) from exc

    # ------------------------------------------------------------------ disk-full reserve

    def _reserve_size(self) -> int:
        try:
            vfs = os.statvfs(self.dir)
            total = vfs.f_blocks * vfs.f_frsize
        except OSError:
            total = 0
        return max(RESERVE_MIN, min(RESERVE_MAX, total // 100))

    def _make_reserve(self) -> bool:
        """Create the reserve file if missing; False if there is no room for it now."""
        if os.path.exists(self.reserve_path):
            self._reserve_missing = False
            return True
        tmp = self.dir / f".{RESERVE_NAME}.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve_size())
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._reserve_missing = True
            return False
        self._reserve_missing = False
        return True

    def release_reserve(self) -> bool:
        """Free the reserve file's space (for the final writes after a disk-full error);
        False if there was none. It is made again once there is room."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            self._reserve_missing = True
            return False
        self._reserve_missing = True
        return True

    # ------------------------------------------------------------------ writes

    def create_dispatch(
        self,
        row: dict[str, Any],
        nodes: Sequence[dict[str, Any]] | Sequence[tuple],
        node_columns: Sequence[str] | None = None,
        reused: dict[str, Any] | None = None,
    ) -> None:
        """Insert a new dispatch and all its nodes in one transaction.

        ``nodes`` are dicts, or tuples in the order of ``node_columns`` (faster for big graphs).
        ``reused``: nodes written COMPLETED with the output of the same node of an earlier
        dispatch, copied inside the store: ``{"source": old dispatch id, "time": start and
        end time, "reason": ..., "same": [node ids whose row is the old one's but for its
        status, times and reason], "rows": [(node_id, name, kind, executor, parents,
        fn_digest, in_digest)]}``.
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
            if reused:
                self._copy_reused(conn, row["dispatch_id"], reused)

        self._write(op)
        if not self.read_only:
            self._make_reserve()  # if another process used it up, now that there is room

    def copy_completed_dispatch(
        self,
        row: dict[str, Any],
        source_id: str,
        groups: Sequence[tuple[list[list[int]], str, str, str | None, str | None]],
        params: Sequence[tuple[int, str]],
    ) -> bool:
        """Write dispatch ``row`` (COMPLETED, with its result) whose nodes are all those of
        the COMPLETED dispatch ``source_id``, taken whole (start == end == ``row``'s
        ``end_time``, reason ``reused from <source>``; parameters without a reason), in one
        transaction; or write nothing and return False unless, inside that transaction, each
        of ``groups`` (``(id spans, name, kind, executor, fn_digest or None)``) matches that
        many nodes of the source that COMPLETED with an output under that name, kind,
        executor and (when given) function digest, and each of ``params`` (``(node id,
        output digest)``) a parameter node of the source with that digest."""
        did, t = row["dispatch_id"], row["end_time"]

        def op(conn: sqlite3.Connection) -> bool:
            expected = 0
            for spans, name, kind, executor, fn_d in groups:
                size = sum(last - first + 1 for first, last in spans)
                expected += size
                got = conn.execute(
                    "SELECT COUNT(*) FROM json_each(?) AS s CROSS JOIN nodes o "
                    "WHERE o.dispatch_id = ? AND o.node_id BETWEEN "
                    "json_extract(s.value, '$[0]') AND json_extract(s.value, '$[1]') "
                    "AND o.status = 'COMPLETED' AND o.out_digest IS NOT NULL "
                    "AND (o.output IS NOT NULL OR o.output_file IS NOT NULL) "
                    "AND o.name = ? AND o.kind = ? AND o.executor IS ? "
                    "AND (? IS NULL OR o.fn_digest = ?)",
                    (json.dumps(spans), source_id, name, kind, executor, fn_d, fn_d),
                ).fetchone()[0]
                if got != size:
                    return False
            if params:
                got = conn.execute(
                    "SELECT COUNT(*) FROM json_each(?) AS s CROSS JOIN nodes o "
                    "WHERE o.dispatch_id = ? AND o.node_id = json_extract(s.value, '$[0]') "
                    "AND o.kind = 'parameter' AND o.out_digest = json_extract(s.value, '$[1]')",
                    (json.dumps(params), source_id),
                ).fetchone()[0]
                if got != len(params):
                    return False
            cols = ", ".join(row)
            conn.execute(
                f"INSERT INTO dispatches ({cols}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            cur = conn.execute(
                "INSERT INTO nodes (dispatch_id, node_id, name, kind, executor, parents, "
                "status, start_time, end_time, fn_digest, in_digest, reason, output, "
                "output_file, out_digest) SELECT ?, node_id, name, kind, executor, parents, "
                "'COMPLETED', ?, ?, fn_digest, in_digest, CASE kind WHEN 'parameter' THEN NULL "
                "ELSE ? END, output, output_file, out_digest FROM nodes WHERE dispatch_id = ?",
                (did, t, t, f"reused from {source_id}", source_id),
            )
            if cur.rowcount != expected + len(params) or cur.rowcount != row["node_count"]:
                raise _Mismatch  # the source has other nodes: roll back, write nothing
            return True

        try:
            done = self._write(op)
        except _Mismatch:
            return False
        if done and not self.read_only:
            self._make_reserve()
        return done

    def _copy_reused(self, conn: sqlite3.Connection, did: str, r: dict[str, Any]) -> None:
        cols = (
            "INSERT INTO nodes (dispatch_id, node_id, name, kind, executor, parents, status, "
            "start_time, end_time, fn_digest, in_digest, reason, output, output_file, "
            "out_digest) SELECT ?, o.node_id, "
        )
        tail = (
            ", 'COMPLETED', ?, ?, {}, ?, o.output, o.output_file, o.out_digest FROM nodes o "
            "WHERE o.dispatch_id = ? AND o.node_id "
        )
        t, why, old = r["time"], r["reason"], r["source"]
        copied = 0
        if r["same"]:
            # by spans of consecutive ids, each one range of the old dispatch's primary key
            # (most reused nodes are: cheaper than looking each id up in a list)
            cur = conn.execute(
                "INSERT INTO nodes (dispatch_id, node_id, name, kind, executor, parents, "
                "status, start_time, end_time, fn_digest, in_digest, reason, output, "
                "output_file, out_digest) SELECT ?, o.node_id, o.name, o.kind, o.executor, "
                "o.parents, 'COMPLETED', ?, ?, o.fn_digest, o.in_digest, ?, o.output, "
                "o.output_file, o.out_digest FROM json_each(?) AS s CROSS JOIN nodes o "
                "WHERE o.dispatch_id = ? AND o.node_id BETWEEN json_extract(s.value, '$[0]') "
                "AND json_extract(s.value, '$[1]')",
                (did, t, t, why, json.dumps(spans(r["same"])), old),
            )
            copied += cur.rowcount
        if r["rows"]:
            cur = conn.executemany(
                cols + "?, ?, ?, ?" + tail.format("?, ?") + "= ?",
                [(did, name, kind, ex, parents, t, t, fd, ind, why, old, nid)
                 for nid, name, kind, ex, parents, fd, ind in r["rows"]],
            )
            copied += cur.rowcount
        if copied != len(r["same"]) + len(r["rows"]):
            raise StoreLostError(
                f"the results store {self.path} no longer holds every node of dispatch {old} "
                "that was to be reused"
            )

    def apply(
        self,
        node_updates: Iterable[tuple[str, int, dict[str, Any]]],
        dispatch_updates: Iterable[tuple[str, dict[str, Any]]] = (),
        bulk: Sequence[tuple[str, dict[str, Any], Sequence[int]]] = (),
    ) -> None:
        """Apply many node and dispatch updates in one transaction (the dispatcher's batch).

        ``bulk``: ``(dispatch_id, fields, node_ids)``, the same fields for many nodes of a
        dispatch (a million nodes cancelled at once), each one statement; applied first, in
        order, so that ``node_updates`` (newer) win where both set a field.

        All or nothing: on failure the store is as it was and ``StoreError`` says why
        (``StoreFullError`` for a full disk, ``StoreLostError`` when the store file was
        deleted, replaced or truncated, or when a dispatch or node updated here is not in it).
        """
        bulk = [b for b in bulk if b[2]]
        groups: dict[tuple[str, ...], list[tuple]] = defaultdict(list)
        for did, nid, fields in node_updates:
            keys = tuple(fields)
            groups[keys].append((*fields.values(), did, nid))
        dgroups: dict[tuple[str, ...], list[tuple]] = defaultdict(list)
        for did, fields in dispatch_updates:
            dgroups[tuple(fields)].append((*fields.values(), did))
        if not groups and not dgroups and not bulk:
            return

        def op(conn: sqlite3.Connection) -> None:
            for did, fields, ids in bulk:
                sets = ", ".join(f"{k} = ?" for k in fields)
                cur = conn.execute(
                    f"UPDATE nodes SET {sets} WHERE dispatch_id = ? AND node_id IN "
                    "(SELECT value FROM json_each(?))",
                    (*fields.values(), did, json.dumps(list(ids))),
                )
                if cur.rowcount != len(ids):  # ids are distinct
                    self._missing_rows("nodes", [(did, n) for n in ids], conn)
            for keys, rows in groups.items():
                sets = ", ".join(f"{k} = ?" for k in keys)
                cur = conn.executemany(
                    f"UPDATE nodes SET {sets} WHERE dispatch_id = ? AND node_id = ?", rows
                )
                if cur.rowcount != len(rows):
                    self._missing_rows("nodes", [(r[-2], r[-1]) for r in rows], conn)
            for keys, rows in dgroups.items():
                sets = ", ".join(f"{k} = ?" for k in keys)
                cur = conn.executemany(
                    f"UPDATE dispatches SET {sets} WHERE dispatch_id = ?", rows
                )
                if cur.rowcount != len(rows):
                    self._missing_rows("dispatches", [(r[-1],) for r in rows], conn)

        self._write(op)
        if self._reserve_missing:
            self._make_reserve()

    def _missing_rows(self, table: str, keys: list[tuple], conn: sqlite3.Connection) -> None:
        """Some rows to update are not in the store: it is not the store they were created in."""
        if table == "nodes":
            gone = [
                k for k in keys
                if conn.execute(
                    "SELECT 1 FROM nodes WHERE dispatch_id = ? AND node_id = ?", k
                ).fetchone() is None
            ]
            what = ", ".join(f"node {n} of dispatch {d}" for d, n in gone[:5])
        else:
            gone = [
                k for k in keys
                if conn.execute(
                    "SELECT 1 FROM dispatches WHERE dispatch_id = ?", k
                ).fetchone() is None
            ]
            what = ", ".join(f"dispatch {d}" for (d,) in gone[:5])
        if not gone:
            return
        raise StoreLostError(
            f"the results store {self.path} no longer holds {what}: the file was replaced "
            "or its rows removed while the dispatch ran; what it held is lost"
        )

    def write_after_error(
        self,
        node_updates: Sequence[tuple[str, int, dict[str, Any]]],
        dispatch_updates: Sequence[tuple[str, dict[str, Any]]] = (),
        bulk: Sequence[tuple[str, dict[str, Any], Sequence[int]]] = (),
    ) -> list[tuple[str, int | None]]:
        """Write the final state of dispatches after a failed write (a disk-full error).

        Tries, each in one transaction (all or nothing), until one succeeds:

        1. the updates as given;
        2. the same after freeing the reserve file (``release_reserve``);
        3. the updates without output blobs: a node whose inline ``output`` is dropped ends
           FAILED with an error saying its output was computed but lost; a dispatch whose
           inline ``result`` is dropped ends FAILED saying so; stdout, stderr and tracebacks
           are cut to their last ``KEEP_TEXT`` characters. The error of each dispatch that
           has an update here also names its lost outputs.

        Returns the outputs that could not be kept: ``[(dispatch_id, node_id)]``, with
        ``node_id`` None for a dispatch's result. Raises ``StoreLostError`` when the store
        file is gone (nothing can be written to it), ``StoreError`` if even step 3 fails.
        """
        node_updates = list(node_updates)
        dispatch_updates = list(dispatch_updates)
        try:
            self.apply(node_updates, dispatch_updates, bulk)
            return []
        except StoreLostError:
            raise
        except StoreError:
            pass
        if self.release_reserve():
            try:
                self.apply(node_updates, dispatch_updates, bulk)
                return []
            except StoreLostError:
                raise
            except StoreError:
                pass
        nodes, dispatches, lost = _without_blobs(node_updates, dispatch_updates)
        try:
            self.apply(nodes, dispatches, bulk)  # bulk fields hold no outputs
        except StoreLostError:
            raise
        except StoreError as exc:
            raise type(exc)(
                f"{exc} (even the final state without outputs could not be written)"
            ) from exc
        return lost

    def output_fields(self, dispatch_id: str, node_id: int | None, blob: bytes) -> dict[str, Any]:
        """Store fields for an output: inline, or a file for large ones (then its path).

        A file that cannot be written completely is removed and ``StoreError`` raised
        (``StoreFullError`` when the disk is full).
        """
        if len(blob) <= INLINE_LIMIT:
            return {"output": blob, "output_file": None}
        self.check_file()
        ensure_private_dir(self.outputs_dir)
        folder = self.outputs_dir / dispatch_id
        ensure_private_dir(folder)
        name = "result.pkl" if node_id is None else f"node-{node_id}.pkl"
        path = folder / name
        tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._error(f"cannot write the output file {path}", exc) from exc
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
        rows = self._read(
            "SELECT id, dispatch_id, task_ids FROM cancel_requests WHERE handled_at IS NULL"
        )
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
        """Mark a dispatch whose owner died FAILED and its unfinished nodes CANCELLED, with
        every unfinished dispatch of its tree (its sublattices' child dispatches, its
        parent's): one process owned them all."""
        final = tuple(s.value for s in FINAL)
        marks = ", ".join("?" * len(final))
        nested = self.has_column("dispatches", "root_dispatch_id")

        def op(conn: sqlite3.Connection) -> bool:
            ids = [dispatch_id]
            if nested:
                row = conn.execute(
                    "SELECT root_dispatch_id FROM dispatches WHERE dispatch_id = ?",
                    (dispatch_id,),
                ).fetchone()
                root = (row[0] if row is not None else None) or dispatch_id
                ids = [dispatch_id] + [
                    r[0] for r in conn.execute(
                        f"SELECT dispatch_id FROM dispatches WHERE (root_dispatch_id = ? OR "
                        f"dispatch_id = ?) AND dispatch_id != ? AND status NOT IN ({marks})",
                        (root, root, dispatch_id, *final),
                    )
                ]
            now = time.time()
            changed = False
            for did in ids:
                cur = conn.execute(
                    f"UPDATE dispatches SET status = ?, error = ?, end_time = ? "
                    f"WHERE dispatch_id = ? AND status NOT IN ({marks})",
                    (Status.FAILED.value, error, now, did, *final),
                )
                if cur.rowcount == 0:
                    continue
                changed = changed or did == dispatch_id
                conn.execute(
                    f"UPDATE nodes SET status = ?, reason = ?, end_time = ? "
                    f"WHERE dispatch_id = ? AND status NOT IN ({marks})",
                    (Status.CANCELLED.value, "owner process died", now, did, *final),
                )
            return changed

        return self._write(op)

    # ------------------------------------------------------------------ triggers

    TRIGGERS_TABLE = """
    CREATE TABLE IF NOT EXISTS triggers (
        id INTEGER PRIMARY KEY,
        dispatch_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        settings TEXT,
        owner_pid INTEGER,
        owner_host TEXT,
        owner_started REAL,
        started_at REAL NOT NULL,
        stop_requested_at REAL,
        stopped_at REAL,
        stop_reason TEXT,
        fired INTEGER NOT NULL DEFAULT 0,
        last_fired_at REAL,
        last_dispatch_id TEXT
    )
    """
    """Made on first use (a store that never had a trigger has no such table)."""

    def add_trigger(
        self, dispatch_id: str, kind: str, settings: str, owner: tuple[int, str, float]
    ) -> int:
        """Record a trigger now observing for ``dispatch_id`` in process ``owner``; its id."""

        def op(conn: sqlite3.Connection) -> int:
            conn.execute(self.TRIGGERS_TABLE)
            cur = conn.execute(
                "INSERT INTO triggers (dispatch_id, kind, settings, owner_pid, owner_host, "
                "owner_started, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dispatch_id, kind, settings, *owner, time.time()),
            )
            return int(cur.lastrowid)

        return self._write(op)

    def _has_triggers(self) -> bool:
        return bool(self._read(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'triggers'"
        ))

    def trigger_fired(self, trigger_id: int, new_dispatch_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "UPDATE triggers SET fired = fired + 1, last_fired_at = ?, last_dispatch_id = ? "
                "WHERE id = ?", (now, new_dispatch_id, trigger_id),
            )
            conn.execute(
                "UPDATE dispatches SET trigger_id = ? WHERE dispatch_id = ?",
                (trigger_id, new_dispatch_id),
            )

        self._write(op)

    def trigger_stopped(self, trigger_ids: Sequence[int], reason: str) -> None:
        """Record that these triggers stopped observing (and why)."""
        if not trigger_ids:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE triggers SET stopped_at = ?, stop_reason = ? "
                "WHERE id = ? AND stopped_at IS NULL",
                [(time.time(), reason, t) for t in trigger_ids],
            )

        self._write(op)

    def request_trigger_stop(
        self, trigger_ids: Sequence[int] = (), dispatch_ids: Sequence[str] = ()
    ) -> list[sqlite3.Row]:
        """Ask the owners of these triggers (or of every running trigger of these
        dispatches) to stop them; the triggers asked, as rows."""
        if not self._has_triggers():
            return []
        rows = [
            r for r in self.list_triggers(everything=True)
            if r["stopped_at"] is None
            and (r["id"] in set(trigger_ids) or r["dispatch_id"] in set(dispatch_ids))
        ]
        if not rows:
            return []

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE triggers SET stop_requested_at = ? WHERE id = ? "
                "AND stop_requested_at IS NULL",
                [(time.time(), r["id"]) for r in rows],
            )

        self._write(op)
        return rows

    def trigger_stop_requests(self, trigger_ids: Sequence[int]) -> list[int]:
        """Which of these (running) triggers another process asked to stop."""
        if not trigger_ids or not self._has_triggers():
            return []
        wanted = set(trigger_ids)
        rows = self._read(
            "SELECT id FROM triggers WHERE stop_requested_at IS NOT NULL AND stopped_at IS NULL"
        )
        return [r["id"] for r in rows if r["id"] in wanted]

    def list_triggers(self, everything: bool = False) -> list[sqlite3.Row]:
        """Triggers, newest first: those not stopped (``everything``: all)."""
        if not self._has_triggers():
            return []
        sql = "SELECT * FROM triggers"
        if not everything:
            sql += " WHERE stopped_at IS NULL"
        return self._read(sql + " ORDER BY id DESC")

    def has_column(self, table: str, column: str) -> bool:
        """True when the store's ``table`` has ``column`` (a read-only store made by an older
        valent may lack the added ones)."""
        if table not in self._columns:
            self._columns[table] = {r[1] for r in self._read(f"PRAGMA table_info({table})")}
        return column in self._columns[table]

    # ------------------------------------------------------------------ reads

    def resolve(self, id_or_prefix: str) -> str:
        """The full dispatch id for an id or a unique prefix (>= 4 characters) of one.

        A prefix is matched literally, as text: only hex digits and dashes (what dispatch ids
        are made of) are taken, so ``%``, ``_`` or ``*`` never act as wildcards.
        """
        found = self._read(
            "SELECT dispatch_id FROM dispatches WHERE dispatch_id = ?", (id_or_prefix,)
        )
        if found:
            return found[0][0]
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
        rows = self._read(
            "SELECT dispatch_id FROM dispatches WHERE dispatch_id >= ? AND dispatch_id < ? "
            "LIMIT 2",
            (prefix, prefix + "~"),  # "~" sorts after every hex digit and "-"
        )
        if len(rows) == 1:
            return rows[0][0]
        if len(rows) > 1:
            raise UnknownDispatchError(
                id_or_prefix, str(self.path), "ambiguous prefix; give more characters"
            )
        raise UnknownDispatchError(id_or_prefix, str(self.path), self._lost_note())

    def _lost_note(self) -> str:
        if self.replaced is None:
            return ""
        return ("this process saw the store file deleted, replaced or truncated while it ran: "
                "the dispatches it held are lost")

    def dispatch_row(self, dispatch_id: str) -> sqlite3.Row:
        rows = self._read("SELECT * FROM dispatches WHERE dispatch_id = ?", (dispatch_id,))
        if not rows:
            raise UnknownDispatchError(dispatch_id, str(self.path), self._lost_note())
        return rows[0]

    def node_row(self, dispatch_id: str, node_id: int) -> sqlite3.Row:
        """One node of a dispatch (it must exist)."""
        rows = self._read(
            "SELECT * FROM nodes WHERE dispatch_id = ? AND node_id = ?", (dispatch_id, node_id)
        )
        return rows[0] if rows else None  # type: ignore[return-value]

    def node_rows(self, dispatch_id: str, with_outputs: bool = True) -> list[sqlite3.Row]:
        cols = "*" if with_outputs else (
            "dispatch_id, node_id, name, kind, executor, parents, status, start_time, end_time,"
            " cancel_requested_at, cancel_confirmed_at, cancel_outcome, reason, error, attempts"
            + (", sub_dispatch_id" if self.has_column("nodes", "sub_dispatch_id") else "")
        )
        return self._read(
            f"SELECT {cols} FROM nodes WHERE dispatch_id = ? ORDER BY node_id", (dispatch_id,)
        )

    def reuse_rows(self, dispatch_id: str) -> list[tuple]:
        """What a redispatch needs of a dispatch's nodes to reuse their outputs (plain
        tuples: ``valent._engine.reuse.Reuse`` reads them by position): (node_id, name,
        kind, status, fn_digest, in_digest, out_digest, sub_dispatch_id, executor, parents)
        of each node that COMPLETED with an output (it may be reused) or ran a child dispatch
        (a sublattice: its child's nodes may be). The outputs stay in the store."""
        self.check_file()
        try:
            cur = self._conn().cursor()
            cur.row_factory = None  # tuples: 10,000s of rows, read once by position
            return cur.execute(
                "SELECT node_id, name, kind, status, fn_digest, in_digest, out_digest, "
                "sub_dispatch_id, executor, parents FROM nodes WHERE dispatch_id = ? AND ("
                "(status = 'COMPLETED' AND out_digest IS NOT NULL "
                "AND (output IS NOT NULL OR output_file IS NOT NULL)) "
                "OR sub_dispatch_id IS NOT NULL)",
                (dispatch_id,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot read the results store {self.path}: {exc}; if the file was damaged, "
                "move it away (valent starts a new one) or set VALENT_RESULTS_DIR"
            ) from exc

    def node_output(self, dispatch_id: str, node_id: int) -> tuple[bytes | None, str | None]:
        """A node's stored output: (inline pickle, or None and the file holding it)."""
        rows = self._read(
            "SELECT output, output_file FROM nodes WHERE dispatch_id = ? AND node_id = ?",
            (dispatch_id, node_id),
        )
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def dispatch_status(self, dispatch_id: str) -> str | None:
        rows = self._read("SELECT status FROM dispatches WHERE dispatch_id = ?", (dispatch_id,))
        return rows[0][0] if rows else None

    def unfinished_dispatches(self) -> list[sqlite3.Row]:
        """Every dispatch not final yet (NEW_OBJECT, RUNNING, CANCELLING), with its owner's
        pid, host and start time: what ``api.reap_orphans`` checks (one indexed query)."""
        return self._read(
            "SELECT dispatch_id, status, node_count, owner_pid, owner_host, owner_started "
            "FROM dispatches WHERE status IN (?, ?, ?)",
            (Status.NEW_OBJECT.value, Status.RUNNING.value, Status.CANCELLING.value),
        )

    def list_dispatches(
        self, status: str | None = None, limit: int = 20, children: bool = True
    ) -> list[sqlite3.Row]:
        """Recent dispatches, newest first, with done/total node counts. ``children=False``
        leaves out the child dispatches of sublattices."""
        nested = self.has_column("dispatches", "parent_dispatch_id")
        extra = (
            "d.parent_dispatch_id, d.parent_node_id, d.root_dispatch_id, d.redispatch_of, "
            if nested else
            "NULL AS parent_dispatch_id, NULL AS parent_node_id, NULL AS root_dispatch_id, "
            "NULL AS redispatch_of, "
        )
        sql = (
            "SELECT d.dispatch_id, d.lattice_name, d.status, d.created_at, d.start_time, "
            "d.end_time, d.node_count, d.error, d.owner_pid, d.owner_host, d.owner_started, "
            + extra +
            "(SELECT COUNT(*) FROM nodes n WHERE n.dispatch_id = d.dispatch_id "
            " AND n.status IN ('COMPLETED','FAILED','CANCELLED')) AS done "
            "FROM dispatches d"
        )
        where: list[str] = []
        args: list[Any] = []
        if status:
            where.append("d.status = ?")
            args.append(status)
        if not children and nested:
            where.append("d.parent_dispatch_id IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY d.created_at DESC LIMIT ?"
        args.append(limit)
        return self._read(sql, args)

    def child_dispatches(self, dispatch_id: str) -> list[sqlite3.Row]:
        """The child dispatches of a dispatch's sublattice nodes, by parent node id (one row
        each, with done/total node counts as ``list_dispatches``)."""
        if not self.has_column("dispatches", "parent_dispatch_id"):
            return []
        return self._read(
            "SELECT d.*, (SELECT COUNT(*) FROM nodes n WHERE n.dispatch_id = d.dispatch_id "
            " AND n.status IN ('COMPLETED','FAILED','CANCELLED')) AS done "
            "FROM dispatches d WHERE d.parent_dispatch_id = ? ORDER BY d.parent_node_id, "
            "d.created_at",
            (dispatch_id,),
        )


class _Mismatch(Exception):
    """Raised inside a write to roll it back: what it checked did not hold."""


def spans(ids: Iterable[int]) -> list[list[int]]:
    """Distinct ids as ``[[first, last], ...]`` spans of consecutive ones."""
    out: list[list[int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _cut(text: Any) -> Any:
    if isinstance(text, str) and len(text) > KEEP_TEXT:
        return "[... cut: the results store was full]\n" + text[-KEEP_TEXT:]
    return text


def _without_blobs(
    node_updates: list[tuple[str, int, dict[str, Any]]],
    dispatch_updates: list[tuple[str, dict[str, Any]]],
) -> tuple[list, list, list[tuple[str, int | None]]]:
    """The updates with inline outputs dropped (the nodes FAILED, saying so) and long texts
    cut; and which outputs were dropped."""
    lost: list[tuple[str, int | None]] = []
    nodes = []
    for did, nid, fields in node_updates:
        f = {k: _cut(v) if k in ("stdout", "stderr", "traceback", "error") else v
             for k, v in fields.items()}
        if f.get("output") is not None:
            f["output"] = None
            f["status"] = Status.FAILED.value
            f["error"] = (
                "its output was computed but could not be stored: the results store's disk "
                "is full (the output is lost)"
            )
            lost.append((did, nid))
        nodes.append((did, nid, f))
    dispatches = []
    for did, fields in dispatch_updates:
        f = dict(fields)
        if f.get("result") is not None:
            f["result"] = None
            f["status"] = Status.FAILED.value
            lost.append((did, None))
        dispatches.append((did, f))
    for did, f in dispatches:
        mine = [nid for d, nid in lost if d == did]
        if not mine:
            continue
        names = ", ".join("the result" if n is None else f"node {n}" for n in mine)
        note = f"outputs lost because the results store's disk is full: {names}"
        f["error"] = f"{f['error']}; {note}" if f.get("error") else note
    return nodes, dispatches, lost


_stores: dict[Path, Store] = {}
_by_env: dict[tuple[str, str], Store] = {}  # ($VALENT_RESULTS_DIR, cwd if relative) -> store
_stores_lock = threading.Lock()


def get_store(results_dir: str | os.PathLike[str] | None = None) -> Store:
    """The store for ``results_dir`` (default: the configured results dir), shared per path."""
    if results_dir is None:
        env = os.environ.get("VALENT_RESULTS_DIR")
        if env:  # the common case, once per dispatch and per get_result: no path parsing
            known = _by_env.get((env, os.getcwd() if not env.startswith("/") else ""))
            if known is not None and known.lost is None and _stores.get(known.dir) is known:
                return known
        from .config import results_dir as configured

        results_dir = configured()
    else:
        env = None
    key = Path(results_dir).expanduser().absolute()
    with _stores_lock:
        store = _stores.get(key)
        if store is None or store.lost is not None:
            # a store whose file was deleted or replaced stays lost for the runs that used it;
            # new work gets a fresh one
            fresh = _stores[key] = Store(key)
            if store is not None:
                fresh.replaced = store.lost
            store = fresh
        if env:
            _by_env[(env, os.getcwd() if not env.startswith("/") else "")] = store
        return store


def _forget_stores_after_fork() -> None:
    """A forked child must not use its parent's SQLite connections: it opens its own."""
    global _stores_lock
    _stores.clear()
    _by_env.clear()
    _stores_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_stores_after_fork)
