"""A batched task answered ``dequeued`` while its batch had not started anywhere never runs,
whichever worker runs the batch and however late: a worker that joined after the cancel,
after newer tombstones pushed the cancel's out of the workers' memory (MAX_REMEMBERED), or
after they aged out (TOMBSTONE_TTL). Real cluster of its own (``dask scheduler`` and
``dask worker`` programs), one worker thread, so that a long task keeps the batches queued
on the scheduler; a second worker is started (and ended by PID) where a test needs one."""

from __future__ import annotations

import os

import dask_tasks as T
import pytest
import valent
from dask_support import DaskPrograms, Runner, descendants, new_processes, wait_until
from valent import CancelOutcome

N = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One ``dask worker --nthreads 1``; the scheduler sends a queued task to a worker only
    when it has a free thread (worker-saturation 1.0), so queued batches stay queued while
    the thread is busy, and a worker that joins takes them."""
    before = set(descendants())
    env = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
    programs = DaskPrograms(str(tmp_path_factory.mktemp("dask-truth")), n_workers=1, env=env)
    try:
        yield programs
    finally:
        programs.stop()
    assert wait_until(lambda: not new_processes(before), 20, 0.1), (
        f"processes left: {[p.pid for p in new_processes(before)]}")


@pytest.fixture(params=["finish", "kill"])
def setup(request, cluster, tmp_path):
    """A DaskExecutor of the mode, a runner, a client of the cluster, and a folder that the
    tasks mark when their body runs. The workers' tombstone limits are restored after."""
    ex = valent.executors.DaskExecutor(
        scheduler_address=cluster.scheduler_address, cancel_mode=request.param, grace=0.5
    )
    client = cluster.client()
    limits = client.run(_limits)
    folder = tmp_path / "ran"
    folder.mkdir()
    try:
        yield ex, Runner(ex), client, folder
    finally:
        ex.shutdown()
        for addr, (most, ttl) in limits.items():
            try:
                client.run(_set_limits, most, ttl, workers=[addr])
            except Exception:  # noqa: BLE001 - that worker is gone (a test ended it)
                pass
        client.close()


def _limits():
    from valent_dask import worker_side

    return worker_side.MAX_REMEMBERED, worker_side.TOMBSTONE_TTL


def _set_limits(most, ttl):
    from valent_dask import worker_side

    worker_side.MAX_REMEMBERED, worker_side.TOMBSTONE_TTL = most, ttl


def ran(folder) -> set[int]:
    return {int(name) for name in os.listdir(folder) if name.isdigit()}


def burst_behind_a_long_task(ex, runner, folder):
    """A long task holds the only worker thread; then a burst of N quick tasks goes out in
    one submission, sent to Dask (in batches when the queue is deep) and waiting there.
    Returns the long task, the burst and its handles."""
    long = runner.start(T.mark_and_wait, str(folder), 1000, 300)
    assert wait_until(lambda: 1000 in ran(folder), 60), "the long task did not start"
    with ex._submit_lock:  # one submission: the whole burst
        burst = [runner.start(T.mark_and_wait, str(folder), i, 0) for i in range(N)]
    ex._conn.kick()
    handles = [h for h, _ in burst]
    assert wait_until(lambda: all(h.future is not None for h in handles), 30)
    return long, burst, handles


def queue_behind_a_long_task(ex, runner, folder):
    """A long task holds the only worker thread; then a burst of N quick tasks goes out in
    batches, which wait on the scheduler. Cancel every other task of each batch of more
    than one: they answer ``dequeued`` (tombstoned on the one worker). Returns the long
    task, the burst, and the indexes cancelled."""
    long, burst, handles = burst_behind_a_long_task(ex, runner, folder)
    assert any(h.batch is not None and len(h.batch) > 1 for h in handles), "not batched"
    cut = [i for i, h in enumerate(handles) if h.batch is not None and len(h.batch) > 1
           and h.index % 2 == 1]
    outcomes = ex.cancel_many([handles[i] for i in cut])
    assert outcomes == [CancelOutcome.DEQUEUED] * len(cut), outcomes
    assert ran(folder) == {1000}, "a task of the burst started behind the long one"
    return long, burst, cut


