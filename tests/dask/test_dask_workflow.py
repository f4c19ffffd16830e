"""Workflows with Dask electrons, through the public API: dispatch, get_result, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import valent as ct
from dask_support import alive, wait_until
from valent import CancelOutcome, Status
from valent.testing.procs import read_pids
from valent.testing.procs import write_atomic as _write


def _slow_body(seconds: float, pid_file: str, marker: str) -> str:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _write(pid_file, f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    child.kill()
    child.wait()
    _write(marker, "done")
    return f"slept {seconds}"


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_mixed_local_and_dask_workflow(dask_cluster, dask_client, dask_config):
    dask_exec = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="finish"
    )

    @ct.electron
    def double(x):
        return 2 * x

    @ct.electron(executor=dask_exec)
    def where_finish(x):
        return x + 1, os.getpid()

    @ct.electron(executor="dask")
    def where_kill(pair):
        return pair[0] * 10, os.getpid(), os.getppid()

    @ct.electron(executor="local")
    def total(a, b):
        return a + b[0]

    @ct.lattice
    def wf(x):
        d = double(x)
        f = where_finish(d)
        k = where_kill(f)
        return total(d, k)

    workers = set(dask_client.run(os.getpid).values())
    try:
        did = ct.dispatch(wf)(3)
        r = ct.get_result(did, wait=True, timeout=120)
    finally:
        dask_exec.shutdown()
    assert r.status == Status.COMPLETED, r
    assert r.result == 6 + 70
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["where_finish"]["executor"] == "dask"
    assert nodes["double"]["executor"] == "local"
    assert nodes["where_finish"]["output"][1] in workers  # finish mode: in the worker
    _, pid, ppid = nodes["where_kill"]["output"]
    assert pid not in workers and ppid in workers  # kill mode (by name, from config): a child
    for n in nodes.values():
        assert n["status"] == Status.COMPLETED and n["start_time"] and n["end_time"]


@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_cancel_dispatch_with_running_dask_tasks(mode, dask_cluster, dask_client, tmp_path):
    """Two tasks run (both workers), a third waits; cancel the dispatch."""
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode=mode, grace=0.5
    )
    seconds = 60 if mode == "kill" else 2

    @ct.electron(executor=ex)
    def slow(i, seconds):
        return _slow_body(seconds, str(tmp_path / f"pids{i}"), str(tmp_path / f"marker{i}"))

    @ct.lattice
    def wf(seconds):
        return [slow(i, seconds) for i in range(3)]

    try:
        did = ct.dispatch(wf)(seconds)
        running = []
        assert wait_until(
            lambda: sum(os.path.exists(tmp_path / f"pids{i}") for i in range(3)) >= 2, 30
        )
        for i in range(3):
            if os.path.exists(tmp_path / f"pids{i}"):
                running.append(i)
        pids = [p for i in running for p in read_pids(str(tmp_path / f"pids{i}"), 30)]
        t0 = time.monotonic()
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        ex.shutdown()
    assert r.status == Status.CANCELLED
    nodes = [n for n in r.get_all_node_results() if n["node_name"] == "slow"]
    outcomes = sorted(n["cancel_outcome"] for n in nodes)
    if mode == "kill":
        assert took < 20
        assert outcomes == ["dequeued", "killed", "killed"], outcomes
        for n in nodes:
            assert n["status"] == Status.CANCELLED and n["output"] is None
        assert not [p for p in pids if alive(p)], "a killed task or its subprocess survived"
        time.sleep(0.3)
        assert not any(os.path.exists(tmp_path / f"marker{i}") for i in range(3))
    else:
        assert outcomes == ["dequeued", "runs_to_completion", "runs_to_completion"], outcomes
        for n in nodes:
            if n["cancel_outcome"] == CancelOutcome.RUNS_TO_COMPLETION:
                assert n["status"] == Status.COMPLETED and n["output"] == "slept 2"
                assert n["end_time"] >= n["start_time"]
            else:
                assert n["status"] == Status.CANCELLED
        # get_result(wait=True) returned only after the running ones finished
        assert all((tmp_path / f"marker{i}").exists() for i in running)
    queued = [i for i in range(3) if i not in running]
    assert not (tmp_path / f"marker{queued[0]}").exists(), "a dequeued task ran"


def test_dask_task_error_fails_the_workflow(dask_cluster, dask_client):
    ex = ct.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address)

    @ct.electron(executor=ex)
    def bad(x):
        raise KeyError(f"missing {x}")

    @ct.electron(executor=ex)
    def after(x):
        return x

    @ct.lattice
    def wf(x):
        return after(bad(x))

    try:
        r = ct.get_result(ct.dispatch(wf)("k"), wait=True, timeout=60)
    finally:
        ex.shutdown()
    assert r.status == Status.FAILED
    bad_node, after_node = r.get_node_result(0), r.get_node_result(2)
    assert bad_node["node_name"] == "bad" and bad_node["status"] == Status.FAILED
    assert "missing k" in bad_node["error"] and "KeyError" in bad_node["traceback"]
    assert after_node["status"] == Status.CANCELLED


def _talker(directory: str) -> str:
    print("dask task says hi", flush=True)
    _write(os.path.join(directory, "started"), str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(directory, "release")):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.01)
    return "done"


def test_logs_show_a_running_kill_mode_task_output_so_far(dask_cluster, dask_client, tmp_path):
    """Kill mode on a cluster of this machine: `valent logs` reads the pool child's capture."""
    ex = ct.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="kill", grace=0.5
    )
    talker = ct.electron(_talker, executor=ex)

    @ct.lattice
    def wf(directory):
        return talker(directory)

    def logs(did):
        res = subprocess.run(
            [sys.executable, "-m", "valent.cli", "logs", did, "_talker"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ),
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    try:
        did = ct.dispatch(wf)(str(tmp_path))
        assert wait_until(lambda: (tmp_path / "started").exists(), 60), ct.get_result(did)
        assert wait_until(lambda: "(so far)" in logs(did), 30), logs(did)
        assert "dask task says hi" in logs(did)
        _write(str(tmp_path / "release"), "")
        r = ct.get_result(did, wait=True, timeout=60)
    finally:
        ex.shutdown()
    assert r.status == Status.COMPLETED and r.result == "done"
    out = logs(did)
    assert "[COMPLETED] stdout ==" in out and "dask task says hi" in out, out
