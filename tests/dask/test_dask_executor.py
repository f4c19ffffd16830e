"""DaskExecutor at the executor level: run / poll / cancel against a real cluster of
``dask scheduler`` / ``dask worker`` programs, and against clusters it starts itself."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import dask_tasks as T
import pytest
import valent
from dask_support import (
    Runner,
    alive,
    cluster_pids,
    descendants,
    wait_until,
)
from valent import CancelOutcome

MODES = ["kill", "finish"]


def _read_pids(path) -> list[int]:
    assert wait_until(lambda: os.path.exists(path), 30), "the task never started"
    with open(path) as f:
        return [int(x) for x in f.read().split()]


@pytest.fixture
def runner(request, kill_runner, finish_runner) -> Runner:
    return kill_runner if request.param == "kill" else finish_runner


# ------------------------------------------------------------------ plugin and settings


def test_plugin_import_is_lazy_and_registered():
    code = (
        "import sys, valent, valent_dask; "
        "assert valent.executors.DaskExecutor is valent_dask.DaskExecutor; "
        "from valent._plugins.manager import get_plugins; "
        "assert get_plugins().executor_class('dask') is valent_dask.DaskExecutor; "
        "bad = [m for m in ('dask', 'distributed') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_settings_validation_and_capabilities():
    DaskExecutor = valent.executors.DaskExecutor
    with pytest.raises(valent.ExecutorError, match="'kill', 'finish'"):
        DaskExecutor(cancel_mode="stop")
    kill = DaskExecutor(grace=0.25)
    assert kill.capabilities.stop_running and kill.capabilities.kill_tree
    assert kill.capabilities.grace == 0.25
    finish = DaskExecutor(cancel_mode="finish")
    assert finish.capabilities.cancel_pending
    assert not finish.capabilities.stop_running and not finish.capabilities.kill_tree
    assert set(DaskExecutor.settings()) >= {
        "scheduler_address", "n_workers", "threads_per_worker", "processes", "cancel_mode",
        "grace",
    }
    copy = cloudpickle.loads(cloudpickle.dumps(finish))
    assert copy.cancel_mode == "finish" and copy._conn is None
    # constructing one starts nothing
    assert kill._conn is None and kill._starting is None


def test_config_table_checked_against_settings():
    from valent.config import check_settings

    DaskExecutor = valent.executors.DaskExecutor
    check_settings(DaskExecutor, {"n_workers": 3, "cancel_mode": "finish"}, where="t")
    with pytest.raises(valent.ConfigError, match="cancel_mode"):
        check_settings(DaskExecutor, {"cancel_mode": "nope"}, where="t")
    with pytest.raises(valent.ConfigError, match="unknown key"):
        check_settings(DaskExecutor, {"workers": 3}, where="t")


# ------------------------------------------------------------------ values and errors


@pytest.mark.parametrize("runner", MODES, indirect=True)
def test_value_and_exception(runner):
    state = runner.call(T.add, 1, b=2)
    assert isinstance(state, valent.Completed)
    assert state.pickled is not None and state.get_value() == 3
    assert state.started_at and state.ended_at >= state.started_at

    state = runner.call(T.boom, "no good")
    assert isinstance(state, valent.Failed)
    assert isinstance(state.error, ValueError) and str(state.error) == "no good"
    assert "boom" in state.traceback and "ValueError: no good" in state.traceback


def test_kill_mode_captures_output_of_the_task_and_its_children(kill_runner):
    state = kill_runner.call(T.shout, "hello")
    assert state.get_value() == 5
    assert "hello\n" in state.stdout and "child says hello" in state.stdout
    assert "to stderr" in state.stderr


def test_where_the_body_runs(kill_runner, finish_runner, dask_client):
    workers = set(dask_client.run(os.getpid).values())
    pid, ppid = kill_runner.call(T.whoami).get_value()
    assert pid not in workers and ppid in workers, "kill mode: a child of the Dask worker"
    pid, _ = finish_runner.call(T.whoami).get_value()
    assert pid in workers, "finish mode: the Dask worker itself"


def test_unpicklable_argument_fails_the_task(kill_runner):
    state = kill_runner.call(T.add, threading.Lock())
    assert isinstance(state, valent.Failed)
    assert isinstance(state.error, valent.PicklingError)


def test_cancel_after_completion_is_too_late(kill_runner):
    h, w = kill_runner.start(T.add, 2, 2)
    assert kill_runner.wait(h, w).get_value() == 4
    assert kill_runner.executor.cancel(h) == CancelOutcome.TOO_LATE


def test_values_of_a_burst_come_back_while_another_task_still_runs(kill_runner, tmp_path):
    """The fetcher waits for the rest of a burst before its next gather, but never for a task
    that is still running: a burst's values arrive while a long task runs on."""
    long_h, long_w = kill_runner.start(
        T.sleep_then_mark, 120, str(tmp_path / "pids"), str(tmp_path / "m")
    )
    _read_pids(str(tmp_path / "pids"))
    burst = [kill_runner.start(T.add, i, 1) for i in range(40)]
    for i, (h, w) in enumerate(burst):
        assert kill_runner.wait(h, w, timeout=60).get_value() == i + 1
    assert not kill_runner.executor.poll(long_h).final
    assert kill_runner.executor.cancel(long_h) == CancelOutcome.KILLED
    assert isinstance(kill_runner.wait(long_h, long_w), valent.Cancelled)


