"""The SQLite store: where it lives, what it keeps, large outputs, ids, cancel requests."""

from __future__ import annotations

import sqlite3

import pytest
import valent as ct
from valent._store import INLINE_LIMIT, Store, get_store


@ct.electron
def big(n):
    return b"x" * n


@ct.electron
def size(b):
    return len(b)


@ct.electron
def shout(s):
    print(s.upper())
    return s.upper()


@ct.electron
def fail():
    raise KeyError("missing")


@ct.lattice
def wf(n):
    data = big(n)
    return {"size": size(data), "data": data}


def test_store_file_is_sqlite_wal_in_the_results_dir(results_dir):
    result = ct.dispatch_sync(wf)(10)
    db = results_dir / "valent.db"
    assert db.exists()
    assert result.results_dir == str(results_dir)
    assert results_dir.stat().st_mode & 0o777 == 0o700  # outputs are private
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        row = conn.execute(
            "SELECT status, lattice_name, node_count FROM dispatches WHERE dispatch_id = ?",
            (result.dispatch_id,),
        ).fetchone()
        assert row == ("COMPLETED", "wf", 3)
        nodes = conn.execute(
            "SELECT node_id, name, status FROM nodes WHERE dispatch_id = ? ORDER BY node_id",
            (result.dispatch_id,),
        ).fetchall()
        assert nodes == [
            (0, "big", "COMPLETED"),
            (1, ":parameter:10", "COMPLETED"),
            (2, "size", "COMPLETED"),
        ]
    finally:
        conn.close()


def test_large_outputs_go_to_files_and_come_back(results_dir):
    n = INLINE_LIMIT + 1000
    result = ct.dispatch_sync(wf)(n)
    assert result.status == "COMPLETED"
    assert result.result["size"] == n and result.result["data"] == b"x" * n
    assert result.get_node_result(0)["output"] == b"x" * n
    files = sorted(p.name for p in (results_dir / "outputs" / result.dispatch_id).iterdir())
    assert "node-0.pkl" in files and "result.pkl" in files
    again = ct.get_result(result.dispatch_id)  # a fresh read from the store
    assert again.result["size"] == n


def test_errors_tracebacks_output_and_timings_are_kept():
    @ct.lattice
    def flow():
        return [shout("hi"), fail()]

    result = ct.dispatch_sync(flow)()
    ok = result.get_node_result(0)
    assert ok["output"] == "HI" and ok["stdout"] == "HI\n" and ok["executor"] == "local"
    bad = [n for n in result.get_all_node_results() if n["node_name"] == "fail"][0]
    assert bad["error"] == "KeyError: 'missing'"
    assert "KeyError" in bad["traceback"] and "in fail" in bad["traceback"]
    for node in (ok, bad):
        assert node["start_time"] <= node["end_time"]
        assert node["attempts"] == 1
    assert result.start_time <= result.end_time


def test_ids_resolve_by_unique_prefix():
    a = ct.dispatch_sync(wf)(1).dispatch_id
    store = get_store()
    assert store.resolve(a) == a and store.resolve(a[:6]) == a
    with pytest.raises(ct.UnknownDispatchError):
        store.resolve("abc")  # too short to be a prefix
    listed = store.list_dispatches()
    assert [r["dispatch_id"] for r in listed] == [a] and listed[0]["done"] == 3


def test_cancel_requests_are_claimed_once(tmp_path):
    store = Store(tmp_path / "s")
    store.create_dispatch(
        {"dispatch_id": "d1", "lattice_name": "x", "status": "RUNNING", "created_at": 0.0}, []
    )
    store.request_cancel("d1", None)
    store.request_cancel("d1", [3, 4])
    store.request_cancel("other", None)
    assert store.take_cancel_requests(["d1"]) == [("d1", None), ("d1", [3, 4])]
    assert store.take_cancel_requests(["d1"]) == []
    assert store.take_cancel_requests(["other"]) == [("other", None)]
    store.close()


def test_orphaned_dispatch_is_marked_failed_and_its_open_nodes_cancelled(tmp_path):
    store = Store(tmp_path / "s")
    store.create_dispatch(
        {"dispatch_id": "d1", "lattice_name": "x", "status": "RUNNING", "created_at": 0.0},
        [
            {"dispatch_id": "d1", "node_id": 0, "name": "a", "kind": "electron",
             "status": "COMPLETED"},
            {"dispatch_id": "d1", "node_id": 1, "name": "b", "kind": "electron",
             "status": "RUNNING"},
        ],
    )
    assert store.mark_orphaned("d1", "owner gone") is True
    assert store.mark_orphaned("d1", "owner gone") is False  # only once
    row = store.dispatch_row("d1")
    assert row["status"] == "FAILED" and row["error"] == "owner gone"
    nodes = store.node_rows("d1")
    assert [n["status"] for n in nodes] == ["COMPLETED", "CANCELLED"]
    assert nodes[1]["reason"] == "owner process died"
    store.close()


