"""Load: 50 concurrent dispatches of 200 nodes each on the Local executor."""

from __future__ import annotations

import sqlite3

import psutil
import valent as ct
from valent.api import get_dispatcher


def _inc(x):
    return x + 1


def _total(xs):
    return sum(xs)


def test_fifty_concurrent_dispatches_of_two_hundred_nodes(results_dir):
    ex = ct.executors.LocalExecutor(workers=2)
    inc = ct.electron(_inc, executor=ex)
    total = ct.electron(_total, executor=ex)

    @ct.lattice
    def wide(k):
        outs = [inc(k * 1000 + i) for i in range(99)]  # 99 electrons + 99 parameters
        return total(outs)                                # + a collection + the fan-in = 200

    def one_round():
        ids = [ct.dispatch(wide)(k) for k in range(50)]
        return ids, [ct.get_result(i, wait=True, timeout=300) for i in ids]

    one_round()  # warm up (workers, imports, store)
    rss_before = psutil.Process().memory_info().rss
    ids, results = one_round()
    rss_after = psutil.Process().memory_info().rss
    try:
        for k, r in enumerate(results):
            assert r.status == ct.Status.COMPLETED, (k, r.error)
            assert r.node_count == 200
            assert r.result == sum(k * 1000 + i + 1 for i in range(99))
        # the dispatcher let go of every finished dispatch
        assert get_dispatcher().active() == []
        # memory stays bounded: a second round of 10,000 tasks costs no more than a little
        assert rss_after - rss_before < 200 * 2**20, (rss_before, rss_after)
        # the store is consistent: every node of every dispatch is final, none is left open
        conn = sqlite3.connect(results_dir / "valent.db")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            open_nodes = conn.execute(
                "SELECT COUNT(*) FROM nodes WHERE status NOT IN ('COMPLETED')"
            ).fetchone()[0]
            assert open_nodes == 0
            per_dispatch = conn.execute(
                "SELECT COUNT(*) FROM nodes GROUP BY dispatch_id"
            ).fetchall()
            assert len(per_dispatch) == 100 and {n for (n,) in per_dispatch} == {200}
        finally:
            conn.close()
    finally:
        ex.shutdown()