# ------------------------------------------------------------------ cancelling


@pytest.mark.parametrize("runner", MODES, indirect=True)
def test_cancel_pending_task_is_dequeued(runner, tmp_path):
    """Both workers busy; a third task waits; cancelling it dequeues it for good."""
    busy_for = 30 if runner.executor.cancel_mode == "kill" else 2
    busy = [
        runner.start(T.sleep_then_mark, busy_for, str(tmp_path / f"b{i}"), str(tmp_path / f"m{i}"))
        for i in range(2)
    ]
    for i in range(2):
        _read_pids(str(tmp_path / f"b{i}"))
    marker = tmp_path / "queued-marker"
    h, w = runner.start(T.sleep_then_mark, 0, str(tmp_path / "q"), str(marker))
    got = runner.executor.cancel(h)
    assert got == CancelOutcome.DEQUEUED, (runner.executor.poll(h), h.future)
    state = runner.executor.poll(h)
    assert state == valent.Cancelled(CancelOutcome.DEQUEUED, ended_at=state.ended_at)
    assert runner.executor.cancel(h) == CancelOutcome.DEQUEUED  # idempotent
    expected = CancelOutcome.KILLED if busy_for == 30 else CancelOutcome.RUNS_TO_COMPLETION
    for bh, _ in busy:
        assert runner.executor.cancel(bh) == expected
    for bh, bw in busy:
        runner.wait(bh, bw)
    time.sleep(0.5)
    assert not marker.exists() and not (tmp_path / "q").exists(), "a dequeued task ran"


def test_kill_takes_the_task_and_its_subprocess(kill_runner, tmp_path):
    marker = tmp_path / "marker"
    h, w = kill_runner.start(T.sleep_then_mark, 30, str(tmp_path / "pids"), str(marker), True)
    pids = _read_pids(str(tmp_path / "pids"))
    assert len(pids) == 2 and all(alive(p) for p in pids)
    t0 = time.monotonic()
    assert kill_runner.executor.cancel(h) == CancelOutcome.KILLED
    assert time.monotonic() - t0 < 2.5, "cancel() must not block"
    assert kill_runner.executor.cancel(h) == CancelOutcome.KILLED  # idempotent
    state = kill_runner.wait(h, w, timeout=10)
    assert isinstance(state, valent.Cancelled) and state.outcome == CancelOutcome.KILLED
    assert not [p for p in pids if alive(p)], "the task or its subprocess survived"
    time.sleep(0.3)
    assert not marker.exists()