def check(runner, folder, burst, cut):
    """Every task not cancelled ran and returned its index; no cancelled one ever ran."""
    for i, (h, w) in enumerate(burst):
        state = runner.wait(h, w, timeout=90)
        if i in cut:
            assert state == valent.Cancelled(CancelOutcome.DEQUEUED, ended_at=state.ended_at)
        else:
            assert isinstance(state, valent.Completed) and state.get_value() == i, (i, state)
    assert not ran(folder) & set(cut), (
        f"tasks {sorted(ran(folder) & set(cut))} ran after their cancel said dequeued"
    )
    assert ran(folder) >= set(range(N)) - set(cut)


def test_worker_that_joins_after_the_cancel(setup, cluster):
    """(a) The batches wait; a cancel stops some of their tasks; a worker started after the
    cancel (no tombstone there) takes the batches: the stopped tasks never run there."""
    ex, runner, client, folder = setup
    long, burst, cut = queue_behind_a_long_task(ex, runner, folder)
    new = cluster.start_worker()
    try:
        client.wait_for_workers(2, timeout=60)
        check(runner, folder, burst, cut)
    finally:
        ex.cancel(long[0])
        runner.wait(*long, timeout=60)
        from dask_support import end_pids

        end_pids([new.pid, *_children(new.pid)])
        new.wait(30)
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, 30)


def test_tombstones_pushed_out(setup):
    """(b) After the cancel, more than MAX_REMEMBERED newer tombstones (other cancels) push
    the cancel's out of the worker's memory before the batches start there."""
    ex, runner, client, folder = setup
    long, burst, cut = queue_behind_a_long_task(ex, runner, folder)
    client.run(_set_limits, 10, 3600.0)
    from valent_dask import worker_side

    client.run(worker_side.cancel_keys, [f"other-{i}" for i in range(30)])
    ex.cancel(long[0])  # its broadcast prunes the tombstones; the thread frees
    runner.wait(*long, timeout=60)
    check(runner, folder, burst, cut)


def test_tombstones_aged_out(setup):
    """(c) The batches wait longer than TOMBSTONE_TTL: the cancel's tombstones are gone when
    the batches start (pruned at the next cancel, here the long task's)."""
    import time

    ex, runner, client, folder = setup
    long, burst, cut = queue_behind_a_long_task(ex, runner, folder)
    client.run(_set_limits, 10_000, 0.2)
    time.sleep(0.5)
    ex.cancel(long[0])
    runner.wait(*long, timeout=60)
    check(runner, folder, burst, cut)


def test_batch_run_again_after_its_worker_died(setup, cluster):
    """A batch runs; a cancel stops a task of it that has not had its turn (the worker holds
    it stopped: ``dequeued``); then the worker process dies (SIGKILL; its nanny starts a new
    one, which has no memory of the cancel) and Dask runs the batch again there: the stopped
    task still never runs, the others do."""
    import signal

    ex, runner, client, folder = setup
    runner.call(T.noop)  # connected: the burst goes out in one submission
    with ex._submit_lock:
        burst = [runner.start(T.mark_and_wait, str(folder), i, 300 if i == 0 else 0)
                 for i in range(N)]
    ex._conn.kick()
    handles = [h for h, _ in burst]
    assert wait_until(lambda: 0 in ran(folder), 60), "the first task did not start"
    first = handles[0].batch
    assert first is not None and len(first) > 2, "the first task is not in a batch"
    cut = [handles.index(first[1])]
    assert ex.cancel_many([handles[i] for i in cut]) == [CancelOutcome.DEQUEUED]
    (pid,) = client.run(os.getpid).values()
    os.remove(folder / "0")
    os.kill(pid, signal.SIGKILL)
    # Dask runs the batch again on the new worker process: its first task starts again
    assert wait_until(lambda: 0 in ran(folder), 90), "the batch did not run again"
    assert ex.cancel(handles[0]) in (CancelOutcome.RUNS_TO_COMPLETION, CancelOutcome.KILLED)
    cut.append(0)
    for i, (h, w) in enumerate(burst):
        state = runner.wait(h, w, timeout=90)
        if i not in cut:
            assert isinstance(state, valent.Completed) and state.get_value() == i, (i, state)
    assert cut[0] not in ran(folder), "the stopped task ran when Dask ran its batch again"
    assert ran(folder) >= set(range(N)) - set(cut)
    client.wait_for_workers(1, timeout=60)


