"""DaskExecutor batching: a deep queue of independent tasks goes out as fewer Dask tasks, each
running several valent tasks, and every task keeps its own state, value and truthful cancel
outcome (a task of a batch that had not started when the cancel came is ``dequeued`` and
never runs). Real cluster (``dask scheduler`` and two ``dask worker`` programs)."""

from __future__ import annotations

import contextlib
import os
import time

import dask_tasks as T
import pytest
import valent
from dask_support import alive, wait_until
from valent import CancelOutcome


@contextlib.contextmanager
def one_burst(runner):
    """Every task started inside goes to Dask in one submission: the executor's submitter
    waits for the submit lock, held here (the way a dispatcher's burst of ready tasks
    arrives faster than one graph update is sent)."""
    runner.call(T.noop)  # connected: the burst goes to the submitter, not to the start thread
    ex = runner.executor
    before = set(ex._live)
    with ex._submit_lock:
        yield
    ex._conn.kick()
    with ex._lock:
        mine = [h for k, h in ex._live.items() if k not in before]
    assert wait_until(lambda: all(h.future is not None or h.state.final for h in mine), 30)


def batched(handles) -> list:
    """The handles that went out in a batch of more than one task."""
    return [h for h in handles if h.batch is not None and len(h.batch) > 1]


def idle(client) -> bool:
    """No task of anyone is processing or waiting on the cluster, and no worker thread still
    runs one (a task the scheduler let go of may still run there)."""

    def busy(dask_worker) -> int:
        from valent_dask import worker_side

        return len(dask_worker.state.executing) + len(worker_side._running)

    if any(client.run(busy).values()):
        return False
    return not any(client.processing().values()) and not client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.queued)
    )


def ran(folder) -> set[int]:
    return {int(name) for name in os.listdir(folder) if name.isdigit()}


@pytest.mark.parametrize("mode", ["finish", "kill"])
def test_cancel_inside_a_running_batch(mode, finish_runner, kill_runner, dask_client, tmp_path):
    """Cancel every task while batches run: a task whose turn had not come is ``dequeued`` and
    never runs (the files its body writes are counted after the cluster is idle); one that
    ran says so (finish mode: ``runs_to_completion``, output kept; kill mode: ``killed``, its
    process gone)."""
    runner = finish_runner if mode == "finish" else kill_runner
    ex = runner.executor
    folder = tmp_path / "ran"
    folder.mkdir()
    n = 48
    with one_burst(runner):
        started = [runner.start(T.mark_and_wait, str(folder), i, 60) for i in range(n)]
    handles = [h for h, _ in started]
    assert len(batched(handles)) > n // 2, "a deep queue went out in batches"
    assert wait_until(lambda: ran(folder), 30), "no task started"
    outcomes = ex.cancel_many(handles)
    states = [runner.wait(h, w, timeout=60) for h, w in started]
    assert wait_until(lambda: idle(dask_client), 60), "the cluster is still busy"
    time.sleep(0.3)
    did_run = ran(folder)
    running = CancelOutcome.RUNS_TO_COMPLETION if mode == "finish" else CancelOutcome.KILLED
    for i, (outcome, state) in enumerate(zip(outcomes, states, strict=True)):
        if outcome is CancelOutcome.DEQUEUED:
            assert i not in did_run, f"task {i} ran after its cancel answered dequeued"
            assert state == valent.Cancelled(CancelOutcome.DEQUEUED, ended_at=state.ended_at)
            continue
        assert i in did_run, (i, outcome, state)
        assert outcome is running, (i, outcome, state)
        assert state.started_at is not None
        if mode == "finish":  # it saw cancel_requested() and returned: its output is kept
            assert isinstance(state, valent.Completed) and state.get_value() == i
        else:
            assert state == valent.Cancelled(
                CancelOutcome.KILLED, state.started_at, state.ended_at, state.stdout,
                state.stderr,
            )
            pid = int((folder / str(i)).read_text())
            assert not alive(pid), f"task {i}'s process outlived Cancelled(killed)"
    # a batch that was running had both: a task that ran and one dequeued behind it
    mixed = [
        h for h in batched(handles)
        if any(outcomes[handles.index(m)] is running for m in h.batch)
        and any(outcomes[handles.index(m)] is CancelOutcome.DEQUEUED for m in h.batch)
    ]
    assert mixed, "no cancel landed inside a running batch"
    assert len(did_run) < n


