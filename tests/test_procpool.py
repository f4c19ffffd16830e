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
from core_support import wait_gone, wait_until
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
    text = wait_until(lambda: path.exists() and path.read_text(), 20)
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
        assert wait_until(lambda: changes and changes[-1] is state, 5), changes
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


def test_killed_workers_are_replaced_and_work_queued_behind_them_runs(tmp_path):
    """Replacements start once the kill is over (not while it runs): a fixed pool is whole
    again afterwards, with booted workers; a job queued behind the killed ones, with no
    worker free, runs on a replacement."""
    with ProcessPool(workers=2, grace=0.5, name="test") as p:
        jobs = [p.submit(nap, (60, str(tmp_path / f"pid{k}"))) for k in range(2)]
        killed = [_pids(tmp_path / f"pid{k}")[0] for k in range(2)]
        queued = p.submit(ident)
        assert p.cancel_many(jobs) == [ct.CancelOutcome.KILLED] * 2
        assert isinstance(queued.wait(30), ct.Completed)  # on a replacement
        assert queued.state.get_value()[0] not in killed
        for job in jobs:
            assert job.wait(30).outcome == ct.CancelOutcome.KILLED
        assert wait_until(lambda: p.stats() == {"workers": 2, "idle": 2, "dying": 0,
                                                "queued": 0}, 20), p.stats()
        assert not set(killed) & set(p.worker_pids())
        pids = p.worker_pids()
    assert wait_gone(killed + pids) == []


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
            text = wait_until(lambda f=f: f.exists() and f.read_text(), 30)
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


# ---------------------------------------------------------------- jobs sent ahead, chaining


def pid_and(x):
    return os.getpid(), x


def add_one(pair):
    pid, x = pair
    return os.getpid(), x + 1


def test_a_deep_queue_is_sent_ahead_and_a_job_asked_back_is_dequeued(tmp_path):
    """With many jobs queued, busy workers get the next ones ahead (no round trip between
    tasks). Cancelling one sent ahead, not started: its body never runs (``dequeued``); the
    job running before it is not touched, and every other job still runs."""
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        [j.wait(10) for j in [p.submit(nap, (0,)) for _ in range(5)]]  # nap is known quick
        first = p.submit(nap, (1.0, str(tmp_path / "first")))
        rest = [p.submit(nap, (0, str(tmp_path / f"r{i}"))) for i in range(12)]
        assert wait_until(lambda: (tmp_path / "first").exists(), 10)
        assert wait_until(lambda: p.stats()["queued"] < 12, 5)  # some went ahead to the worker
        ahead = rest[0]
        assert ahead.worker is not None and ahead.state == ct.Pending()
        outcome = p.cancel(ahead)
        assert outcome in (ct.CancelOutcome.KILLED, ct.CancelOutcome.DEQUEUED)
        state = ahead.wait(10)
        assert state == ct.Cancelled(ct.CancelOutcome.DEQUEUED, ended_at=state.ended_at)
        assert isinstance(first.wait(10), ct.Completed)  # not killed
        assert all(isinstance(j.wait(10), ct.Completed) for j in rest[1:])
        assert not (tmp_path / "r0").exists()  # its body never ran


def test_no_job_is_sent_ahead_behind_a_task_that_may_run_long(tmp_path):
    """Only jobs of functions known to be quick are sent ahead, behind such a job: a worker
    cannot hand a job back while its task runs, so none waits behind a long task while
    another worker is free (quick ones run meanwhile)."""
    with ProcessPool(workers=2, name="test") as p:
        [j.wait(10) for j in [p.submit(pid_and, (i,)) for i in range(20)]]  # known quick
        long = p.submit(nap, (3.0,))
        quick = [p.submit(pid_and, (i,)) for i in range(20)]
        t = time.monotonic()
        states = [j.wait(10) for j in quick]
        assert all(isinstance(s, ct.Completed) for s in states)
        assert time.monotonic() - t < 2.5, "a job waited behind the long task"
        assert isinstance(long.wait(10), ct.Completed)


def test_a_chained_job_runs_right_after_its_upstream_in_the_same_worker():
    from valent.plugin import PoolUp

    with ProcessPool(workers=2, name="test") as p:
        head = p.submit(pid_and, (1,))
        chain = [head]
        for _ in range(30):
            chain.append(p.submit(add_one, (PoolUp(0),), ups=[chain[-1]]))
        values = [j.wait(10).get_value() for j in chain]
        assert [v[1] for v in values] == list(range(1, 32))
        assert len({v[0] for v in values}) == 1  # one worker ran the whole chain