def test_a_task_that_does_not_cooperate_dies_at_sigterm(dask_cluster, dask_client, tmp_path):
    """The grace is only for tasks that watch cancel_requested(); others stop at once."""
    ex = valent.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address, grace=5)
    r = Runner(ex)
    try:
        h, w = r.start(T.sleep_then_mark, 60, str(tmp_path / "pids"), str(tmp_path / "m"))
        (pid,) = _read_pids(str(tmp_path / "pids"))
        t0 = time.monotonic()
        assert ex.cancel(h) == CancelOutcome.KILLED
        assert r.wait(h, w, timeout=20).outcome == CancelOutcome.KILLED
        assert time.monotonic() - t0 < 2.5, "the kill waited for the grace period"
        assert not alive(pid)
    finally:
        ex.shutdown()


def test_worker_is_free_at_once_after_a_kill(kill_runner, dask_client, tmp_path):
    busy = [
        kill_runner.start(T.sleep_then_mark, 60, str(tmp_path / f"b{i}"), str(tmp_path / f"m{i}"))
        for i in range(2)
    ]
    child_pids = [_read_pids(str(tmp_path / f"b{i}"))[0] for i in range(2)]
    nxt, nw = kill_runner.start(T.whoami)
    time.sleep(0.2)
    assert not kill_runner.executor.poll(nxt).final, "both workers should be busy"
    t0 = time.monotonic()
    for bh, _ in busy:
        assert kill_runner.executor.cancel(bh) == CancelOutcome.KILLED
    state = kill_runner.wait(nxt, nw, timeout=20)
    assert isinstance(state, valent.Completed)
    assert time.monotonic() - t0 < 10, "the next task waited for the killed one"
    pid, _ = state.get_value()
    assert pid not in child_pids, "a killed pool process was reused"
    for bh, bw in busy:
        assert kill_runner.wait(bh, bw).outcome == CancelOutcome.KILLED
    assert not [p for p in child_pids if alive(p)]


@pytest.mark.parametrize("runner", MODES, indirect=True)
def test_running_is_reported_once_the_body_starts(runner, tmp_path):
    t0 = time.time()
    h, w = runner.start(T.sleep_then_mark, 1.5, str(tmp_path / "pids"), str(tmp_path / "m"))
    assert wait_until(lambda: isinstance(runner.executor.poll(h), valent.Running), 10, 0.02)
    assert w.is_set(), "the executor woke the dispatcher when the task started"
    started = runner.executor.poll(h).started_at
    assert started is not None and t0 - 1 <= started <= time.time()
    state = runner.wait(h, w)
    assert isinstance(state, valent.Completed) and abs(state.started_at - started) < 0.5


def test_finish_mode_runs_to_completion(finish_runner, tmp_path):
    marker = tmp_path / "marker"
    h, w = finish_runner.start(T.sleep_then_mark, 1.5, str(tmp_path / "pids"), str(marker))
    _read_pids(str(tmp_path / "pids"))
    assert finish_runner.executor.cancel(h) == CancelOutcome.RUNS_TO_COMPLETION
    assert isinstance(finish_runner.executor.poll(h), valent.Running)
    state = finish_runner.wait(h, w)
    assert isinstance(state, valent.Completed) and state.get_value() == "slept"
    assert marker.read_text() == "done"


def test_cancel_requested_in_kill_mode(kill_runner, tmp_path):
    marker = tmp_path / "marker"
    h, w = kill_runner.start(T.cooperative_mark, 60, str(tmp_path / "pid"), str(marker))
    (pid,) = _read_pids(str(tmp_path / "pid"))
    assert kill_runner.executor.cancel(h) == CancelOutcome.KILLED
    state = kill_runner.wait(h, w, timeout=10)
    assert isinstance(state, valent.Cancelled) and state.outcome == CancelOutcome.KILLED
    assert marker.read_text() == "stopped-cooperatively"
    assert not alive(pid)


def test_cancel_requested_in_finish_mode(finish_runner, tmp_path):
    h, w = finish_runner.start(T.cooperative, 60, str(tmp_path / "pid"))
    _read_pids(str(tmp_path / "pid"))
    assert finish_runner.executor.cancel(h) == CancelOutcome.RUNS_TO_COMPLETION
    state = finish_runner.wait(h, w, timeout=10)
    assert isinstance(state, valent.Completed)
    assert state.get_value() == "stopped-cooperatively"
    assert finish_runner.call(T.cooperative, 0.05, str(tmp_path / "pid2")).get_value() == "ran-out"