def test_a_store_made_by_an_older_valent_gains_the_new_columns(tmp_path):
    from valent._store import SCHEMA

    d = tmp_path / "old"
    d.mkdir()
    old = SCHEMA.replace("    live_output TEXT,\n", "")
    assert old != SCHEMA
    conn = sqlite3.connect(d / "valent.db")
    conn.executescript(old)
    conn.execute(
        "INSERT INTO nodes (dispatch_id, node_id, name, kind, status) "
        "VALUES ('d0', 0, 'a', 'electron', 'COMPLETED')"
    )
    conn.commit()
    conn.close()
    store = Store(d)
    store.create_dispatch(
        {"dispatch_id": "d1", "lattice_name": "x", "status": "RUNNING", "created_at": 0.0},
        [{"dispatch_id": "d1", "node_id": 0, "name": "a", "kind": "electron",
          "status": "PENDING"}],
    )
    store.apply([("d1", 0, {"status": "RUNNING", "live_output": '["/o", "/e"]'})])
    assert store.node_rows("d1")[0]["live_output"] == '["/o", "/e"]'
    assert store.node_rows("d0")[0]["status"] == "COMPLETED"  # what was there is kept
    store.close()


def test_a_store_made_before_nesting_gains_the_columns_and_indexes_for_them(tmp_path):
    """The columns nesting and redispatch added come with indexes for the queries that look
    dispatches up by them (a dispatch's children; the dispatches of one tree)."""
    from valent._store import SCHEMA

    d = tmp_path / "old"
    d.mkdir()
    old = SCHEMA
    for col in ("parent_dispatch_id TEXT", "parent_node_id INTEGER", "root_dispatch_id TEXT"):
        old = old.replace(f"    {col},\n", "")
    assert "root_dispatch_id" not in old
    conn = sqlite3.connect(d / "valent.db")
    conn.executescript(old)
    conn.close()
    store = Store(d)
    base = {"lattice_name": "x", "status": "RUNNING", "created_at": 0.0}
    store.create_dispatch({"dispatch_id": "d1", **base, "root_dispatch_id": "d1"}, [])
    store.create_dispatch(
        {"dispatch_id": "c1", **base, "parent_dispatch_id": "d1", "parent_node_id": 0,
         "root_dispatch_id": "d1"}, [],
    )
    assert [r["dispatch_id"] for r in store.child_dispatches("d1")] == ["c1"]

    def plan(sql: str) -> str:
        return " ".join(r[3] for r in store._conn().execute("EXPLAIN QUERY PLAN " + sql, ("d1",)))

    assert "dispatches_parent" in plan("SELECT * FROM dispatches WHERE parent_dispatch_id = ?")
    assert "dispatches_root" in plan("SELECT * FROM dispatches WHERE root_dispatch_id = ?")
    assert store.mark_orphaned("c1", "owner gone") is True
    assert {store.dispatch_status(i) for i in ("d1", "c1")} == {"FAILED"}
    store.close()


def test_an_unwritable_results_dir_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ct.StoreError, match="VALENT_RESULTS_DIR"):
        Store(blocker / "results").dispatch_status("x")


def test_several_processes_write_one_store_at_once(results_dir):
    """Three dispatching processes, each with two 50-task dispatches, on one SQLite file."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import valent as ct

        @ct.electron
        def noop(i):
            return i

        @ct.lattice
        def wf(n):
            return [noop(i) for i in range(n)]

        ids = [ct.dispatch(wf)(50) for _ in range(2)]
        for i in ids:
            r = ct.get_result(i, wait=True)
            print(i, r.status, sum(r.result))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    lines = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        lines += out.split("\n")[:2]
    assert len(lines) == 6
    for line in lines:
        dispatch_id, status, total = line.split()
        assert (status, total) == ("COMPLETED", str(sum(range(50))))
        result = ct.get_result(dispatch_id)  # and this process reads each of them
        assert result.status == "COMPLETED" and result.result == list(range(50))
    assert len(get_store().list_dispatches()) == 6


_READER = r"""
import json, os, sys
from valent._store import Store, StoreError   # imported as root; then become nobody
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
store = Store(sys.argv[1])
try:
    print(json.dumps([r["dispatch_id"] for r in store.list_dispatches()]))
except StoreError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _read_as_nobody(folder) -> object:
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _READER, str(folder)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_reader_without_write_access_sees_the_live_stores_rows():
    """Another user who may read (not write) a live store sees what was committed, which is
    still in the WAL; if the WAL cannot be read, a clear error says why."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root (to become that user)")
    top = tempfile.mkdtemp(prefix="valent-ro-", dir="/tmp")  # a path the other user can reach
    try:
        os.chmod(top, 0o755)
        store = Store(top)
        store.create_dispatch(
            {"dispatch_id": "d1", "lattice_name": "x", "status": "RUNNING", "created_at": 0.0},
            [],
        )
        conn = store._conn()  # the writer keeps the store open: the row is only in the WAL
        assert os.path.getsize(os.path.join(top, "valent.db-wal")) > 0
        # its owner lets others read it (valent itself never does this)
        os.chmod(top, 0o755)
        for name in ("valent.db", "valent.db-wal", "valent.db-shm"):
            os.chmod(os.path.join(top, name), 0o644)
        assert _read_as_nobody(top) == ["d1"]
        os.chmod(os.path.join(top, "valent.db-shm"), 0o600)  # the WAL cannot be used now
        out = _read_as_nobody(top)
        assert isinstance(out, dict) and "valent.db-shm" in out["error"], out
        assert "readable" in out["error"]
        conn.execute("SELECT 1")
        store.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)
