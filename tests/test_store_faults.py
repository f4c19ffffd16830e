"""The store under faults: a full disk, and its file deleted, truncated or replaced while in use.

The disk-full tests put the store on a real 4 MiB ext4 file system (a loop mount; tmpfs if
loop devices are not available), so SQLite meets a real ENOSPC. Its blocks are 4 KiB, the
size of a memory page, as on any normal disk: with 1 KiB blocks (mkfs's default for tiny file
systems) SQLite's memory-mapped -shm file can hit an unallocated block on a full disk and the
process dies of SIGBUS, a limit of SQLite on such file systems that valent cannot avoid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import cloudpickle
import pytest
import valent as ct
from valent._store import (
    INLINE_LIMIT,
    RESERVE_NAME,
    Store,
    StoreFullError,
    StoreLostError,
    get_store,
)
from valent.result import Result

N = 80  # nodes; 80 outputs of 60 KiB do not fit on 4 MiB
OUT = 60 * 1024


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A mounted 4 MiB file system (unmounted afterwards); skipped if mounting is not allowed."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small file system needs root (to cause a real disk-full error)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    img = tmp_path / "fs.img"
    how = None
    if shutil.which("mkfs.ext4"):
        _run("truncate", "-s", "4M", str(img))
        if _run("mkfs.ext4", "-q", "-b", "4096", str(img)).returncode == 0 and _run(
            "mount", "-o", "loop", str(img), str(mnt)
        ).returncode == 0:
            how = "ext4"
    if how is None:
        r = _run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt))
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        import gc

        gc.collect()  # a failed test's Store (and its open SQLite files) goes first
        r = _run("umount", str(mnt))
        if r.returncode != 0:
            _run("umount", "-l", str(mnt))  # never leave a mount behind
        assert r.returncode == 0, r.stderr


def _new_dispatch(store: Store, did: str = "d1", n: int = N) -> None:
    store.create_dispatch(
        {"dispatch_id": did, "lattice_name": "wf", "status": "RUNNING", "created_at": 0.0},
        [
            {"dispatch_id": did, "node_id": i, "name": f"t{i}", "kind": "electron",
             "status": "RUNNING"}
            for i in range(n)
        ],
    )


def _out(i: int) -> bytes:
    return cloudpickle.dumps((i, os.urandom(OUT)))


def _fill(store: Store, did: str = "d1") -> int:
    """Complete nodes one batch at a time until the disk is full; the first that failed."""
    for i in range(N):
        try:
            store.apply([(did, i, {"status": "COMPLETED", "output": _out(i), "end_time": 1.0})])
        except StoreFullError:
            return i
    pytest.fail("the disk never filled up")


def _final_updates(first_unwritten: int, with_output: bool = True):
    """What a dispatcher writes after the error: the node whose write failed COMPLETED with
    its output, every other unfinished node CANCELLED, the dispatch FAILED with the cause."""
    nodes = [
        ("d1", i, {"status": "CANCELLED", "reason": "the results store failed", "end_time": 2.0})
        for i in range(first_unwritten + 1, N)
    ]
    done = {"status": "COMPLETED", "end_time": 2.0}
    if with_output:
        done["output"] = _out(first_unwritten)
    nodes.insert(0, ("d1", first_unwritten, done))
    disp = [("d1", {"status": "FAILED", "end_time": 2.0,
                    "error": "StoreFullError: the disk is full"})]
    return nodes, disp


def _check_consistent(store: Store) -> None:
    row = store.dispatch_row("d1")
    assert row["status"] == "FAILED" and "disk is full" in row["error"]
    rows = store.node_rows("d1")
    assert all(r["status"] in ("COMPLETED", "FAILED", "CANCELLED") for r in rows)
    result = Result(row, rows, str(store.dir))
    for r in rows:  # every COMPLETED node's output is there and loads
        if r["status"] == "COMPLETED":
            assert result.get_node_result(r["node_id"])["output"][0] == r["node_id"]


def test_a_batch_that_does_not_fit_changes_nothing(tiny_fs):
    store = Store(tiny_fs / "results")
    _new_dispatch(store)
    first = _fill(store)
    assert first > 0
    before = [tuple(r) for r in store.node_rows("d1")]
    with pytest.raises(StoreFullError, match="disk is full"):
        store.apply(
            [("d1", first + 1, {"status": "CANCELLED"}),  # small: would fit alone
             ("d1", first, {"status": "COMPLETED", "output": _out(first)})],
            [("d1", {"status": "FAILED"})],
        )
    assert [tuple(r) for r in store.node_rows("d1")] == before
    assert store.dispatch_status("d1") == "RUNNING"
    store.close()


def test_after_disk_full_the_final_state_is_written_with_the_outputs_kept(tiny_fs):
    store = Store(tiny_fs / "results")
    _new_dispatch(store)
    assert (tiny_fs / "results" / RESERVE_NAME).stat().st_size > 0
    first = _fill(store)
    nodes, disp = _final_updates(first)
    assert store.write_after_error(nodes, disp) == []  # the reserve made room for all of it
    _check_consistent(store)
    assert store.node_row("d1", first)["status"] == "COMPLETED"
    store.close()
    again = Store(tiny_fs / "results")  # another process's view
    _check_consistent(again)
    again.close()


def test_when_even_the_reserve_is_not_enough_lost_outputs_are_named(tiny_fs):
    store = Store(tiny_fs / "results")
    _new_dispatch(store)
    first = _fill(store)
    store.release_reserve()
    filler = tiny_fs / "results" / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # take the room the reserve left, as another writer would
        while True:
            os.write(fd, b"\1" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    # leave a little room (as a disk that is nearly, not exactly, full): enough for the final
    # state without outputs, not for the outputs (an exactly full disk refuses even that, and
    # how much SQLite needs then depends on its page layout)
    os.truncate(filler, max(0, filler.stat().st_size - 96 * 1024))
    nodes, disp = _final_updates(first)
    big = 400 * 1024  # does not fit in what is left
    nodes[0][2]["output"] = cloudpickle.dumps(os.urandom(big))
    nodes[1][2]["stdout"] = "x" * big
    lost = store.write_after_error(nodes, disp)
    assert lost == [("d1", first)]
    node = store.node_row("d1", first)
    assert node["status"] == "FAILED" and "output is lost" in node["error"]
    assert len(store.node_row("d1", first + 1)["stdout"]) < 5000
    row = store.dispatch_row("d1")
    assert row["status"] == "FAILED" and f"node {first}" in row["error"]
    _check_consistent(store)
    store.close()


def test_a_failed_output_file_write_leaves_no_partial_file(tiny_fs):
    store = Store(tiny_fs / "results")
    _new_dispatch(store, n=1)
    with pytest.raises(StoreFullError, match="output file"):
        store.output_fields("d1", 0, b"x" * (INLINE_LIMIT * 4))
    folder = tiny_fs / "results" / "outputs" / "d1"
    assert list(folder.iterdir()) == []
    # and a smaller one still fits: the failed one left nothing behind
    fields = store.output_fields("d1", 0, b"y" * (INLINE_LIMIT + 10))
    assert Path(fields["output_file"]).read_bytes() == b"y" * (INLINE_LIMIT + 10)
    store.close()


def test_the_reserve_is_made_again_once_there_is_room(tiny_fs):
    store = Store(tiny_fs / "results")
    _new_dispatch(store, n=2)
    reserve = tiny_fs / "results" / RESERVE_NAME
    assert store.release_reserve() and not reserve.exists()
    store.apply([("d1", 0, {"status": "COMPLETED"})])
    assert reserve.exists() and reserve.stat().st_mode & 0o777 == 0o600
    store.close()


# ---------------------------------------------------------------------- the file under us


def _live_store(tmp_path) -> Store:
    store = Store(tmp_path / "s")
    _new_dispatch(store, n=2)
    store.apply([("d1", 0, {"status": "COMPLETED", "output": b"kept"})])
    return store


def test_a_store_file_deleted_under_a_live_store_is_detected(tmp_path):
    store = _live_store(tmp_path)
    (tmp_path / "s" / "valent.db").unlink()
    with pytest.raises(StoreLostError, match="was deleted"):
        store.apply([("d1", 1, {"status": "COMPLETED"})])
    with pytest.raises(StoreLostError, match="deleted"):  # and reads say so too
        store.dispatch_row("d1")
    store.close()


def test_a_store_file_truncated_under_a_live_store_is_detected(tmp_path):
    store = _live_store(tmp_path)
    os.truncate(tmp_path / "s" / "valent.db", 0)
    with pytest.raises(StoreLostError, match="truncated"):
        store.apply([("d1", 1, {"status": "COMPLETED"})])
    store.close()


def test_a_store_file_sqlite_itself_made_smaller_is_not_lost(tmp_path):
    """SQLite shrinks the file itself (a ``VACUUM``, from any connection; a checkpoint that
    truncates it to the committed size): the store is not lost. Before the fix any shrink
    read as "truncated" and every later write of the process failed."""
    import sqlite3

    store = _live_store(tmp_path)
    db = tmp_path / "s" / "valent.db"
    other = sqlite3.connect(db, isolation_level=None)  # a second connection, as a user's
    other.execute("CREATE TABLE scratch (b BLOB)")
    other.executemany("INSERT INTO scratch VALUES (?)", [(os.urandom(4000),) for _ in range(50)])
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispatch_row("d1")  # the store sees the file at its biggest
    big = db.stat().st_size
    other.execute("DROP TABLE scratch")
    other.execute("VACUUM")
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    assert db.stat().st_size < big  # SQLite made the file smaller
    store.apply([("d1", 1, {"status": "COMPLETED"})])
    assert store.node_row("d1", 1)["status"] == "COMPLETED"
    os.truncate(db, 4096 + 100)  # cut inside a page by someone else: lost
    with pytest.raises(StoreLostError, match="truncated"):
        store.dispatch_row("d1")
    store.close()


def test_a_store_file_replaced_under_a_live_store_is_detected(tmp_path):
    store = _live_store(tmp_path)
    other = Store(tmp_path / "other")
    other.dispatch_status("x")
    other.close()
    os.replace(tmp_path / "other" / "valent.db", tmp_path / "s" / "valent.db")
    with pytest.raises(StoreLostError, match="replaced"):
        store.dispatch_row("d1")
    store.close()


def test_updates_of_rows_the_store_does_not_hold_are_a_lost_store(tmp_path):
    """A store opened after the file was replaced: the dispatch's rows are not in it."""
    store = Store(tmp_path / "s")
    _new_dispatch(store, n=1)
    with pytest.raises(StoreLostError, match="no longer holds node 5 of dispatch d1"):
        store.apply([("d1", 0, {"status": "COMPLETED"}), ("d1", 5, {"status": "COMPLETED"})])
    assert store.node_row("d1", 0)["status"] == "RUNNING"  # nothing of the batch was written
    with pytest.raises(StoreLostError, match="dispatch nope"):
        store.apply([], [("nope", {"status": "FAILED"})])
    store.close()


