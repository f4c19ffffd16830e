"""Covalent's "cancel a running workflow" how-to, on valent: the script with only the import
changed, its sleeps multiplied by ``factor`` (1.0 is the how-to's own numbers)."""

from __future__ import annotations

import time

import valent as ct
from core_support import wait_gone, wait_until
from valent.api import get_dispatcher


def make_workflow(factor: float):
    """The how-to's electrons and lattice, each sleep multiplied by ``factor``."""

    @ct.electron
    def task_1(x):
        time.sleep(x * factor)
        print("Task 1")
        return x

    @ct.electron
    def task_2(a, b):
        c = a + b
        time.sleep(c * factor)
        print("Task 2")
        return c

    @ct.electron
    def task_3(a):
        time.sleep(2 * factor)
        print("Task 3")
        return a**2

    @ct.lattice
    def workflow(x):
        res_2 = task_2(task_1(10), x)
        for _ in range(10):
            task_1(10)
        task_3(res_2)

    return workflow


NAMES = ["task_1(0)", ":parameter:10(1)", "task_2(2)", ":parameter:5(3)"] + [
    n for i in range(4, 24, 2) for n in (f"task_1({i})", f":parameter:10({i + 1})")
] + ["task_3(24)"]
TASK_1 = [f"task_1({i})" for i in [0, *range(4, 24, 2)]]


def test_the_how_to_cancelled_with_its_real_sleeps():
    workflow = make_workflow(1.0)
    dispatch_id = ct.dispatch(workflow)(5)

    def eleven_running():
        statuses = ct.get_result(dispatch_id).node_statuses()
        return all(statuses[n] == "RUNNING" for n in TASK_1)

    # the how-to sleeps 3 s here; by then the eleven 10-s task_1 must all be running at once
    assert wait_until(eleven_running, 9.0), ct.get_result(dispatch_id).node_statuses()
    running = ct.get_result(dispatch_id)
    assert running.status == ct.Status.RUNNING
    assert "status: RUNNING" in str(running)
    assert list(running.get_all_node_outputs()) == NAMES
    busy = get_dispatcher().named_executor("local").pool.busy_pids()
    assert len(busy) == 11

    t0 = time.monotonic()
    assert ct.cancel(dispatch_id) == f"Dispatch {dispatch_id} cancelled."
    result = ct.get_result(dispatch_id, wait=True)
    took = time.monotonic() - t0
    print(f"cancel -> get_result(wait=True) returned after {took:.3f} s")
    assert took < 10, f"the how-to's cancel took {took:.1f} s (expected about 1 s)"

    assert result.status == ct.Status.CANCELLED and result.status == "CANCELLED"
    text = str(result)
    assert "status: CANCELLED" in text and "Node Outputs" in text
    outputs = result.get_all_node_outputs()
    assert list(outputs) == NAMES
    for i, name in enumerate(NAMES):
        node = result.get_node_result(i)
        if name.startswith(":parameter:"):
            value = int(name.removeprefix(":parameter:").split("(")[0])
            assert node["status"] == "COMPLETED" and node["output"] == value
            continue
        assert node["status"] == "CANCELLED", name
        assert outputs[name] is None
        if name in TASK_1:
            assert node["cancel_outcome"] == "killed", name
            assert f"{name}: None  [CANCELLED, killed]" in text
        else:  # task_2 and task_3 never started
            assert node["cancel_outcome"] == "dequeued", name
            assert node["start_time"] is None
    assert wait_gone(busy, 5) == [], "a task process outlived the cancel"


def test_the_how_to_uncancelled_completes_in_about_its_critical_path():
    factor = 0.1  # task_1: 1 s, task_2: 1.5 s, task_3: 0.2 s; critical path 2.7 s
    t0 = time.monotonic()
    result = ct.dispatch_sync(make_workflow(factor))(5)
    took = time.monotonic() - t0
    assert result.status == "COMPLETED", result.error
    assert took < 27, f"took {took:.1f} s for a 2.7 s critical path"
    outputs = result.get_all_node_outputs()
    assert list(outputs) == NAMES
    assert outputs["task_1(0)"] == 10 and outputs["task_2(2)"] == 15
    assert outputs["task_3(24)"] == 225
    assert all(outputs[n] == 10 for n in TASK_1)
    assert result.result is None
    nodes = result.get_all_node_results()
    assert all(n["status"] == "COMPLETED" and n["cancel_outcome"] is None for n in nodes)
    assert nodes[0]["stdout"] == "Task 1\n" and nodes[2]["stdout"] == "Task 2\n"
    # dependencies were respected
    assert nodes[2]["start_time"] >= nodes[0]["end_time"]
    assert nodes[24]["start_time"] >= nodes[2]["end_time"]
    assert (nodes[2]["end_time"] - nodes[2]["start_time"]).total_seconds() >= 1.5 * 0.99
