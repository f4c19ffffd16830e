"""The dispatcher's batching keeps the truth: node changes written late (merged per node) are
still every final state and time a reader needs, a node still running when the batch is
written is written RUNNING, a cancel during a huge first turn is read before every task was
handed to its executor, and a whole-dispatch cancel that dequeues nodes in one statement
says for each what ``cancel_node`` would have said."""

from __future__ import annotations

import time

import valent as ct
from core_support import wait_gone, wait_until
from valent._store import Store, get_store
from valent.testing import tasks
from valent_local import LocalExecutor


class Counting(LocalExecutor):
    """A real LocalExecutor that counts the tasks handed to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = 0

    def run(self, task, wake):
        self.runs += 1
        return super().run(task, wake)


def wait_long():
    time.sleep(60)
    return "slept"


def noop(x):
    return x


def _shutdown(ex: LocalExecutor) -> None:
    pids = ex.pool.worker_pids() if ex._pool is not None else []
    ex.shutdown()
    assert wait_gone(pids) == [], "LocalExecutor left worker processes behind"


def test_cancel_during_a_huge_first_turn_is_read_before_every_task_is_started():
    n = 20_000
    ex = Counting(workers=2, grace=0.2)
    e = ct.electron(wait_long, executor=ex)

    @ct.lattice
    def wide(n):
        return [e() for _ in range(n)]

    try:
        did = ct.dispatch(wide)(n)
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=120)
        assert r.status == ct.Status.CANCELLED
        # the loop starts ready tasks a slice at a time and reads its queue in between: the
        # cancel stopped the rest before they reached the executor (all 20,000 did before)
        assert ex.runs < n, ex.runs
        nodes = r.get_all_node_results()
        assert len(nodes) == n
        never_started = 0
        for node in nodes:
            assert node["status"] == "CANCELLED", node
            assert node["cancel_requested_at"] is not None, node
            assert node["end_time"] is not None, node
            if node["cancel_outcome"] == "killed":
                assert node["start_time"] is not None, node
            else:
                assert node["cancel_outcome"] == "dequeued", node
                assert node["cancel_confirmed_at"] is not None, node
                never_started += node["start_time"] is None
        assert never_started >= n - ex.runs
    finally:
        _shutdown(ex)


def test_a_node_still_running_when_the_batch_is_written_is_written_running(tmp_path):
    ex = LocalExecutor(workers=1, grace=0.2)
    e = ct.electron(tasks.hold, executor=ex)

    @ct.lattice
    def one(d):
        return e(d, 60)

    reader = Store(get_store().dir)  # its own connection, as `valent watch` has
    try:
        did = ct.dispatch(one)(str(tmp_path))
        wait_until(lambda: (tmp_path / tasks.STARTED).exists(), timeout=30)

        def running():
            row = reader.node_row(did, 0)
            return row if row["status"] == "RUNNING" else None

        row = wait_until(running, timeout=30)
        assert row, "the running node was never written RUNNING"
        assert row["start_time"] is not None
        (tmp_path / tasks.RELEASE).write_text("go")
        r = ct.get_result(did, wait=True, timeout=60)
        assert r.status == ct.Status.COMPLETED and r.result == "released"
        final = reader.node_row(did, 0)
        assert final["status"] == "COMPLETED"
        assert final["start_time"] == row["start_time"]
        assert final["end_time"] >= final["start_time"]
    finally:
        reader.close()
        _shutdown(ex)


def test_a_reader_sees_every_final_state_and_time_of_quick_tasks():
    ex = LocalExecutor(workers=2)
    e = ct.electron(noop, executor=ex)

    @ct.lattice
    def fan(n):
        return [e(i) for i in range(n)]

    try:
        did = ct.dispatch(fan)(300)
        ct.get_result(did, wait=True, timeout=60)
        reader = Store(get_store().dir)
        rows = reader.node_rows(did)
        reader.close()
        assert len(rows) == 600
        for row in rows:
            assert row["status"] == "COMPLETED", dict(row)
            assert row["start_time"] is not None and row["end_time"] >= row["start_time"]
            if row["kind"] == "electron":
                assert row["executor"] == "local" and row["attempts"] == 1
                assert row["output"] is not None and row["out_digest"] is not None
    finally:
        _shutdown(ex)


def test_cancel_of_some_unstarted_nodes_dequeues_them_and_their_dependents(tmp_path):
    ex = LocalExecutor(workers=1, grace=0.2)
    e = ct.electron(tasks.hold, executor=ex)
    after = ct.electron(noop, executor=ex)

    @ct.lattice
    def wf(d):
        first = e(d, 60)
        return [after(first), after(after(first)), e(d, 60)]

    try:
        did = ct.dispatch(wf)(str(tmp_path))
        wait_until(lambda: (tmp_path / tasks.STARTED).exists(), timeout=30)
        r0 = ct.get_result(did)
        ids = {n["node_id"]: n for n in r0.get_all_node_results()}
        waiting = [i for i, n in ids.items() if n["node_name"] == "noop"]
        assert len(waiting) == 3
        ct.cancel(did, task_ids=[waiting[0], waiting[1]])  # two not started, and C below
        (tmp_path / tasks.RELEASE).write_text("go")
        r = ct.get_result(did, wait=True, timeout=60)
        assert r.status == ct.Status.CANCELLED
        nodes = {n["node_id"]: n for n in r.get_all_node_results()}
        for i in (waiting[0], waiting[1]):
            n = nodes[i]
            assert n["status"] == "CANCELLED" and n["cancel_outcome"] == "dequeued", n
            assert n["start_time"] is None and n["cancel_requested_at"] is not None, n
            assert n["reason"] == "cancel requested", n
        # the dependent of a listed node is cancelled with it, in its own right
        c = nodes[waiting[2]]
        assert c["status"] == "CANCELLED" and c["cancel_outcome"] == "dequeued", c
        holds = [n for n in nodes.values() if n["node_name"] == "hold"]
        assert all(n["status"] == "COMPLETED" for n in holds), holds
    finally:
        _shutdown(ex)


def test_bulk_changes_are_written_before_newer_per_node_changes(tmp_path):
    store = Store(tmp_path / "s")
    cols = ("dispatch_id", "node_id", "name", "kind", "executor", "parents", "status",
            "output", "out_digest")
    store.create_dispatch(
        {"dispatch_id": "d", "lattice_name": "x", "status": "NEW_OBJECT", "created_at": 0.0},
        [("d", i, "n", "electron", "local", "[]", "NEW_OBJECT", None, None) for i in range(4)],
        cols,
    )
    store.apply(
        [("d", 1, {"status": "PENDING"})], (),
        [("d", {"status": "CANCELLED", "reason": "bulk"}, [0, 1, 2])],
    )
    rows = {r["node_id"]: r for r in store.node_rows("d")}
    assert [rows[i]["status"] for i in range(4)] == [
        "CANCELLED", "PENDING", "CANCELLED", "NEW_OBJECT"
    ]
    assert rows[1]["reason"] == "bulk"
    store.close()


def inc(x):
    return x + 1


def test_a_chain_longer_than_the_chaining_window_keeps_every_value():
    from valent._engine.dispatcher import CHAIN_AHEAD

    n = CHAIN_AHEAD + 500  # chained a window at a time: each completion chains more
    ex = LocalExecutor(workers=2)
    e = ct.electron(inc, executor=ex)

    @ct.lattice
    def chain(n):
        x = e(0)
        for _ in range(n - 1):
            x = e(x)
        return x

    try:
        r = ct.dispatch_sync(chain)(n)
        assert r.status == ct.Status.COMPLETED and r.result == n
        rows = [row for row in get_store().node_rows(r.dispatch_id) if row["kind"] == "electron"]
        assert len(rows) == n
        assert all(row["status"] == "COMPLETED" and row["start_time"] for row in rows)
        assert sorted(r.get_node_result(row["node_id"])["output"] for row in rows) == list(
            range(1, n + 1)
        )
    finally:
        _shutdown(ex)