def test_after_a_lost_store_new_work_gets_a_fresh_one(results_dir):
    @ct.electron
    def one():
        return 1

    @ct.lattice
    def wf():
        return one()

    first = ct.dispatch_sync(wf)()
    assert first.result == 1
    store = get_store()
    (results_dir / "valent.db").unlink()
    with pytest.raises(StoreLostError):
        store.dispatch_row(first.dispatch_id)
    assert get_store() is not store
    second = ct.dispatch_sync(wf)()
    assert second.status == ct.Status.COMPLETED and second.result == 1
    with pytest.raises(ct.UnknownDispatchError, match="deleted, replaced or truncated"):
        ct.get_result(first.dispatch_id)
    assert uuid.UUID(second.dispatch_id)


_FILL_THE_DISK = r"""
import os, valent as ct

@ct.electron
def t(i):
    return os.urandom(60 * 1024)

@ct.lattice
def wf(n):
    return [t(i) for i in range(n)]

try:
    r = ct.dispatch_sync(wf)(60)
    print("RESULT", r.status)
except ct.StoreError as exc:
    print("RAISED", type(exc).__name__)
"""


def test_a_dispatch_that_fills_the_disk_ends_failed_with_every_node_final(tiny_fs):
    """Issue #14 end to end: 60 tasks of 60 KiB each on a 4 MiB disk. The dispatch ends
    FAILED with the store error as its cause, no node is left RUNNING or PENDING, nothing
    says "cancel requested", and every COMPLETED node's output is there."""
    import sys

    results = tiny_fs / "results"
    env = dict(os.environ, VALENT_RESULTS_DIR=str(results))
    res = subprocess.run([sys.executable, "-c", _FILL_THE_DISK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "disk is full" in res.stderr  # said once, clearly
    store = Store(results)
    try:
        (row,) = store.list_dispatches()
        assert row["status"] == "FAILED" and "disk is full" in row["error"], dict(row)
        full = store.dispatch_row(row["dispatch_id"])
        nodes = store.node_rows(row["dispatch_id"])
        assert {n["status"] for n in nodes} <= {"COMPLETED", "FAILED", "CANCELLED"}
        assert not any(n["reason"] == "cancel requested" for n in nodes)
        result = Result(full, nodes, str(results))
        done = [n for n in nodes if n["status"] == "COMPLETED" and n["name"] == "t"]
        assert done
        for n in done:
            assert len(result.get_node_result(n["node_id"])["output"]) == OUT
    finally:
        store.close()
