"""Chaining on Dask, through the public API: a dependent goes to the cluster while its
parents run (values pass worker to worker), yet users see what they would without it."""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import psutil
import pytest
import valent as ct
import valent.timing
from dask_support import alive, wait_until
from valent import CancelOutcome, Status
from valent.testing.procs import write_atomic as _write

# ---------------------------------------------------------------------- task bodies


def gate(directory: str) -> int:
    """Write ``started`` (our PID), wait for ``release``; return 1."""
    _write(os.path.join(directory, "started"), str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(directory, "release")):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return 1


def inc(x: int) -> int:
    return x + 1


def mark(x, path: str):
    """Leave ``path`` behind (proof that the body ran) and pass ``x`` on."""
    _write(path, "ran")
    return x


def boom(x):
    raise ValueError(f"boom at {x}")


def sleeper(pid_file: str, seconds: float) -> str:
    _write(pid_file, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def fails_first(count_file: str) -> int:
    """Fail on the first attempt, then return the number of attempts."""
    with open(count_file, "a") as f:
        f.write("x")
    with open(count_file) as f:
        n = len(f.read())
    if n == 1:
        raise RuntimeError("first attempt fails")
    return 10 * n


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- helpers


@pytest.fixture(params=["kill", "finish"])
def mode(request):
    return request.param


@pytest.fixture
def dask_ex(dask_cluster, mode):
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode=mode, grace=0.5
    )
    yield ex
    ex.shutdown()


def _keys(dask_scheduler) -> list[str]:
    return [str(k) for k in dask_scheduler.tasks]


def _scheduler_keys(client) -> set[str]:
    """The keys of every task the scheduler holds now."""
    return set(client.run_on_scheduler(_keys))


def _nodes(result) -> dict[str, dict]:
    return {f"{n['node_name']}({n['node_id']})": n for n in result.get_all_node_results()}


# ---------------------------------------------------------------------- tests


def test_dependents_go_to_the_cluster_while_their_parent_runs(dask_ex, dask_cluster, dask_client,
                                                              tmp_path):
    other = ct.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address)
    e_gate = ct.electron(gate, executor=dask_ex)
    e_inc = ct.electron(inc, executor=dask_ex)
    e_other = ct.electron(inc, executor=other)  # another executor: must wait for the value
    local_inc = ct.electron(inc, executor="local")

    @ct.lattice
    def wf(directory):
        first = e_gate(directory)
        v = first
        for _ in range(5):
            v = e_inc(v)
        return v, e_other(first), local_inc(first)

    try:
        did = ct.dispatch(wf)(str(tmp_path))
        assert wait_until(lambda: (tmp_path / "started").exists(), 60), ct.get_result(did)
        # the five chained increments reach the scheduler while the gate still runs (it
        # waits for "release"; the dispatcher sends ready work in 20 ms slices, so the last
        # may come a moment after the gate started); the other executor's and the local
        # one do not
        def mine() -> set:
            return {k for k in _scheduler_keys(dask_client) if did in k}

        assert wait_until(lambda: len([k for k in mine() if k.startswith("inc-")]) == 5, 30), (
            mine())
        assert len([k for k in mine() if k.startswith("inc-")]) == 5, mine()
        nodes = _nodes(ct.get_result(did))
        waiting = {k: n["status"] for k, n in nodes.items() if k.startswith("inc")}
        assert set(waiting.values()) == {Status.NEW_OBJECT}, waiting
        _write(str(tmp_path / "release"), "")
        r = ct.get_result(did, wait=True, timeout=60)
    finally:
        other.shutdown()
    assert r.status == Status.COMPLETED, r.error
    assert r.result == (6, 2, 2)
    chain = [n for n in r.get_all_node_results() if n["node_name"] in ("gate", "inc")][:6]
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child["status"] == Status.COMPLETED and child["output"] == parent["output"] + 1
        # a chained task starts only after its parent ended (same machine clock)
        gap = (child["start_time"] - parent["end_time"]).total_seconds()
        assert gap >= -0.05, (parent, child)


def test_electrons_naming_the_executor_chain_on_its_shared_instance(dask_config, dask_client,
                                                                   tmp_path):
    e_gate = ct.electron(gate, executor="dask")
    e_inc = ct.electron(inc, executor="dask")

    @ct.lattice
    def wf(directory):
        return e_inc(e_inc(e_gate(directory)))

    did = ct.dispatch(wf)(str(tmp_path))
    assert wait_until(lambda: (tmp_path / "started").exists(), 60), ct.get_result(did)
    mine = {k for k in _scheduler_keys(dask_client) if did in k}
    assert len([k for k in mine if k.startswith("inc-")]) == 2, mine
    _write(str(tmp_path / "release"), "")
    r = ct.get_result(did, wait=True, timeout=60)
    assert r.status == Status.COMPLETED and r.result == 3, (r.status, r.error)


def test_failure_mid_chain_looks_as_without_chaining(dask_ex, tmp_path):
    """The same workflow on Dask (chained) and on Local (not) ends the same way, node for
    node, and nothing after the failure ran."""

    def build(ex, where):
        e_inc, e_boom, e_mark = (ct.electron(f, executor=ex) for f in (inc, boom, mark))

        @ct.lattice
        def wf(d):
            a = e_inc(1)
            b = e_boom(a)
            c = e_mark(b, os.path.join(d, "c"))
            return e_mark(c, os.path.join(d, "d"))

        (tmp_path / where).mkdir()
        return ct.get_result(ct.dispatch(wf)(str(tmp_path / where)), wait=True, timeout=60)

    seen = {}
    for where, ex in (("dask", dask_ex), ("local", "local")):
        r = build(ex, where)
        assert r.status == Status.FAILED, (where, r.status)
        assert not list((tmp_path / where).iterdir()), f"{where}: a node after the failure ran"
        seen[where] = [
            (n["node_name"], n["status"], n["cancel_outcome"], n["error"] and n["error"][:40])
            for n in r.get_all_node_results()
        ]
    assert seen["dask"] == seen["local"]
    assert [s[1] for s in seen["dask"] if s[0] == "mark"] == [Status.CANCELLED] * 2