@pytest.mark.parametrize("mode", ["finish", "kill"])
def test_one_failure_in_a_batch_is_its_own(mode, finish_runner, kill_runner):
    runner = finish_runner if mode == "finish" else kill_runner
    n = 40
    with one_burst(runner):
        started = [runner.start(T.fail_some, i) for i in range(n)]
    assert batched([h for h, _ in started])
    for i, (h, w) in enumerate(started):
        state = runner.wait(h, w, timeout=60)
        if i % 5 == 3:
            assert isinstance(state, valent.Failed), (i, state)
            assert isinstance(state.error, ValueError) and str(state.error) == f"task {i} fails"
            assert "fail_some" in state.traceback
        else:
            assert isinstance(state, valent.Completed) and state.get_value() == i, (i, state)
        assert state.started_at is not None and state.ended_at >= state.started_at


@pytest.mark.parametrize("mode", ["finish", "kill"])
def test_shallow_queue_is_not_batched(mode, finish_runner, kill_runner):
    """At most BATCH_DEPTH tasks per worker thread waiting: each keeps its own Dask task
    (long tasks must not queue behind each other on one thread)."""
    from valent_dask.executor import BATCH_DEPTH

    runner = finish_runner if mode == "finish" else kill_runner
    n = BATCH_DEPTH * 2  # the session cluster has two worker threads
    with one_burst(runner):
        started = [runner.start(T.add, i, 1) for i in range(n)]
    for i, (h, w) in enumerate(started):
        assert runner.wait(h, w).get_value() == i + 1
        assert h.batch is None


def test_batching_off(dask_cluster, dask_client):
    from dask_support import Runner

    ex = valent.executors.DaskExecutor(
        scheduler_address=dask_cluster.scheduler_address, cancel_mode="finish", batching=False
    )
    try:
        runner = Runner(ex)
        with one_burst(runner):
            started = [runner.start(T.add, i, 1) for i in range(40)]
        for i, (h, w) in enumerate(started):
            assert runner.wait(h, w).get_value() == i + 1
            assert h.batch is None
    finally:
        ex.shutdown()
    with pytest.raises(valent.ExecutorError, match="batching"):
        valent.executors.DaskExecutor(batching="yes")


@pytest.mark.parametrize("mode", ["finish", "kill"])
def test_chained_task_gets_its_upstream_value_out_of_a_batch(mode, finish_runner, kill_runner):
    runner = finish_runner if mode == "finish" else kill_runner
    n = 40
    with one_burst(runner):
        started = [runner.start(T.add, i, 1000) for i in range(n)]
        chained = [
            runner.start(T.add, valent.Upstream(started[k][0], k), 1) for k in (0, 17, 39)
        ]
    assert batched([h for h, _ in started])
    for k, (h, w) in zip((0, 17, 39), chained, strict=True):
        assert runner.wait(h, w, timeout=60).get_value() == k + 1001
    for i, (h, w) in enumerate(started):
        assert runner.wait(h, w).get_value() == i + 1000


@pytest.fixture
def chaos_executors(dask_cluster, dask_client):  # noqa: ARG001 - dask_client arms the stray check
    from valent_dask import DaskExecutor

    made = {
        "dask-kill": DaskExecutor(scheduler_address=dask_cluster.scheduler_address,
                                  cancel_mode="kill", grace=0.5),
        "dask-finish": DaskExecutor(scheduler_address=dask_cluster.scheduler_address,
                                    cancel_mode="finish"),
    }
    yield made
    for ex in made.values():
        ex.shutdown()


