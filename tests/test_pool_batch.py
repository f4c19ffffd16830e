"""Batches stay truthful: when the queue is deep, busy workers are sent many jobs ahead in one
message, and send their results back with the next job's start. A job of a batch whose body
has not started is cancelled ``dequeued`` (and said so by ``cancel``), never ``killed``; the
started one is killed with its whole tree; jobs of a batch behind a killed or dead worker run
elsewhere; big batches both ways never deadlock; each job's captured output is its own."""

from __future__ import annotations

import os
import signal
import sys
import time

import valent as ct
from core_support import wait_gone, wait_until
from valent._pool.pool import ProcessPool
from valent.testing.procs import alive, read_pids


def mark(path, seconds=0.0):
    """Write ``path`` (the body's first act), then sleep."""
    if path:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if seconds:
        time.sleep(seconds)
    return path


def hold(marker, release):
    """Write ``marker``, then wait for ``release`` to exist (at once if it does)."""
    mark(marker)
    while not os.path.exists(release):
        time.sleep(0.01)


def nap_with_child(pid_file, seconds):
    """With ``seconds``: start a child, write both pids, sleep. Without: return at once (so
    the pool learns the function is quick)."""
    import subprocess

    if not seconds:
        return None
    child = subprocess.Popen(["sleep", str(seconds)])
    with open(f"{pid_file}.tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(f"{pid_file}.tmp", pid_file)
    time.sleep(seconds)


def echo(blob):
    return blob[::-1]


def say(text):
    if text:
        print(text)
        print(text.upper(), file=sys.stderr)
    return text


def _warm(p: ProcessPool, fn, *args) -> None:
    """Run ``fn`` a few times so the pool knows it is quick (only such jobs go in batches)."""
    for j in [p.submit(fn, args) for _ in range(6)]:
        assert isinstance(j.wait(30), ct.Completed), j.state


def _ahead(p: ProcessPool, jobs, n: int) -> bool:
    return wait_until(lambda: sum(1 for j in jobs if j.worker is not None) >= n, 10)


def test_cancelled_jobs_inside_a_batch_are_dequeued_and_their_bodies_never_run(tmp_path):
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        _warm(p, mark, "")
        release = tmp_path / "release"
        release.touch()
        _warm(p, hold, "", str(release))
        release.unlink()
        first = p.submit(hold, (str(tmp_path / "first"), str(release)))
        batch = [p.submit(mark, (str(tmp_path / f"b{i}"),)) for i in range(40)]
        assert wait_until(lambda: (tmp_path / "first").exists(), 10)
        assert _ahead(p, batch, 2), "no batch was sent ahead to the busy worker"
        sent = [j for j in batch if j.worker is not None]
        cancel = sent[1:2] + batch[-3:]  # inside the batch, and at the end of the queue
        outcomes = p.cancel_many(cancel)
        assert outcomes == [ct.CancelOutcome.DEQUEUED] * len(cancel)
        assert p.cancel_many(cancel) == outcomes  # asked again: the same answers
        # the worker answers a job asked back when it gets to it: after the running one. The
        # requests must be in its socket before it goes on (a job it started before its
        # request arrived would run: then it is reported as what it did, not as dequeued)
        w = first.worker
        assert wait_until(lambda: all(j.skip for j in cancel if j.worker) and not w.wbuf, 10)
        release.touch()
        for j in cancel:
            state = j.wait(10)
            assert state == ct.Cancelled(ct.CancelOutcome.DEQUEUED, ended_at=state.ended_at)
            assert state.started_at is None
        assert isinstance(first.wait(10), ct.Completed)  # the running one is not touched
        for i, j in enumerate(batch):
            if j in cancel:
                assert not (tmp_path / f"b{i}").exists(), f"b{i} was cancelled but ran"
            else:
                assert isinstance(j.wait(10), ct.Completed), j.state


def test_killing_the_running_job_of_a_batch_kills_its_tree_and_the_rest_run_elsewhere(tmp_path):
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        _warm(p, mark, "")
        _warm(p, nap_with_child, "", 0)
        running = p.submit(nap_with_child, (str(tmp_path / "pids"), 30))
        batch = [p.submit(mark, (str(tmp_path / f"b{i}"),)) for i in range(20)]
        pids = read_pids(tmp_path / "pids")
        assert _ahead(p, batch, 2)
        assert p.cancel(running) == ct.CancelOutcome.KILLED
        state = running.wait(10)
        assert state.outcome == ct.CancelOutcome.KILLED and state.started_at is not None
        assert wait_gone(pids, 5) == [], "the killed job's tree is not gone"
        for j in batch:  # sent ahead to the killed worker: they run on its replacement
            assert isinstance(j.wait(20), ct.Completed), j.state
        assert all((tmp_path / f"b{i}").exists() for i in range(20))


def test_a_worker_dead_mid_batch_fails_its_job_only(tmp_path):
    with ProcessPool(workers=1, grace=0.5, name="test") as p:
        _warm(p, mark, "")
        _warm(p, nap_with_child, "", 0)
        running = p.submit(nap_with_child, (str(tmp_path / "pids"), 30))
        batch = [p.submit(mark, (str(tmp_path / f"b{i}"),)) for i in range(20)]
        worker, child = read_pids(tmp_path / "pids")
        assert _ahead(p, batch, 2)
        os.kill(worker, signal.SIGKILL)  # dies on its own, not by a cancel
        state = running.wait(10)
        assert isinstance(state, ct.Failed), state
        assert wait_gone([child], 5) == []
        for j in batch:
            assert isinstance(j.wait(20), ct.Completed), j.state


def test_big_batches_both_ways_do_not_deadlock():
    """Many jobs with large arguments sent ahead while the worker sends large results back:
    neither side may block on a full socket while the other does."""
    with ProcessPool(workers=2, name="test") as p:
        _warm(p, echo, b"x")
        blobs = [os.urandom(256 * 1024) for _ in range(4)]
        jobs = [p.submit(echo, (blobs[i % 4],)) for i in range(300)]
        for i, j in enumerate(jobs):
            state = j.wait(120)
            assert isinstance(state, ct.Completed), state
            if i % 50 == 0:
                assert state.get_value() == blobs[i % 4][::-1]


def test_each_job_of_a_batch_captures_only_its_own_output():
    with ProcessPool(workers=2, name="test") as p:
        _warm(p, say, "")
        texts = [f"line {i}" if i % 3 else "" for i in range(300)]
        jobs = [p.submit(say, (t,)) for t in texts]
        for t, j in zip(texts, jobs, strict=True):
            state = j.wait(30)
            assert isinstance(state, ct.Completed), state
            assert state.stdout == (f"{t}\n" if t else ""), (t, state.stdout)
            assert state.stderr == (f"{t.upper()}\n" if t else ""), (t, state.stderr)


def test_cancel_many_stops_every_running_job_at_once(tmp_path):
    with ProcessPool(workers=3, grace=1.0, name="test") as p:
        jobs = [p.submit(nap_with_child, (str(tmp_path / f"p{i}"), 30)) for i in range(3)]
        pids = [pid for i in range(3) for pid in read_pids(tmp_path / f"p{i}")]
        assert wait_until(lambda: all(isinstance(j.state, ct.Running) for j in jobs), 10)
        assert p.cancel_many(jobs) == [ct.CancelOutcome.KILLED] * 3
        for j in jobs:
            state = j.wait(10)
            assert state.outcome == ct.CancelOutcome.KILLED, state
        assert not [pid for pid in pids if alive(pid)], "a task process outlived its kill"


def break_fds(how):
    if how == "close":
        os.close(1)
        os.close(2)
    elif how == "devnull":
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return how


def test_a_job_that_closes_or_redirects_fds_1_and_2_does_not_hide_the_next_ones_output():
    """Between back-to-back jobs of a batch fds 1 and 2 stay on the capture files: a job that
    closed or redirected them must not take the output of the jobs after it."""
    with ProcessPool(workers=1, name="test") as p:
        _warm(p, say, "")
        _warm(p, break_fds, "")
        block = p.submit(mark, ("", 0.3))  # the rest queue up behind it (in batches)
        jobs = []
        for i in range(30):
            jobs.append((None, p.submit(break_fds, ("close" if i % 2 else "devnull",))))
            jobs.append((f"after {i}", p.submit(say, (f"after {i}",))))
        assert isinstance(block.wait(10), ct.Completed)
        for text, j in jobs:
            state = j.wait(30)
            assert isinstance(state, ct.Completed), state
            if text:
                assert state.stdout == f"{text}\n", (text, state.stdout)
                assert state.stderr == f"{text.upper()}\n", (text, state.stderr)


class SlowToLoad:
    """An argument whose unpickling (in the worker) writes ``path`` then takes ``seconds``."""

    def __init__(self, path, seconds):
        self.path, self.seconds = path, seconds

    def __reduce__(self):
        return (_slow_load, (self.path, self.seconds))


def _slow_load(path, seconds):
    if path:
        mark(path)
        time.sleep(seconds)
    return SlowToLoad("", 0)


def take(*args):
    return len(args)


def test_a_result_is_not_held_back_while_the_next_job_of_the_batch_loads(tmp_path):
    """A result travels with the next job's start, unless loading that job may take long
    (large arguments, a function not loaded yet): then it goes first."""
    with ProcessPool(workers=1, name="test") as p:
        release = tmp_path / "release"
        release.touch()
        _warm(p, hold, "", str(release))
        _warm(p, take, SlowToLoad("", 0))
        release.unlink()
        block = p.submit(hold, (str(tmp_path / "block"), str(release)))
        assert wait_until(lambda: (tmp_path / "block").exists(), 10)
        quick = p.submit(take, (1,))
        loading = tmp_path / "loading"
        slow = p.submit(take, (os.urandom(200 * 1024), SlowToLoad(str(loading), 5)))
        fill = [p.submit(take, (i,)) for i in range(6)]
        assert wait_until(lambda: slow.worker is not None, 10), "not sent in a batch"
        release.touch()
        assert wait_until(loading.exists, 10)
        assert isinstance(quick.wait(2.5), ct.Completed), "the result waited for the next job"
        assert isinstance(slow.wait(30), ct.Completed)
        assert all(isinstance(j.wait(30), ct.Completed) for j in [block, *fill])
