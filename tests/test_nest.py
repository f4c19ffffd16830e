"""Sublattices: child dispatches built from real inputs, nesting, cancel at every level.

Real worker processes (Local executor). Tasks that must be stopped write their pid, so the
tests check with psutil that a cancel of an outer level really stopped the inner work.
"""

from __future__ import annotations

import os
import time

import pytest
import valent as ct
from core_support import read_pid, wait_for, wait_gone
from valent.testing.tasks import write_atomic

# ------------------------------------------------------------------ the how-to's workflow


@ct.electron
def identity(x):
    return x


@ct.electron
def root(x):
    return x ** 0.5


@ct.electron
def square(x):
    return x * x


@ct.electron
@ct.lattice
def multiply_3_and_square(x):
    root(x=x)
    return square(x=x * 3)


@ct.lattice
def workflow(a):
    val_1 = identity(x=a)
    return multiply_3_and_square(x=val_1)


def test_a_sublattice_runs_as_a_child_dispatch_with_its_inner_result():
    """What the execute_sublattice how-to checks, and the links between the levels."""
    did = ct.dispatch(workflow)(a=2)
    result = ct.get_result(did, wait=True, timeout=60)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 36
    assert list(result.get_all_node_outputs()) == [
        "identity(0)", ":parameter:2(1)", ":sublattice:multiply_3_and_square(2)",
    ]
    node = result.get_node_result(2)
    assert node["node_name"] == ":sublattice:multiply_3_and_square"
    assert node["status"] == ct.Status.COMPLETED and node["output"] == 36
    inner = node["sublattice_result"]
    assert isinstance(inner, ct.Result)
    assert inner.result == 36
    # its body saw the real value 2: x * 3 is a parameter 6, not an operator node
    assert inner.get_all_node_outputs() == {
        "root(0)": 2 ** 0.5, ":parameter:2(1)": 2, "square(2)": 36, ":parameter:6(3)": 6,
    }
    assert inner.dispatch_id == node["sub_dispatch_id"] != did
    assert inner.root_dispatch_id == did == result.root_dispatch_id
    assert inner.parent_dispatch_id == did and inner.parent_node_id == 2
    assert result.get_node_result(0)["sublattice_result"] is None
    # the inner nodes ran on their executor, as real nodes
    assert {n["executor"] for n in inner.get_all_node_results() if n["node_name"] in
            ("root", "square")} == {"local"}


# ------------------------------------------------------------------ data-dependent, deep


@ct.electron
def count_to(n):
    return list(range(n))


@ct.electron
def plus(a, b):
    return a + b


@ct.electron
@ct.lattice
def branchy(n):
    # the body sees the real n: a Python if and a loop over range(n)
    if n > 3:
        return [plus(i, 100) for i in range(n)]
    return [plus(i, 0) for i in range(n)]


@ct.lattice
def data_dependent(a, b):
    return [branchy(a), branchy(b)]


def test_a_sublattice_body_branches_and_loops_on_its_real_inputs():
    result = ct.dispatch_sync(data_dependent)(2, 5)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [[0, 1], [100, 101, 102, 103, 104]]
    small = result.get_node_result(0)["sublattice_result"]
    big = result.get_node_result(2)["sublattice_result"]
    assert sum(1 for n in small.get_all_node_results() if n["node_name"] == "plus") == 2
    assert sum(1 for n in big.get_all_node_results() if n["node_name"] == "plus") == 5


@ct.electron
@ct.lattice
def level3(x):
    return plus(x, 1000)


@ct.electron
@ct.lattice
def level2(x):
    return level3(plus(x, 100))


@ct.electron
@ct.lattice
def level1(x):
    return level2(plus(x, 10))


@ct.lattice
def three_deep(x):
    return plus(level1(x), 1)


def _sub(result, name):
    """The inner Result of the one node called ``name``."""
    nodes = [n for n in result.get_all_node_results() if n["node_name"] == name]
    assert len(nodes) == 1, [n["node_name"] for n in result.get_all_node_results()]
    return nodes[0]["sublattice_result"]


