"""Traced features on Dask, where the dispatcher chains tasks: wait edges, operators, unpacking."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cloudpickle
import valent as ct


def _stamp(folder: str, name: str, sleep: float = 0.0) -> None:
    start = time.time()
    time.sleep(sleep)
    Path(folder, f"{name}.json").write_text(json.dumps([start, time.time()]))


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_wait_edge_holds_a_chained_task_back_on_dask(dask_cluster, tmp_path):
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="finish"
    )
    folder = str(tmp_path)

    @ct.electron(executor=ex)
    def first(a):
        _stamp(folder, "first", 1.0)
        return a

    @ct.electron(executor=ex)
    def pair(a):
        return a, a + 1

    @ct.electron(executor=ex)
    def waiter(b):
        _stamp(folder, "waiter")
        return b

    @ct.lattice
    def flow():
        f = first(2)
        w = waiter(5)
        ct.wait(w, f)
        x, y = pair(f)
        return [w * 2, x + y]

    try:
        result = ct.dispatch_sync(flow)()
    finally:
        ex.shutdown()
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [10, 5]
    start_w, _ = json.loads((tmp_path / "waiter.json").read_text())
    _, end_f = json.loads((tmp_path / "first.json").read_text())
    assert start_w >= end_f, "the waiting task started on Dask before its parent ended"


def test_deps_and_calls_run_on_dask_and_die_with_a_cancel(dask_cluster, tmp_path):
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    log = tmp_path / "log"
    pid_file = tmp_path / "pid"

    def note(what):
        with open(log, "a") as f:
            f.write(what + "\n")
        return what

    @ct.electron(
        executor=ex,
        deps_bash=[f"echo bash >> {log}"],
        call_before=ct.DepsCall(note, args=("before",), retval_keyword="got"),
        call_after=ct.DepsCall(note, args=("after",)),
    )
    def task(x, got=None):
        note(f"body {got}")
        return x + 1

    @ct.electron(executor=ex, deps_bash=[f"sleep 30 & echo $! > {pid_file}; wait"])
    def stuck():
        return 1

    @ct.lattice
    def flow():
        return task(1)

    @ct.lattice
    def flow_stuck():
        return stuck()

    try:
        result = ct.dispatch_sync(flow)()
        assert result.status == ct.Status.COMPLETED, result.error
        assert result.result == 2
        assert log.read_text().split("\n")[:4] == ["bash", "before", "body before", "after"]

        did = ct.dispatch(flow_stuck)()
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the deps_bash command never started"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
    finally:
        ex.shutdown()
    assert r.status == ct.Status.CANCELLED
    assert r.get_node_result(0)["cancel_outcome"] == "killed"
    from valent.testing.procs import wait_gone

    assert wait_gone([pid]) == [], "the deps_bash sleep outlived the cancel"
