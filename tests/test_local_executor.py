"""The Local executor through the executor contract (run/poll/cancel) and inside dispatches."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest
import valent as ct
from core_support import read_pid, wait_gone
from valent.api import get_dispatcher


def pid_and_group():
    return os.getpid(), os.getpgid(0)


def nap(seconds, pid_file=None):
    if pid_file:
        with open(f"{pid_file}.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f"{pid_file}.tmp", pid_file)
    time.sleep(seconds)
    return seconds


@ct.electron
def where():
    return os.getpid()


def _task(fn, *args, node_id=0):
    return ct.Task("d-test", node_id, fn.__name__, fn, args, {})


def _poll_until_final(ex, handle, woke: threading.Event, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ex.poll(handle)
        if state.final:
            return state
        woke.wait(0.5)  # the executor wakes us; the timeout is only a safety net
        woke.clear()
    raise AssertionError("the task never finished")


def test_it_is_the_installed_local_executor():
    cls = ct.executors.LocalExecutor
    assert cls.name == "local"
    assert issubclass(cls, ct.Executor)
    ex = cls(workers=3, grace=0.2)
    assert ex.capabilities == ct.Capabilities(True, True, True, 0.2, chain=True)
    assert repr(ex) == "LocalExecutor(workers=3, grace=0.2)"
    copy = pickle.loads(pickle.dumps(ex))  # travels without its pool
    assert copy.workers == 3 and copy._pool is None
    with pytest.raises(ValueError, match="workers"):
        cls(workers=0)
    with pytest.raises(ValueError, match="grace"):
        cls(grace=-1)


def test_run_poll_with_wake(local_executor):
    woke = threading.Event()
    handle = local_executor.run(_task(pid_and_group), woke.set)
    state = _poll_until_final(local_executor, handle, woke)
    assert isinstance(state, ct.Completed)
    pid, pgid = state.get_value()
    assert pid == pgid and pid in local_executor.pool.worker_pids()


def test_cancel_through_the_contract(local_executor, tmp_path):
    woke = threading.Event()
    a = local_executor.run(_task(nap, 30, str(tmp_path / "a")), woke.set)
    b = local_executor.run(_task(nap, 30, str(tmp_path / "b"), node_id=1), woke.set)
    c = local_executor.run(_task(nap, 0, str(tmp_path / "c"), node_id=2), woke.set)
    pids = [read_pid(tmp_path / "a", 20), read_pid(tmp_path / "b", 20)]
    assert isinstance(local_executor.poll(c), ct.Pending)  # two workers, both busy
    assert local_executor.cancel(c) == ct.CancelOutcome.DEQUEUED
    assert local_executor.poll(c).outcome == ct.CancelOutcome.DEQUEUED
    assert isinstance(local_executor.poll(a), ct.Running)
    assert local_executor.cancel(a) == ct.CancelOutcome.KILLED
    assert local_executor.cancel(b) == ct.CancelOutcome.KILLED
    for h in (a, b):
        state = _poll_until_final(local_executor, h, woke)
        assert isinstance(state, ct.Cancelled) and state.outcome == ct.CancelOutcome.KILLED
    assert wait_gone(pids, 5) == []
    assert not (tmp_path / "c").exists()
    assert local_executor.cancel(a) == ct.CancelOutcome.KILLED  # asked again: same answer
    done = local_executor.run(_task(nap, 0), woke.set)
    assert isinstance(_poll_until_final(local_executor, done, woke), ct.Completed)
    assert local_executor.cancel(done) == ct.CancelOutcome.TOO_LATE


def test_an_executor_instance_in_a_lattice(local_executor):
    @ct.lattice(executor=local_executor)
    def wf():
        return [where(), where(), where()]

    result = ct.dispatch_sync(wf)()
    assert result.status == "COMPLETED"
    assert set(result.result) <= set(local_executor.pool.worker_pids())
    assert {n["executor"] for n in result.get_all_node_results() if n["executor"]} == {"local"}


def test_per_electron_executor_overrides_the_lattices(local_executor):
    pinned = ct.electron(executor=local_executor)(where.fn)

    @ct.lattice(executor="local")
    def wf():
        return [pinned(), where()]

    result = ct.dispatch_sync(wf)()
    assert result.status == "COMPLETED"
    mine, default = result.result
    assert mine in local_executor.pool.worker_pids()
    shared = get_dispatcher().named_executor("local")
    assert shared is not local_executor and default in shared.pool.worker_pids()


def test_workers_are_reused_across_dispatches(local_executor):
    @ct.lattice(executor=local_executor)
    def wf():
        return where()

    first = {ct.dispatch_sync(wf)().result for _ in range(6)}
    assert first <= set(local_executor.pool.worker_pids())
    assert len(first) <= 2


def test_many_small_tasks(local_executor):
    @ct.lattice(executor=local_executor)
    def wf(n):
        return [where() for _ in range(n)]

    t0 = time.monotonic()
    result = ct.dispatch_sync(wf)(200)
    took = time.monotonic() - t0
    assert result.status == "COMPLETED" and len(result.result) == 200
    assert took < 60, f"200 no-op tasks took {took:.1f} s"


def step(x):
    return x + 1


def step_or_fail(x, fail_at):
    if x == fail_at:
        raise ValueError(f"stop at {x}")
    return x + 1


def step_slow(x, pid_dir, slow_at):
    with open(os.path.join(pid_dir, f"{x}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if x == slow_at:
        time.sleep(60)
    return x + 1


def test_a_local_chain_runs_in_one_worker_and_the_store_sees_every_node(local_executor):
    """Chaining on the Local executor: each electron starts in the same worker right after
    its only parent; every node is still COMPLETED in the store with its own value."""
    e = ct.electron(step, executor=local_executor)

    @ct.lattice
    def chain(n):
        x = e(0)
        for _ in range(n - 1):
            x = e(x)
        return x

    r = ct.dispatch_sync(chain)(50)
    assert r.status == "COMPLETED" and r.result == 50
    electrons = [n for n in r.get_all_node_results() if n["node_name"] == "step"]
    assert [n["status"] for n in electrons] == ["COMPLETED"] * 50
    assert [n["output"] for n in electrons] == list(range(1, 51))


def test_a_local_chain_stops_where_a_node_fails(local_executor):
    e = ct.electron(step_or_fail, executor=local_executor)

    @ct.lattice
    def chain(n, fail_at):
        x = e(0, fail_at)
        for _ in range(n - 1):
            x = e(x, fail_at)
        return x

    r = ct.dispatch_sync(chain)(10, 4)
    assert r.status == "FAILED"
    statuses = [n["status"] for n in r.get_all_node_results() if n["node_name"] == "step_or_fail"]
    assert statuses == ["COMPLETED"] * 4 + ["FAILED"] + ["CANCELLED"] * 5


def test_cancelling_a_local_chain_kills_the_running_node_and_dequeues_the_rest(
    local_executor, tmp_path
):
    e = ct.electron(step_slow, executor=local_executor)

    @ct.lattice
    def chain(n, pid_dir, slow_at):
        x = e(0, pid_dir, slow_at)
        for _ in range(n - 1):
            x = e(x, pid_dir, slow_at)
        return x

    did = ct.dispatch(chain)(10, str(tmp_path), 3)
    pid_file = tmp_path / "3.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the slow node never started"
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=30)
    assert r.status == "CANCELLED"
    nodes = [n for n in r.get_all_node_results() if n["node_name"] == "step_slow"]
    assert [n["status"] for n in nodes[:3]] == ["COMPLETED"] * 3
    assert nodes[3]["status"] == "CANCELLED" and nodes[3]["cancel_outcome"] == "killed"
    assert all(n["status"] == "CANCELLED" for n in nodes[4:])
    assert not any((tmp_path / f"{x}.pid").exists() for x in range(4, 10))  # never ran
    assert wait_gone([pid], 10) == []


@ct.electron
def _inc(x: int) -> int:
    return x + 1


def test_a_long_chain_completes_without_filling_a_workers_socket():
    """A 2,000-long chain on Local: chained jobs are sent to a worker only a few ahead (sent
    all at once, the pool's thread blocked on a full socket while the worker blocked sending
    its results back: a deadlock seen in the chain benchmark)."""

    @ct.lattice
    def long_chain(n: int) -> int:
        x = _inc(0)
        for _ in range(n - 1):
            x = _inc(x)
        return x

    result = ct.get_result(ct.dispatch(long_chain)(2000), wait=True, timeout=300)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 2000)


def test_after_the_pool_stops_on_an_internal_error_the_next_task_gets_a_new_pool(
    local_executor, monkeypatch, capfd
):
    """An internal error in the pool's thread fails the jobs it had (never a silent hang)
    and the executor starts a new pool for the next task instead of failing for ever."""
    from valent._pool import pool as pool_module

    woke = threading.Event()
    first = local_executor.run(_task(nap, 0), woke.set)
    assert isinstance(_poll_until_final(local_executor, first, woke), ct.Completed)
    old_pool = local_executor.pool
    # a fake fault, the only way to cause a bug in the pool's own thread: its first turn
    # with a job to hand out raises
    real_turn = pool_module._Loop._turn
    broke = []

    def turn_that_breaks_once(self):
        if not broke and self.pool._queue:
            broke.append(True)
            raise RuntimeError("a bug in the pool's thread")
        return real_turn(self)

    monkeypatch.setattr(pool_module._Loop, "_turn", turn_that_breaks_once)
    victim = local_executor.run(_task(nap, 30), woke.set)
    state = _poll_until_final(local_executor, victim, woke)
    assert isinstance(state, ct.Failed) and "internal error" in str(state.error)
    assert "a bug in the pool's thread" in capfd.readouterr().err  # its traceback is shown
    assert not old_pool.usable()
    after = local_executor.run(_task(nap, 0), woke.set)
    assert isinstance(_poll_until_final(local_executor, after, woke), ct.Completed)
    assert local_executor.pool is not old_pool