def test_nesting_three_deep_links_every_level_to_the_root():
    did = ct.dispatch(three_deep)(0)
    result = ct.get_result(did, wait=True, timeout=60)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 1111
    r1 = _sub(result, ":sublattice:level1")
    r2 = _sub(r1, ":sublattice:level2")
    r3 = _sub(r2, ":sublattice:level3")
    assert [r.result for r in (r1, r2, r3)] == [1110, 1110, 1110]
    assert r3.get_all_node_outputs()[":parameter:110(1)"] == 110  # built from the real value
    assert {r.root_dispatch_id for r in (result, r1, r2, r3)} == {did}
    assert r3.parent_dispatch_id == r2.dispatch_id and r2.parent_dispatch_id == r1.dispatch_id
    # `valent list` hides the child dispatches unless asked
    from valent._store import get_store

    store = get_store()
    tops = {r["dispatch_id"] for r in store.list_dispatches(children=False)}
    assert tops == {did}
    assert len(store.list_dispatches(children=True)) == 4


# ------------------------------------------------------------------ executors inside


def test_per_electron_executors_inside_a_sublattice_are_honoured(local_executor):
    mine = local_executor

    @ct.electron(executor=mine)
    def on_mine(x):
        return os.getpid()

    @ct.electron
    @ct.lattice
    def sub(x):
        return [on_mine(x), identity(x)]

    @ct.lattice
    def wf(x):
        return sub(x)

    result = ct.dispatch_sync(wf)(1)
    assert result.status == ct.Status.COMPLETED, result.error
    inner = result.get_node_result(0)["sublattice_result"]
    pid = inner.get_node_result(0)["output"]
    assert pid in mine.pool.worker_pids()  # ran on the electron's own executor instance


# ------------------------------------------------------------------ failure inside


@ct.electron
def boom(x):
    raise ValueError(f"inner failure {x}")


@ct.electron
@ct.lattice
def failing_sub(x):
    return plus(boom(x), 1)


@ct.lattice
def with_failure(x):
    return plus(failing_sub(x), 1)


def test_a_failure_inside_fails_the_sublattice_node_with_the_inner_error():
    result = ct.dispatch_sync(with_failure)(7)
    assert result.status == ct.Status.FAILED
    node = result.get_node_result(0)
    assert node["status"] == ct.Status.FAILED
    assert "inner failure 7" in node["error"] and "boom(0)" in node["error"]
    inner = node["sublattice_result"]
    assert inner.status == ct.Status.FAILED
    assert "inner failure 7" in inner.get_node_result(0)["error"]
    assert "Traceback" in inner.get_node_result(0)["traceback"]
    assert "inner failure 7" in result.error
    assert result.get_node_result(2)["status"] == ct.Status.CANCELLED  # upstream


@ct.electron
@ct.lattice
def bad_body(x):
    if x:
        raise KeyError("the body itself raised")
    return identity(x)


def test_a_sublattice_whose_body_raises_fails_its_node():
    @ct.lattice
    def wf(x):
        return bad_body(x)

    result = ct.dispatch_sync(wf)(1)
    assert result.status == ct.Status.FAILED
    node = result.get_node_result(0)
    assert "the body itself raised" in node["error"]
    assert node["sublattice_result"] is None


# ------------------------------------------------------------------ cancel, every level


@ct.electron
def hold(pid_file, seconds=60):
    write_atomic(pid_file, str(os.getpid()))
    time.sleep(seconds)
    return "finished"


@ct.electron
@ct.lattice
def inner_hold(d):
    return hold(f"{d}/inner.pid")


@ct.electron
@ct.lattice
def outer_hold(d):
    # a task of its own and a sublattice, both running when the cancel comes
    return [hold(f"{d}/middle.pid"), inner_hold(d)]


@ct.lattice
def nested_hold(d):
    return identity(outer_hold(d))


def _wait_running(did, count):
    from valent._store import get_store

    store = get_store()

    def running():
        rows = store._read(
            "SELECT COUNT(*) FROM nodes n JOIN dispatches d ON n.dispatch_id = d.dispatch_id "
            "WHERE d.root_dispatch_id = ? AND n.status = 'RUNNING' AND n.kind = 'electron'",
            (did,),
        )
        return rows[0][0] >= count

    assert wait_for(running, 60), "the inner tasks never ran"