# ------------------------------------------------------------------ clusters and workers


def test_external_scheduler_is_never_closed(dask_cluster, dask_client, tmp_path):
    workers = set(dask_client.run(os.getpid).values())
    ex = valent.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address)
    r = Runner(ex)
    assert r.call(T.add, 20, 22).get_value() == 42
    h, w = r.start(T.sleep_then_mark, 60, str(tmp_path / "pids"), str(tmp_path / "m"), True)
    pids = _read_pids(str(tmp_path / "pids"))
    ex.shutdown()  # kills what it still runs, closes its client, leaves the cluster up
    assert wait_until(lambda: not [p for p in pids if alive(p)], 10)
    assert set(dask_client.run(os.getpid).values()) == workers
    assert dask_client.submit(operator.add, 1, 2, pure=False).result(timeout=30) == 3
    state = ex.poll(h)
    assert not state.final or isinstance(state, valent.Cancelled)
    assert r.call(T.add, 1, 1).get_value() == 2, "a shut-down executor connects again"
    ex.shutdown()


def test_own_local_cluster_started_lazily_and_closed():
    before = set(descendants())
    ex = valent.executors.DaskExecutor(n_workers=1)
    assert set(descendants()) == before, "nothing starts before the first task"
    r = Runner(ex)
    h, w = r.start(T.whoami)
    assert not ex.poll(h).final  # run() returned while the cluster was still starting
    state = r.wait(h, w, timeout=60)
    assert isinstance(state, valent.Completed), f"{state!r} caused by {state.error.__cause__!r}"
    pid, worker_pid = state.get_value()
    started = set(descendants()) - before
    assert worker_pid in started and pid in started
    ex.shutdown()
    assert wait_until(lambda: not set(descendants()) - before, 20, 0.1), (
        f"left behind: {set(descendants()) - before}"
    )


EXIT_SCRIPT = """
import os, threading, sys
import valent

def body():
    return os.getpid(), os.getppid()

if __name__ == "__main__":
    ex = valent.executors.DaskExecutor(n_workers=1)
    woke = threading.Event()
    h = ex.run(valent.Task("exit", 1, "body", body), woke.set)
    while not ex.poll(h).final:
        woke.wait(1); woke.clear()
    print(*ex.poll(h).get_value(), flush=True)
    # no shutdown(): the interpreter's exit must close the cluster it started
"""


def test_own_cluster_closed_at_interpreter_exit(tmp_path):
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    child, worker = int(out[0]), int(out[1])
    assert wait_until(lambda: not alive(child) and not alive(worker), 20, 0.1), (
        "the own cluster's worker or its warm child outlived the process"
    )


def test_worker_killed_mid_task_fails_the_node(
    kill_runner, dask_client, allowed_failures, tmp_path
):
    allowed_failures(0)
    path = str(tmp_path / "attempts")
    h, w = kill_runner.start(T.count_attempts_and_sleep, path, 60)
    assert wait_until(lambda: os.path.exists(path), 30)
    child, worker = (int(x) for x in open(path).read().split())
    assert worker in dask_client.run(os.getpid).values()  # the PID comes from the cluster
    os.kill(worker, signal.SIGKILL)
    state = kill_runner.wait(h, w, timeout=60)
    assert isinstance(state, valent.Failed)
    assert isinstance(state.error, valent.WorkerDiedError)
    assert "died" in str(state.error)
    assert wait_until(lambda: not alive(child), 10), "the task outlived its worker"


@pytest.mark.parametrize("runner", MODES, indirect=True)
def test_worker_death_is_retried_per_dask_policy(runner, allowed_failures, tmp_path):
    allowed_failures(1)
    path = str(tmp_path / "attempts")
    state = runner.call(T.kill_my_worker_once, path, runner.executor.cancel_mode == "kill",
                        timeout=90)
    assert isinstance(state, valent.Completed) and state.get_value() == 2


def test_pool_children_are_accounted_for(kill_runner, dask_client):
    kill_runner.call(T.noop)
    pids = cluster_pids(dask_client)
    assert len(pids) >= 3  # 2 workers + at least one warm pool child