def test_cancel_at_any_moment_in_batches(chaos_executors, dask_client, tmp_path, monkeypatch):
    """Dispatched fan-outs deep enough to batch, cancelled (whole or in part) at random
    moments: every invariant of tests/chaos.py holds, and once the cluster is idle no task
    reported ``dequeued`` (or never started) has a start file."""
    import random

    import chaos
    import cloudpickle
    import valent as ct
    from chaos import Plan, run_and_check

    cloudpickle.register_pickle_by_value(chaos)
    sent = []
    for ex in chaos_executors.values():
        real = ex._send_batches

        def spy(conn, batch, sizes, real=real):  # counts batches; the real method runs
            sent.append(len(sizes))
            return real(conn, batch, sizes)

        monkeypatch.setattr(ex, "_send_batches", spy)
    for seed in range(int(os.environ.get("VALENT_CHAOS_DASK_BATCH_RUNS", "8"))):
        rnd = random.Random(30_000 + seed)
        n = rnd.randint(24, 48)
        name = ("dask-kill", "dask-finish")[seed % 2]
        cancel_ids = None
        if seed % 4 >= 2:
            cancel_ids = sorted(rnd.sample(range(n), k=n // 3))
        plan = Plan(
            seed, "fan", [rnd.choice([0.0, 0.02, 0.1]) for _ in range(n)], [[]] * n,
            [name] * n, rnd.choice([0.0, 0.05, 0.15, 0.3]), cancel_ids,
        )
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        result = run_and_check(plan, str(folder), chaos_executors)
        assert wait_until(lambda: idle(dask_client), 60)
        time.sleep(0.2)
        starts = [f for f in os.listdir(folder) if f.endswith(".start")]
        started = _started_nodes(starts, result)
        for node in result.get_all_node_results():
            if node["node_name"] != "chaos_task" or node["status"] != ct.Status.CANCELLED:
                continue
            if node["cancel_outcome"] == "dequeued" or node["reason"] == "upstream":
                assert node["node_id"] not in started, (
                    f"seed {seed}: node {node['node_id']} started after its cancel said dequeued"
                )
    assert sent, "no burst went out in batches"


def _started_nodes(start_files: list[str], result) -> set[int]:
    """Node ids of the chaos tasks whose start file exists (tag ``t<i>`` is the i-th task,
    node ids follow creation order: task i is the i-th ``chaos_task`` node)."""
    ids = [n["node_id"] for n in result.get_all_node_results() if n["node_name"] == "chaos_task"]
    return {ids[int(f[1:-len(".start")])] for f in start_files}


@pytest.mark.parametrize("mode", ["finish", "kill"])
@pytest.mark.parametrize("retries", [0, 1])
def test_worker_lost_mid_batch(mode, retries, finish_runner, kill_runner, allowed_failures,
                               tmp_path):
    """The first task of a batch SIGKILLs its Dask worker (once). With a retry allowed, Dask
    runs the batch again elsewhere and every task reports its own value; with none, the
    batch's tasks (and those of a batch queued on that worker, whose bodies never started)
    end Failed(WorkerDiedError) naming their batch; the other tasks of the burst complete."""
    runner = finish_runner if mode == "finish" else kill_runner
    allowed_failures(retries)
    path = str(tmp_path / "attempts")
    n = 40
    with one_burst(runner):
        first = runner.start(T.kill_my_worker_once, path, mode == "kill")
        rest = [runner.start(T.add, i, 1) for i in range(1, n)]
    assert first[0].batch is not None and len(first[0].batch) > 1
    lost = {id(h) for h in first[0].batch}
    state = runner.wait(*first, timeout=90)
    if retries:
        assert isinstance(state, valent.Completed) and state.get_value() == 2
    else:
        assert isinstance(state, valent.Failed), state
        assert isinstance(state.error, valent.WorkerDiedError)
        assert "batch of" in str(state.error)
    completed = 0
    for i, (h, w) in enumerate(rest, start=1):
        state = runner.wait(h, w, timeout=90)
        if isinstance(state, valent.Completed):
            assert state.get_value() == i + 1, (i, state)
            completed += 1
            continue
        # without retries, Dask also gives up on what was queued on that worker (the next
        # batch it was given): those never started, and their error names their batch
        assert not retries, (i, state)
        assert isinstance(state, valent.Failed), (i, state)
        assert isinstance(state.error, valent.WorkerDiedError) and "batch of" in str(state.error)
        assert id(h) in lost or state.started_at is None, (i, state)
    assert completed == n - 1 if retries else completed >= n // 2, completed


OWNER_OF_A_BATCH = """
import os, sys, time
import valent as ct

ex = ct.executors.DaskExecutor(scheduler_address=sys.argv[1], cancel_mode=sys.argv[2])

@ct.electron(executor=ex)
def wait_here(folder, i):
    with open(os.path.join(folder, f"{i}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, f"{i}.tmp"), os.path.join(folder, str(i)))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ct.cancel_requested():
        time.sleep(0.01)
    return i

@ct.lattice
def flow(folder):
    return [wait_here(folder, i) for i in range(40)]

ct.dispatch(flow)(sys.argv[3])
time.sleep(300)
"""


@pytest.mark.parametrize("mode", ["finish", "kill"])
def test_batch_stops_with_its_owner(mode, dask_cluster, dask_client, tmp_path):
    """The dispatching process is killed (-9) while batches of its tasks run on a cluster it
    does not own: the running task stops (kill mode: its process is gone; finish mode: it
    sees cancel_requested()) and no task of the batches starts after that."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "owner.py"
    script.write_text(OWNER_OF_A_BATCH)
    folder = tmp_path / "ran"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VALENT_CONFIG"}
    env["VALENT_RESULTS_DIR"] = str(tmp_path / "results")
    owner = subprocess.Popen(
        [sys.executable, str(script), dask_cluster.scheduler_address, mode, str(folder)],
        env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: len(ran(folder)) >= 2, 60), "the tasks never started"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert wait_until(lambda: idle(dask_client), 60), "the owner's tasks still run"
    at_idle = ran(folder)
    time.sleep(1.0)
    assert ran(folder) == at_idle and len(at_idle) < 40, sorted(ran(folder))
    for i in at_idle:
        pid = int((folder / str(i)).read_text())
        if mode == "kill":
            assert wait_until(lambda pid=pid: not alive(pid), 10), f"task {i} outlived its owner"