def test_cancelling_the_outer_dispatch_kills_the_tasks_at_every_level(tmp_path):
    did = ct.dispatch(nested_hold)(str(tmp_path))
    pids = [read_pid(tmp_path / "middle.pid", 60), read_pid(tmp_path / "inner.pid", 60)]
    _wait_running(did, 2)
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=60)
    assert wait_gone(pids, 10) == [], "a cancelled inner task's process is still alive"
    assert result.status == ct.Status.CANCELLED
    outer_node = result.get_node_result(0)
    assert outer_node["status"] == ct.Status.CANCELLED
    assert outer_node["cancel_outcome"] == "killed"  # something running inside was stopped
    assert result.get_node_result(2)["status"] == ct.Status.CANCELLED  # identity: upstream
    middle = outer_node["sublattice_result"]
    assert middle.status == ct.Status.CANCELLED
    held = middle.get_node_result(0)
    assert (held["status"], held["cancel_outcome"]) == (ct.Status.CANCELLED, "killed")
    assert held["start_time"] is not None
    sub_node = middle.get_node_result(2)
    assert (sub_node["status"], sub_node["cancel_outcome"]) == (ct.Status.CANCELLED, "killed")
    inner = sub_node["sublattice_result"]
    assert inner.status == ct.Status.CANCELLED
    assert inner.get_node_result(0)["cancel_outcome"] == "killed"


@ct.electron
def quick(x, marker):
    write_atomic(marker, "done")
    return x


@ct.lattice
def one_of_two(d):
    slow = inner_hold(d)
    other = quick(1, f"{d}/quick")
    return [identity(slow), plus(other, 1)]


def test_cancelling_one_sublattice_node_stops_it_alone(tmp_path):
    did = ct.dispatch(one_of_two)(str(tmp_path))
    pid = read_pid(tmp_path / "inner.pid", 60)
    _wait_running(did, 1)
    assert wait_for(lambda: (tmp_path / "quick").exists(), 30)
    ct.cancel(did, task_ids=[0])
    result = ct.get_result(did, wait=True, timeout=60)
    assert wait_gone([pid], 10) == []
    node = result.get_node_result(0)
    assert (node["status"], node["cancel_outcome"]) == (ct.Status.CANCELLED, "killed")
    assert node["sublattice_result"].get_node_result(0)["cancel_outcome"] == "killed"
    names = {n["node_name"]: n for n in result.get_all_node_results()}
    assert names["identity"]["status"] == ct.Status.CANCELLED  # its dependent
    assert names["plus"]["status"] == ct.Status.COMPLETED and names["plus"]["output"] == 2
    assert result.status == ct.Status.CANCELLED


@ct.electron
def gate(pid_file):
    write_atomic(pid_file, str(os.getpid()))
    time.sleep(60)
    return 1


@ct.lattice
def sub_after_gate(d):
    return inner_hold(gate(f"{d}/gate.pid"))


def test_a_sublattice_cancelled_before_it_started_is_dequeued(tmp_path):
    did = ct.dispatch(sub_after_gate)(str(tmp_path))
    pid = read_pid(tmp_path / "gate.pid", 60)
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=60)
    assert wait_gone([pid], 10) == []
    node = result.get_node_result(2)
    assert node["node_name"] == ":sublattice:inner_hold"
    assert node["status"] == ct.Status.CANCELLED and node["sublattice_result"] is None
    assert not (tmp_path / "inner.pid").exists()


def test_a_sublattice_timeout_stops_its_dispatch_and_fails_the_node(tmp_path):
    timed = ct.electron(timeout=1.0)(inner_hold.fn)

    @ct.lattice
    def wf(d):
        return timed(d)

    did = ct.dispatch(wf)(str(tmp_path))
    pid = read_pid(tmp_path / "inner.pid", 60)
    result = ct.get_result(did, wait=True, timeout=60)
    assert wait_gone([pid], 10) == []
    node = result.get_node_result(0)
    assert node["status"] == ct.Status.FAILED
    assert "timed out" in node["error"] and "killed" in node["error"]
    assert node["sublattice_result"].status == ct.Status.CANCELLED


def test_the_cancel_outcome_rule_of_a_sublattice_node():
    from valent._engine.rules import sublattice_outcome

    out = ct.CancelOutcome
    assert sublattice_outcome([out.DEQUEUED, out.KILLED, None]) == out.KILLED
    assert sublattice_outcome([out.DEQUEUED, out.TOO_LATE]) == out.DEQUEUED
    assert sublattice_outcome([out.RUNS_TO_COMPLETION, out.DEQUEUED]) == out.RUNS_TO_COMPLETION
    assert sublattice_outcome([out.FAILED, out.RUNS_TO_COMPLETION]) == out.FAILED
    assert sublattice_outcome([out.TOO_LATE, None]) == out.TOO_LATE
    assert sublattice_outcome([None]) == out.DEQUEUED


