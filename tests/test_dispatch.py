"""Dispatching and aggregation: COMPLETED, FAILED with the other branch kept, upstream cancels,
the Result's fields and printed layout."""

from __future__ import annotations

import time

import pytest
import valent as ct


@ct.electron
def inc(x):
    return x + 1


@ct.electron
def slow_inc(x, delay):
    time.sleep(delay)
    print(f"slow_inc {x}")
    return x + 1


@ct.electron
def boom(x):
    print("about to fail")
    raise ValueError(f"bad input {x}")


@ct.electron
def after(x):
    return x * 10


@ct.lattice
def chain(n):
    return after(inc(inc(n)))


@ct.lattice
def two_branches(n, delay):
    good = slow_inc(n, delay)
    bad = boom(n)
    return {"good": good, "bad_child": after(bad), "grandchild": after(after(bad))}


def test_all_completed_is_completed():
    before = time.time()
    result = ct.dispatch_sync(chain)(1)
    assert result.status == ct.Status.COMPLETED and result.status == "COMPLETED"
    assert result.result == 30
    assert result.error is None
    assert result.inputs == {"args": [1], "kwargs": {}}
    assert before - 1 <= result.start_time.timestamp() <= result.end_time.timestamp()
    assert result.end_time.timestamp() <= time.time() + 1
    for node in result.get_all_node_results():
        assert node["status"] == "COMPLETED"
        assert node["cancel_outcome"] is None
        assert node["start_time"] is not None and node["end_time"] >= node["start_time"]


def test_failure_in_one_branch_keeps_the_other_and_cancels_dependents():
    result = ct.dispatch_sync(two_branches)(1, 0.5)
    assert result.status == ct.Status.FAILED
    assert result.result is None
    nodes = {f"{r['node_name']}({r['node_id']})": r for r in result.get_all_node_results()}
    good = next(r for r in nodes.values() if r["node_name"] == "slow_inc")
    assert good["status"] == "COMPLETED" and good["output"] == 2
    assert "slow_inc 1" in good["stdout"]
    failed = next(r for r in nodes.values() if r["node_name"] == "boom")
    assert failed["status"] == "FAILED"
    assert "ValueError: bad input 1" in failed["error"]
    # the function travels by value (cloudpickle), so its frame names it but not its file
    assert "in boom" in failed["traceback"] and "ValueError: bad input 1" in failed["traceback"]
    assert "about to fail" in failed["stdout"]
    assert "boom" in result.error and "bad input 1" in result.error
    downstream = [r for r in nodes.values() if r["node_name"] == "after"]
    assert len(downstream) == 3
    for r in downstream:
        assert r["status"] == "CANCELLED"
        assert r["reason"] == "upstream"
        assert r["start_time"] is None  # never started
        assert r["output"] is None


def test_kwargs_and_inputs_are_recorded():
    @ct.lattice
    def kw(a, *, b=2):
        return inc(a) if b else None

    result = ct.dispatch_sync(kw)(4, b=3)
    assert result.result == 5
    assert result.inputs == {"args": [4], "kwargs": {"b": 3}}


def test_node_result_has_the_documented_keys():
    result = ct.dispatch_sync(chain)(1)
    node = result.get_node_result(0)
    for key in (
        "node_id", "node_name", "status", "output", "error", "start_time", "end_time",
        "cancel_outcome",
    ):
        assert key in node
    assert node["node_id"] == 0 and node["node_name"] == "inc" and node["output"] == 2
    with pytest.raises(KeyError):
        result.get_node_result(99)


def test_str_of_result_has_covalents_layout_and_node_detail():
    result = ct.dispatch_sync(two_branches)(1, 0.0)
    text = str(result)
    for field in (
        "Lattice Result", "status: FAILED", "result: None", "input args: [1, 0.0]",
        "input kwargs: {}", "error:", "start_time:", "end_time:", "results_dir:",
        f"dispatch_id: {result.dispatch_id}", "Node Outputs",
    ):
        assert field in text, field
    assert "slow_inc(0): 2  [COMPLETED]" in text
    assert "[CANCELLED, upstream]" in text
    assert repr(result).startswith("<Result ")


def test_dispatch_returns_at_once_and_get_result_waits():
    t0 = time.monotonic()
    dispatch_id = ct.dispatch(two_branches)(1, 1.0)
    assert time.monotonic() - t0 < 5  # returns before the 1 s task could finish (10x)
    assert isinstance(dispatch_id, str) and len(dispatch_id) == 36
    early = ct.get_result(dispatch_id)
    assert early.status in ("RUNNING", "NEW_OBJECT")
    with pytest.raises(ct.DispatchTimeoutError):
        ct.get_result(dispatch_id, wait=True, timeout=0.05)
    final = ct.get_result(dispatch_id, wait=True, timeout=30)
    assert final.status == "FAILED"
    assert ct.get_result(dispatch_id[:8]).dispatch_id == dispatch_id  # a unique prefix works


def test_many_independent_tasks_and_a_fan_in():
    @ct.electron
    def square(i):
        return i * i

    @ct.electron
    def summed(xs):
        return sum(xs)

    @ct.lattice
    def fan(n):
        return summed([square(i) for i in range(n)])

    result = ct.dispatch_sync(fan)(40)
    assert result.status == "COMPLETED"
    assert result.result == sum(i * i for i in range(40))


def test_status_and_cancel_outcome_values():
    assert [s.value for s in ct.Status] == [
        "NEW_OBJECT", "PENDING", "RUNNING", "CANCELLING", "COMPLETED", "FAILED", "CANCELLED",
    ]
    assert ct.Status.CANCELLED == "CANCELLED" and str(ct.Status.FAILED) == "FAILED"
    assert {s for s in ct.Status if s.is_final} == {"COMPLETED", "FAILED", "CANCELLED"}
    assert [o.value for o in ct.CancelOutcome] == [
        "dequeued", "killed", "runs_to_completion", "too_late", "failed",
    ]