def test_a_chained_job_never_runs_when_its_upstream_fails_or_is_cancelled(tmp_path):
    from valent.plugin import PoolUp

    with ProcessPool(workers=1, grace=0.2, name="test") as p:
        bad = p.submit(fail, ("no",))
        after_bad = p.submit(nap, (0, PoolUp(0)), ups=[bad])
        assert isinstance(bad.wait(10), ct.Failed)
        assert after_bad.wait(10) == ct.Cancelled(
            ct.CancelOutcome.DEQUEUED, ended_at=after_bad.state.ended_at)
        running = p.submit(nap, (30, str(tmp_path / "running")))
        marker = str(tmp_path / "never")
        after = p.submit(nap, (PoolUp(0), marker), ups=[running])
        after2 = p.submit(nap, (PoolUp(0), marker), ups=[after])
        assert wait_until(lambda: (tmp_path / "running").exists(), 10)
        assert p.cancel(running) == ct.CancelOutcome.KILLED
        assert running.wait(10).outcome == ct.CancelOutcome.KILLED
        for j in (after, after2):
            assert j.wait(10) == ct.Cancelled(ct.CancelOutcome.DEQUEUED, ended_at=j.state.ended_at)
        assert not os.path.exists(marker)
        # an upstream already completed: its value is sent with the job
        done = p.submit(pid_and, (5,))
        done.wait(10)
        assert p.submit(add_one, (PoolUp(0),), ups=[done]).wait(10).get_value()[1] == 6


def test_many_queued_jobs_cancelled_are_skipped_not_searched():
    """Cancelling a queued job does not search the queue (a million-node cancel was
    quadratic): the queue count drops at once and the job is skipped when its turn comes."""
    with ProcessPool(workers=1, name="test") as p:
        block = p.submit(nap, (0.5,))
        assert wait_until(lambda: block.state != ct.Pending(), 20)  # on a worker once it is up
        jobs = [p.submit(ident) for _ in range(2000)]
        t = time.monotonic()
        for j in jobs[::2]:
            assert p.cancel(j) in (ct.CancelOutcome.DEQUEUED, ct.CancelOutcome.KILLED)
        assert time.monotonic() - t < 10
        assert p.stats()["queued"] <= 1000
        block.wait(10)
        states = [j.wait(30) for j in jobs]
        assert all(isinstance(s, ct.Completed) for s in states[1::2])
        assert all(isinstance(s, ct.Cancelled) for s in states[::2])


def _paths_seen_by_a_task_and_its_programs() -> tuple[list[str], str]:
    import subprocess

    env_path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    out = subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.path))"],
                         capture_output=True, text=True, check=True).stdout
    return env_path, out


def test_valents_own_modules_never_shadow_the_users(pool):
    """The workers find this valent through the folder that holds the package, never through
    the package's folder itself: there, valent's config.py, graph.py, task.py ... would
    shadow a user's modules of those names in every task and every program it starts."""
    import valent

    package = os.path.dirname(os.path.abspath(valent.__file__))
    state = pool.submit(_paths_seen_by_a_task_and_its_programs).wait(60)
    assert isinstance(state, ct.Completed), state
    env_path, child_path = state.get_value()
    assert os.path.dirname(package) in env_path
    assert package not in env_path and repr(package) not in child_path


def test_notify_is_called_without_argument_and_not_with_on_change(pool):
    calls = []
    job = pool.submit(power, (3,), notify=lambda *a: calls.append(a))
    assert isinstance(job.wait(30), ct.Completed) and job.state.get_value() == 9
    assert wait_until(lambda: calls, 5) and all(a == () for a in calls), calls
    with pytest.raises(ValueError, match="on_change or notify"):
        pool.submit(power, (3,), on_change=lambda j: None, notify=lambda: None)


def test_every_waiter_of_a_job_wakes_when_it_ends(pool):
    """The done flag is set without a lock: waiters that came before, during and after the
    end all return, and ``done`` says the same as ``wait``."""
    for _ in range(20):
        job = pool.submit(nap, (0.002,))
        woke = []
        threads = [threading.Thread(target=lambda j=job, w=woke: w.append(j.done.wait(30)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        assert isinstance(job.wait(30), ct.Completed)
        for t in threads:
            t.join(30)
        assert woke == [True] * 4 and job.done.is_set()


def test_many_distinct_functions_each_run_their_own_code(pool):
    """The pickled-function cache (and the workers' own) is keyed per function object:
    more functions than it holds, made and dropped in turn (ids get reused), never mix up."""
    from valent._pool import pool as pool_mod

    results = []
    for i in range(pool_mod.FN_CACHE_SIZE + 40):
        fn = eval(f"lambda: {i}")  # a new function each time; the last one may be freed
        results.append((i, pool.submit(fn).wait(30)))
    assert [s.get_value() for _, s in results] == [i for i, _ in results]


def test_a_process_holding_over_1024_descriptors_can_still_kill(tmp_path):
    """A long-lived program may hold 1,024+ open files: the pool's wait for a killed worker
    once used select(), which refuses such descriptor numbers, and the pool's thread died
    ("stopped on an internal error"), failing every task after it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the hard limit of open files ({hard}) is below 1,300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        with ProcessPool(workers=1, grace=0.5, name="test") as p:
            running = p.submit(nap, (60, str(tmp_path / "pid")))
            pid_file = tmp_path / "pid"
            assert wait_until(pid_file.exists, 30)
            worker_pid = int(pid_file.read_text().split()[0])
            assert p.cancel(running) == ct.CancelOutcome.KILLED
            state = running.wait(30)
            assert isinstance(state, ct.Cancelled), state
            assert wait_gone([worker_pid], 10) == []
            assert p.submit(power, (3,)).wait(30).get_value() == 9  # the pool lives on
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
