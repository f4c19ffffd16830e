"""Traced features on Dask, where the dispatcher chains tasks: wait edges, operators, unpacking."""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import valent as ct
from valent.dispatcher import Dispatcher

# The dispatcher chains a task on Dask once its parents have started there, handing their
# values as Upstream markers; a wait edge has no marker, so _can_chain must not chain over
# one (one line there, owned by the dispatcher's maintainers). Until it does, this fails.
_CHAIN_KNOWS_WAITS = "waits" in inspect.getsource(Dispatcher._can_chain)


def _stamp(folder: str, name: str, sleep: float = 0.0) -> None:
    start = time.time()
    time.sleep(sleep)
    Path(folder, f"{name}.json").write_text(json.dumps([start, time.time()]))


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.xfail(
    not _CHAIN_KNOWS_WAITS, strict=True,
    reason="dispatcher._can_chain must skip a parent in node.waits until it completed",
)
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