def test_ctrl_c_tally_counts_the_tasks_inside_sublattices(tmp_path):
    """lifecycle.stop_owned (Ctrl-C, SIGTERM) cancels the top-level dispatches only and
    counts the tasks stopped inside their sublattices."""
    from valent import api, lifecycle

    did = ct.dispatch(nested_hold)(str(tmp_path))
    pids = [read_pid(tmp_path / "middle.pid", 60), read_pid(tmp_path / "inner.pid", 60)]
    _wait_running(did, 2)
    d = api.get_dispatcher()
    runs = d.active()
    assert [r.id for r in runs] == [did]  # children go with their parent
    summary = lifecycle.stop_owned(d, runs)
    assert wait_gone(pids, 10) == []
    assert "2 killed" in summary, summary
    assert ct.get_result(did).status == ct.Status.CANCELLED


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    yield
    from valent import api

    d = api._dispatcher
    if d is not None:
        assert wait_for(lambda: not d.active(), 30) is not None



# ------------------------------------------------------------------ forms, CLI, owner death


def test_electron_of_a_lattice_object_with_an_executor_is_a_sublattice():
    @ct.lattice
    def plain(x):
        return plus(x, 1)

    as_node = ct.electron(plain)
    with_ex = ct.electron(executor="local")(plain)

    @ct.lattice
    def wf(x):
        return [as_node(x), with_ex(x)]

    result = ct.dispatch_sync(wf)(1)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [2, 2]
    names = [n["node_name"] for n in result.get_all_node_results()]
    assert names.count(":sublattice:plain") == 2
    assert plain(1) is not None  # the lattice itself still runs as plain calls


def _valent(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{root / 'core'}:{root / 'plugins'}")
    out = subprocess.run([sys.executable, "-m", "valent.cli", *args], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_cli_shows_the_nesting():
    did = ct.dispatch(three_deep)(0)
    ct.get_result(did, wait=True, timeout=60)
    top = _valent("list").splitlines()
    assert len(top) == 2 and top[1].startswith(did[:8])  # child dispatches hidden
    every = _valent("list", "--all").splitlines()[1:]
    assert [len(line) - len(line.lstrip()) for line in every] == [0, 2, 4, 6]
    assert [line.split()[1] for line in every] == ["three_deep", "level1", "level2", "level3"]
    shown = _valent("show", did[:8])
    table = shown[shown.index("Nodes\n-----"):].splitlines()
    assert any(line.startswith("      0  ") and "plus" in line for line in table), table
    lines = _valent("watch", did[:8]).splitlines()
    assert any(line[8:].startswith(" " * 8 + "plus(0) COMPLETED") for line in lines), lines


OWNER = """
import os, sys, time
import valent as ct

d = sys.argv[1]

@ct.electron
def hold(name):
    with open(os.path.join(d, name + ".tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
    time.sleep(300)

@ct.electron
@ct.lattice
def inner(x):
    return hold("inner.pid")

@ct.lattice
def wf(x):
    return inner(x)

did = ct.dispatch(wf)(1)
print(did, flush=True)
ct.get_result(did, wait=True)
"""


def test_owner_death_fails_every_level_and_its_inner_tasks_die(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = dict(os.environ, PYTHONPATH=f"{root / 'core'}:{root / 'plugins'}")
    owner = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        did = owner.stdout.readline().strip()
        pid = read_pid(tmp_path / "inner.pid", 60)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(30)
        owner.stdout.close()
    assert wait_gone([pid], 15) == [], "the inner task outlived its killed owner"
    result = ct.get_result(did)  # reading the root marks its whole tree
    assert result.status == ct.Status.FAILED
    from valent._store import get_store

    child = get_store().child_dispatches(did)[0]
    assert child["status"] == "FAILED" and "killed" in child["error"]
    inner = get_store().node_rows(child["dispatch_id"])
    assert {n["status"] for n in inner if n["kind"] == "electron"} == {"CANCELLED"}