def test_cancel_mid_chain_is_one_batch(dask_cluster, dask_client, tmp_path):
    """Cancel while the head of a 300-long chain runs: the head is killed, every chained
    task is dequeued, all in one cancel_many call (one broadcast to the workers)."""
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    e_sleep, e_mark = ct.electron(sleeper, executor=ex), ct.electron(mark, executor=ex)
    pid_file = str(tmp_path / "pid")

    @ct.lattice
    def wf(n):
        v = e_sleep(pid_file, 60)
        for i in range(n):
            v = e_mark(v, str(tmp_path / f"m{i}"))
        return v

    meter = valent.timing.enable()
    before = dict(meter.calls)
    try:
        did = ct.dispatch(wf)(300)
        assert wait_until(lambda: os.path.exists(pid_file), 60), ct.get_result(did)
        assert wait_until(
            lambda: sum(did in k for k in _scheduler_keys(dask_client)) == 301, 30
        ), "the chain did not reach the scheduler"
        pid = int(open(pid_file).read())
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
    finally:
        valent.timing.disable()
        ex.shutdown()
    assert r.status == Status.CANCELLED
    nodes = r.get_all_node_results()
    assert nodes[0]["cancel_outcome"] == CancelOutcome.KILLED.value
    outcomes = {n["cancel_outcome"] for n in nodes[1:] if n["node_name"] == "mark"}
    assert outcomes == {CancelOutcome.DEQUEUED.value}, outcomes
    assert not alive(pid)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("m")], "a dequeued task ran"

    def calls(hook):
        m, b = meter.calls.get(("dask", hook)), before.get(("dask", hook))
        return (m.count if m else 0) - (b.count if b else 0)

    assert calls("cancel_many") == 1 and calls("cancel") == 0, meter.report()


def test_a_retried_parent_hands_on_its_last_attempt(dask_ex, tmp_path):
    e_first = ct.electron(fails_first, executor=dask_ex, retries=1)
    e_inc = ct.electron(inc, executor=dask_ex)

    @ct.lattice
    def wf(path):
        return e_inc(e_inc(e_first(path)))

    r = ct.get_result(ct.dispatch(wf)(str(tmp_path / "count")), wait=True, timeout=60)
    assert r.status == Status.COMPLETED, r.error
    assert r.result == 22
    assert r.get_node_result(0)["attempts"] == 2


def test_a_timed_out_parent_stops_its_chain(dask_cluster, tmp_path):
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    e_sleep = ct.electron(sleeper, executor=ex, timeout=1.0)
    e_mark = ct.electron(mark, executor=ex)
    pid_file = str(tmp_path / "pid")

    @ct.lattice
    def wf():
        return e_mark(e_mark(e_sleep(pid_file, 60), str(tmp_path / "a")), str(tmp_path / "b"))

    try:
        r = ct.get_result(ct.dispatch(wf)(), wait=True, timeout=60)
    finally:
        ex.shutdown()
    assert r.status == Status.FAILED
    nodes = r.get_all_node_results()
    assert nodes[0]["status"] == Status.FAILED and "timed out" in nodes[0]["error"]
    assert [n["status"] for n in nodes if n["node_name"] == "mark"] == [Status.CANCELLED] * 2
    assert not alive(int(open(pid_file).read()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_worker_dying_under_a_chain_head_fails_it_and_stops_the_rest(
    dask_cluster, dask_client, allowed_failures, tmp_path
):
    allowed_failures(0)
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    e_sleep, e_mark = ct.electron(sleeper, executor=ex), ct.electron(mark, executor=ex)
    pid_file = str(tmp_path / "pid")

    @ct.lattice
    def wf():
        return e_mark(e_mark(e_sleep(pid_file, 60), str(tmp_path / "a")), str(tmp_path / "b"))

    try:
        did = ct.dispatch(wf)()
        assert wait_until(lambda: os.path.exists(pid_file), 60), ct.get_result(did)
        task_pid = int(open(pid_file).read())
        worker = psutil.Process(task_pid).ppid()  # kill mode: the body runs in a pool child
        assert worker in dask_client.run(os.getpid).values()
        os.kill(worker, signal.SIGKILL)
        r = ct.get_result(did, wait=True, timeout=90)
    finally:
        ex.shutdown()
    assert r.status == Status.FAILED
    nodes = r.get_all_node_results()
    assert nodes[0]["status"] == Status.FAILED and "died" in nodes[0]["error"], nodes[0]
    marks = [n for n in nodes if n["node_name"] == "mark"]
    assert [(n["status"], n["cancel_outcome"]) for n in marks] == [(Status.CANCELLED, None)] * 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert wait_until(lambda: not alive(task_pid), 10), "the task outlived its worker"


def test_a_long_chain_completes(dask_ex):
    """600 chained nodes: submitted and read back without recursion, in order."""
    e_inc = ct.electron(inc, executor=dask_ex)

    @ct.lattice
    def wf(n):
        v = 0
        for _ in range(n):
            v = e_inc(v)
        return v

    r = ct.get_result(ct.dispatch(wf)(600), wait=True, timeout=300)
    assert r.status == Status.COMPLETED, r.error
    assert r.result == 600
    outs = [n["output"] for n in r.get_all_node_results() if n["node_name"] == "inc"]
    assert outs == list(range(1, 601))