def test_no_record_no_dequeued(setup, monkeypatch):
    """A cancel that cannot install its record does not promise ``dequeued`` for a task of a
    batch that has not started (only the workers' tombstones would stop it): it answers
    ``failed``; asked again once the record can be installed, ``dequeued``, and it never
    runs. The scheduler refusing the record is faked (a fault a live cluster does not give
    on demand while it still answers the broadcast); the cluster is real."""
    ex, runner, client, folder = setup
    long, burst, handles = burst_behind_a_long_task(ex, runner, folder)
    i = next(i for i, h in enumerate(handles) if h.batch is not None and h.index == 1)

    def refuse(*args, **kwargs):
        raise OSError("the scheduler is unreachable (fake)")

    monkeypatch.setattr(ex._conn.client, "register_plugin", refuse)
    assert ex.cancel(handles[i]) is CancelOutcome.FAILED
    assert not handles[i].state.final
    monkeypatch.undo()
    assert ex.cancel(handles[i]) is CancelOutcome.DEQUEUED
    client.run(_set_limits, 10_000, 0.0)  # the tombstones go at the next cancel
    ex.cancel(long[0])
    runner.wait(*long, timeout=60)
    check(runner, folder, burst, [i])


def test_a_task_sent_alone_never_runs_on_a_worker_that_joins_before_the_cancel_lands(
    setup, cluster, monkeypatch
):
    """A task sent alone (no batch) and cancelled while it waits on the scheduler: Dask's
    cancel is a message the scheduler handles a little later, and a worker that joins in
    between has no tombstone. The record covers it: the new worker is given the task and
    does not run it. The window is held open by faking the client's cancel message as not
    yet handled (a no-op: no other way to hold a few milliseconds open); cluster and
    workers are real."""
    from dask_support import end_pids

    ex, runner, client, folder = setup
    long = runner.start(T.mark_and_wait, str(folder), 1000, 300)
    assert wait_until(lambda: 1000 in ran(folder), 60), "the long task did not start"
    h, w = runner.start(T.mark_and_wait, str(folder), 7, 0)
    assert wait_until(lambda: h.future is not None, 30) and h.batch is None
    future = h.future
    monkeypatch.setattr(ex._conn.client, "cancel", lambda *a, **k: None)
    assert ex.cancel(h) is CancelOutcome.DEQUEUED
    monkeypatch.undo()
    new = cluster.start_worker()
    try:
        client.wait_for_workers(2, timeout=60)
        assert wait_until(future.done, 60), "the new worker was not given the task"
        assert 7 not in ran(folder), "the task ran after its cancel said dequeued"
        state = runner.wait(h, w, timeout=30)
        assert state == valent.Cancelled(CancelOutcome.DEQUEUED, ended_at=state.ended_at)
    finally:
        ex.cancel(long[0])
        runner.wait(*long, timeout=60)
        end_pids([new.pid, *_children(new.pid)])
        new.wait(30)
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, 30)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _by_value() -> None:
    """The helpers above run on the workers, which cannot import this module."""
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_by_value()
