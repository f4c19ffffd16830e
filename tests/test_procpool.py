"""The warm, killable process pool on its own: values, errors, output, cancel, growth, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import valent as ct
from core_support import wait_for, wait_gone
from valent._pool.pool import ProcessPool, RemoteError


def ident():
    return os.getpid(), os.getpgid(0), os.getsid(0)


def power(a, b=2):
    return a**b


def fail(msg):
    raise ValueError(msg)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def fail_unpicklably():
    raise Unpicklable("has a lock")


def chatty(tag):
    print(f"out {tag}")
    print(f"err {tag}", file=sys.stderr)
    subprocess.run(["echo", f"child {tag}"], check=True)
    return tag


def nap(seconds, pid_file=None):
    if pid_file:
        with open(f"{pid_file}.tmp", "w") as f:
            f.write(f"{os.getpid()} {time.time()}")
        os.replace(f"{pid_file}.tmp", pid_file)
    time.sleep(seconds)
    return seconds


def nap_with_grandchild(pid_file):
    child = subprocess.Popen(["sleep", "60"])
    with open(f"{pid_file}.tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(f"{pid_file}.tmp", pid_file)
    time.sleep(60)


def die():
    os._exit(7)


@pytest.fixture
def pool():
    p = ProcessPool(workers=2, grace=0.5, name="test")
    yield p
    pids = p.worker_pids()
    p.shutdown()
    assert wait_gone(pids) == [], "the pool left workers behind"


def _pids(path):
    text = wait_for(lambda: path.exists() and path.read_text(), 20)
    assert text, f"{path} never written"
    return [int(float(x)) for x in text.split()[:2]]


def test_values_and_kwargs(pool):
    jobs = [pool.submit(power, (i,), {"b": 3}) for i in range(10)]
    states = [j.wait(30) for j in jobs]
    assert all(isinstance(s, ct.Completed) for s in states), states
    assert [s.get_value() for s in states] == [i**3 for i in range(10)]
    assert all(s.started_at <= s.ended_at for s in states)


def test_workers_are_warm_and_each_task_leads_its_own_group():
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        first = p.submit(ident).wait(30).get_value()
        second = p.submit(ident).wait(30).get_value()
        assert first == second  # the same worker process, reused
        pid, pgid, sid = first
        assert pid == pgid == sid  # its own session and process group
        assert pid != os.getpid() and pid in p.worker_pids()
        pids = p.worker_pids()
    assert wait_gone(pids) == []


def test_exceptions_come_back_with_type_and_traceback(pool):
    state = pool.submit(fail, ("bad thing",)).wait(30)
    assert isinstance(state, ct.Failed)
    assert isinstance(state.error, ValueError) and str(state.error) == "bad thing"
    assert "in fail" in state.traceback and "ValueError: bad thing" in state.traceback
    state = pool.submit(fail_unpicklably).wait(30)
    assert isinstance(state, ct.Failed)
    assert isinstance(state.error, RemoteError) and "has a lock" in str(state.error)
    assert "Unpicklable" in state.traceback


def test_stdout_and_stderr_are_captured_per_task_subprocesses_too(pool):
    a = pool.submit(chatty, ("A",)).wait(30)
    b = pool.submit(chatty, ("B",)).wait(30)
    assert "out A" in a.stdout and "child A" in a.stdout and "err A" in a.stderr
    assert "err A" not in a.stdout and "out A" not in a.stderr
    # the same worker ran both: nothing of the earlier task's output is left, nothing else added
    assert sorted(b.stdout.splitlines()) == ["child B", "out B"], repr(b.stdout)
    assert b.stderr == "err B\n", repr(b.stderr)


def test_unpicklable_arguments_are_refused_at_submit(pool):
    with pytest.raises(ct.PicklingError, match="cannot be pickled"):
        pool.submit(power, (threading.Lock(),), label="power(3)")


def test_unpicklable_return_value_fails_with_a_message(pool):
    state = pool.submit(threading.Lock).wait(30)
    assert isinstance(state, ct.Failed)
    assert "return value" in str(state.error) and "cannot be pickled" in str(state.error)


def test_cancel_queued_is_dequeued_and_running_is_killed(tmp_path):
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        changes = []
        running = p.submit(
            nap_with_grandchild, (str(tmp_path / "pids"),),
            on_change=lambda j: changes.append(j.state),
        )
        queued = p.submit(nap, (0, str(tmp_path / "never")))
        worker_pid, grandchild = _pids(tmp_path / "pids")
        assert isinstance(queued.state, ct.Pending)
        assert p.cancel(queued) == ct.CancelOutcome.DEQUEUED
        assert isinstance(queued.state, ct.Cancelled)
        assert queued.state.outcome == ct.CancelOutcome.DEQUEUED
        assert queued.done.is_set()
        assert p.cancel(running) == ct.CancelOutcome.KILLED
        assert p.cancel(running) == ct.CancelOutcome.KILLED  # asking twice is fine
        state = running.wait(30)
        assert isinstance(state, ct.Cancelled) and state.outcome == ct.CancelOutcome.KILLED
        assert wait_gone([worker_pid, grandchild], 5) == []
        # told of the changes (a start and an end seen in one turn of the pool: one call),
        # the last call with the final state (observers are called after ``done`` is set)
        assert wait_for(lambda: changes and changes[-1] is state, 5), changes
        assert p.cancel(running) == ct.CancelOutcome.KILLED  # still the truth, after the fact
        assert p.cancel(queued) == ct.CancelOutcome.DEQUEUED
        done = p.submit(ident)
        done.wait(30)
        assert p.cancel(done) == ct.CancelOutcome.TOO_LATE
        # the killed worker was replaced and serves the next task
        new_pid = p.submit(ident).wait(30).get_value()[0]
        assert new_pid != worker_pid and p.worker_pids() == [new_pid]
        assert not (tmp_path / "never").exists()
        pids = p.worker_pids()
    assert wait_gone(pids) == []


def test_a_worker_that_dies_on_its_own_fails_its_job_and_is_replaced():
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        old = p.worker_pids()
        state = p.submit(die, label="die(0)").wait(30)
        assert isinstance(state, ct.Failed) and isinstance(state.error, ct.WorkerDiedError)
        assert "die(0)" in str(state.error) and "exit code 7" in str(state.error)
        assert p.submit(power, (3,)).wait(30).get_value() == 9
        assert p.worker_pids() != old
        pids = p.worker_pids()
    assert wait_gone(old + pids) == []


def test_a_job_killed_by_a_signal_from_outside_fails_with_the_signal(tmp_path):
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        job = p.submit(nap, (60, str(tmp_path / "pid")))
        pid = _pids(tmp_path / "pid")[0]
        os.kill(pid, signal.SIGSEGV)
        state = job.wait(30)
        assert isinstance(state, ct.Failed) and "SIGSEGV" in str(state.error)
        pids = p.worker_pids()
    assert wait_gone(pids + [pid]) == []


def test_elastic_pool_grows_for_sleeping_tasks(tmp_path):
    seconds = 9.0  # the six start ~1 s apart at most here; the bound is ~10x that
    with ProcessPool(min_workers=1, max_workers=8, grace=0.5, name="test") as p:
        files = [tmp_path / f"n{i}" for i in range(6)]
        jobs = [p.submit(nap, (seconds, str(f))) for f in files]
        starts = []
        for f in files:
            text = wait_for(lambda f=f: f.exists() and f.read_text(), 30)
            assert text, "a task never started"
            starts.append(float(text.split()[1]))
        # all six started before the first could finish: they run side by side
        assert max(starts) - min(starts) < seconds - 0.5, starts
        assert len({int(f.read_text().split()[0]) for f in files}) == 6
        assert all(isinstance(j.state, ct.Running) for j in jobs)
        assert all(p.cancel(j) == ct.CancelOutcome.KILLED for j in jobs)  # no need to wait
        assert all(isinstance(j.wait(30), ct.Cancelled) for j in jobs)
        pids = p.worker_pids()
    assert wait_gone(pids) == []


def test_shutdown_kills_running_work_and_leaves_no_process(tmp_path):
    p = ProcessPool(workers=2, grace=0.5, name="test")
    running = p.submit(nap_with_grandchild, (str(tmp_path / "pids"),))
    queued = [p.submit(nap, (0,)) for _ in range(3)] + [p.submit(nap, (30,))]
    worker, grandchild = _pids(tmp_path / "pids")
    pids = p.worker_pids()
    t0 = time.monotonic()
    p.shutdown()
    assert time.monotonic() - t0 < 10
    assert wait_gone(pids + [worker, grandchild]) == []
    assert isinstance(running.wait(10), ct.Cancelled)
    assert all(j.wait(10).final for j in queued)
    p.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        p.submit(ident)
    me = psutil.Process()
    assert not [c for c in me.children(recursive=True) if c.pid in pids]
