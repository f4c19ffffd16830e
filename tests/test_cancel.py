"""Cancel, kill, timeout, retries and the cooperative token, with real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import valent as ct
from core_support import read_pid, wait_gone, wait_until
from valent.testing.procs import write_atomic as _put


@ct.electron
def sleeper(seconds, pid_file=None, marker=None):
    if pid_file:
        _put(pid_file, str(os.getpid()))
    time.sleep(seconds)
    if marker:
        _put(marker, "done")
    return seconds


# 2 s: long enough for a worker on a loaded machine to import this module and start the task
timed = ct.electron(timeout=2.0)(sleeper.fn)


@ct.electron
def after(x):
    return ("after", x)


@ct.electron
def spawner(pid_file, marker, escape, seconds):
    """Start a grandchild (in the task's group, in its own session, one that ignores
    SIGTERM, or a daemon: double-forked into its own session, its parent gone), then sleep,
    then write a marker."""
    if escape == "ignores-sigterm":
        grandchild = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60"]).pid
    elif escape == "daemon":
        got = subprocess.run(
            ["sh", "-c", "setsid sleep 60 > /dev/null 2>&1 < /dev/null & echo $!"],
            capture_output=True, text=True, check=True,
        )  # the sh is gone: the sleep's parent is no longer this task's process
        grandchild = int(got.stdout)
    else:
        own = escape == "own-session"
        grandchild = subprocess.Popen(["sleep", "60"], start_new_session=own).pid
    _put(pid_file, f"{os.getpid()} {grandchild}")
    time.sleep(seconds)
    _put(marker, "done")
    return "finished"


@ct.electron
def die(how):
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sys.exit":
        sys.exit(2)
    return "alive"


@ct.electron
def inc(x):
    return x + 1


@ct.electron
def flaky(counter_file, fail_times):
    n = int(open(counter_file).read()) + 1 if os.path.exists(counter_file) else 1
    _put(counter_file, str(n))
    if n <= fail_times:
        raise RuntimeError(f"attempt {n} fails on purpose")
    return n


@ct.electron
def cooperative(pid_file, marker):
    _put(pid_file, str(os.getpid()))
    while not ct.cancel_requested():
        time.sleep(0.02)
    _put(marker, "stopped cleanly")
    return "stopped early"


@ct.electron
def asks_once_then_ignores(pid_file):
    ct.cancel_requested()  # now a cooperative task: SIGTERM no longer ends it at once
    _put(pid_file, str(os.getpid()))
    time.sleep(60)
    return "never"


@contextlib.contextmanager
def executor(**kw):
    """A LocalExecutor of its own, shut down afterwards with every worker gone."""
    ex = ct.executors.LocalExecutor(**kw)
    try:
        yield ex
    finally:
        pids = ex.pool.worker_pids() if ex._pool is not None else []
        ex.shutdown()
        assert wait_gone(pids) == [], "LocalExecutor left worker processes behind"


def _nodes(result, name):
    return [r for r in result.get_all_node_results() if r["node_name"] == name]


# ------------------------------------------------------------------------------ killing


@pytest.mark.parametrize("escape", ["same-group", "own-session", "ignores-sigterm", "daemon"])
def test_cancel_kills_the_task_and_its_grandchild(tmp_path, escape):
    @ct.lattice
    def wf(pid_file, marker):
        return spawner(pid_file, marker, escape, 1.5)

    pid_file, marker = tmp_path / "pids", tmp_path / "marker"
    dispatch_id = ct.dispatch(wf)(str(pid_file), str(marker))
    text = wait_until(lambda: pid_file.exists() and pid_file.read_text(), 20)
    assert text, "the task never started"
    worker_pid, grandchild_pid = map(int, text.split())
    assert psutil.pid_exists(grandchild_pid)
    t0 = time.monotonic()
    msg = ct.cancel(dispatch_id)
    assert msg == f"Dispatch {dispatch_id} cancelled."
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    took = time.monotonic() - t0
    assert result.status == ct.Status.CANCELLED
    assert took < 10, f"cancel took {took:.1f} s"
    node = result.get_node_result(0)
    assert node["status"] == "CANCELLED" and node["cancel_outcome"] == "killed"
    assert node["cancel_requested_at"] is not None and node["cancel_confirmed_at"] is not None
    assert node["output"] is None
    # nothing of the task is left: not the worker that ran it, not its grandchild
    left = wait_gone([worker_pid, grandchild_pid], timeout=5)
    for pid in left:  # ours (the test started it), so end it even when the check fails
        os.kill(pid, signal.SIGKILL)
    assert left == []
    time.sleep(2.0)  # longer than the task's own sleep: it would have written the marker
    assert not marker.exists()


def test_cancel_of_chosen_task_ids_cancels_them_and_their_dependents_only(tmp_path):
    @ct.lattice
    def wf(pid_file):
        a = sleeper(30, pid_file)  # node 0 (its arguments are nodes 1, 2)
        b = after(a)
        c = sleeper(1.0)
        return {"b": b, "c": c, "cc": after(c)}

    pid_file = tmp_path / "a.pid"
    dispatch_id = ct.dispatch(wf)(str(pid_file))
    a_pid = read_pid(pid_file, 20)
    msg = ct.cancel(dispatch_id, task_ids=[0])
    assert "cancelled task(s) [0] and dependents" in msg
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    assert result.status == ct.Status.CANCELLED
    assert result.result is None
    a = result.get_node_result(0)
    assert a["status"] == "CANCELLED" and a["cancel_outcome"] == "killed"
    b, cc = _nodes(result, "after")
    assert b["status"] == "CANCELLED" and b["start_time"] is None
    assert cc["status"] == "COMPLETED" and cc["output"] == ("after", 1.0)
    c = [r for r in _nodes(result, "sleeper") if r["node_id"] != 0][0]
    assert c["status"] == "COMPLETED" and c["output"] == 1.0 and c["cancel_outcome"] is None
    assert wait_gone([a_pid], 5) == []


def test_cancel_with_an_unknown_task_id_says_so_and_changes_nothing():
    @ct.lattice
    def wf():
        return sleeper(0.5)

    dispatch_id = ct.dispatch(wf)()
    msg = ct.cancel(dispatch_id, task_ids=[99])
    assert "no task id(s) [99]" in msg
    assert ct.get_result(dispatch_id, wait=True, timeout=30).status == "COMPLETED"


def test_cancel_before_any_task_starts_dequeues_everything(tmp_path):
    with executor(workers=1, grace=0.5) as ex:

        @ct.lattice(executor=ex)
        def blocker(pid_file):
            return sleeper(30, pid_file)

        @ct.lattice(executor=ex)
        def queued(m1, m2):
            return after(sleeper(0, marker=m1)), sleeper(0, marker=m2)

        blocking = ct.dispatch(blocker)(str(tmp_path / "blocker.pid"))
        blocker_pid = read_pid(tmp_path / "blocker.pid", 20)  # the only worker is busy now
        m1, m2 = tmp_path / "m1", tmp_path / "m2"
        dispatch_id = ct.dispatch(queued)(str(m1), str(m2))
        assert ct.cancel(dispatch_id) == f"Dispatch {dispatch_id} cancelled."
        result = ct.get_result(dispatch_id, wait=True, timeout=30)
        assert result.status == ct.Status.CANCELLED
        for node in result.get_all_node_results():
            if node["node_name"].startswith(":parameter:"):
                continue
            assert node["status"] == "CANCELLED", node
            assert node["cancel_outcome"] == "dequeued", node
            assert node["start_time"] is None, node
        ct.cancel(blocking)
        assert ct.get_result(blocking, wait=True, timeout=30).status == "CANCELLED"
        assert wait_gone([blocker_pid], 5) == []
        time.sleep(0.3)
        assert not m1.exists() and not m2.exists()


def test_cancel_right_after_dispatch(tmp_path):
    @ct.lattice
    def wf(marker):
        return [sleeper(3, marker=marker), after(sleeper(3, marker=marker))]

    marker = tmp_path / "marker"
    t0 = time.monotonic()
    dispatch_id = ct.dispatch(wf)(str(marker))
    ct.cancel(dispatch_id)
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    assert result.status == "CANCELLED", str(result)
    for node in result.get_all_node_results():
        if not node["node_name"].startswith(":parameter:"):
            assert node["status"] == "CANCELLED", str(result)
            assert node["cancel_outcome"] in ("dequeued", "killed"), str(result)
    time.sleep(max(0.0, 3.3 - (time.monotonic() - t0)))
    assert not marker.exists()


def test_cancel_after_completion_changes_nothing():
    @ct.lattice
    def wf(x):
        return inc(x)

    result = ct.dispatch_sync(wf)(1)
    assert result.status == "COMPLETED"
    for task_ids in (None, [0]):
        msg = ct.cancel(result.dispatch_id, task_ids)
        assert "already finished" in msg and "COMPLETED" in msg
    again = ct.get_result(result.dispatch_id)
    assert again.status == "COMPLETED" and again.result == 2
    assert again.cancel_requested_at is None
    assert all(n["cancel_outcome"] is None for n in again.get_all_node_results())


def test_double_cancel_is_idempotent(tmp_path):
    @ct.lattice
    def wf(pid_file):
        return after(sleeper(30, pid_file))

    pid_file = tmp_path / "pid"
    dispatch_id = ct.dispatch(wf)(str(pid_file))
    pid = read_pid(pid_file, 20)
    first = ct.cancel(dispatch_id)
    second = ct.cancel(dispatch_id)
    assert first == f"Dispatch {dispatch_id} cancelled."
    assert dispatch_id in second
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    third = ct.cancel(dispatch_id)
    assert "already finished" in third and "CANCELLED" in third
    assert result.status == "CANCELLED"
    assert result.get_node_result(0)["cancel_outcome"] == "killed"
    assert _nodes(result, "after")[0]["status"] == "CANCELLED"
    assert ct.get_result(dispatch_id).status == "CANCELLED"
    assert wait_gone([pid], 5) == []


# ------------------------------------------------------------------------------ dying workers


@pytest.mark.parametrize(
    "how, cause", [("exit", "exit code 3"), ("sigkill", "SIGKILL")], ids=["os._exit", "SIGKILL"]
)
def test_a_task_that_kills_its_own_worker_fails_and_later_tasks_run(how, cause):
    with executor(workers=1, grace=0.5) as ex:

        @ct.lattice(executor=ex)
        def wf(how):
            dead = die(how)
            return {"dead": after(dead), "later": [inc(1), inc(2), inc(3)]}

        result = ct.dispatch_sync(wf)(how)
        assert result.status == ct.Status.FAILED
        node = result.get_node_result(0)
        assert node["status"] == "FAILED"
        assert "died" in node["error"] and cause in node["error"], node["error"]
        assert _nodes(result, "after")[0]["status"] == "CANCELLED"
        assert [n["output"] for n in _nodes(result, "inc")] == [2, 3, 4]
        assert all(n["status"] == "COMPLETED" for n in _nodes(result, "inc"))
        # the replaced worker keeps serving
        assert ct.dispatch_sync(wf)("no").status == "COMPLETED"


def test_sys_exit_in_a_task_fails_the_node_not_the_dispatcher():
    @ct.lattice
    def wf():
        return [die("sys.exit"), inc(1)]

    result = ct.dispatch_sync(wf)()
    assert result.status == "FAILED"
    node = result.get_node_result(0)
    assert node["status"] == "FAILED" and "SystemExit" in node["error"] and "2" in node["error"]
    assert _nodes(result, "inc")[0]["output"] == 2

    @ct.lattice
    def next_one():
        return inc(5)

    assert ct.dispatch_sync(next_one)().result == 6  # the dispatcher goes on


# ------------------------------------------------------------------------------ timeout, retries


def test_timeout_fails_the_node_and_stops_its_process(tmp_path):
    @ct.lattice
    def wf(pid_file, marker):
        return after(timed(8, pid_file, marker))

    pid_file, marker = tmp_path / "pid", tmp_path / "marker"
    t0 = time.monotonic()
    dispatch_id = ct.dispatch(wf)(str(pid_file), str(marker))
    pid = read_pid(pid_file, 20)
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    took = time.monotonic() - t0
    assert result.status == ct.Status.FAILED
    node = result.get_node_result(0)
    assert node["status"] == "FAILED"
    assert "timed out" in node["error"] and "2.0" in node["error"], node["error"]
    assert _nodes(result, "after")[0]["reason"] == "upstream"
    assert wait_gone([pid], 5) == []
    assert took < 7, f"a 2 s timeout took {took:.1f} s to end the dispatch"
    assert not marker.exists()  # and, its process gone, it never will be written


@pytest.mark.parametrize(
    "retries, fail_times, status, attempts",
    [(1, 1, "COMPLETED", 2), (0, 1, "FAILED", 1), (2, 5, "FAILED", 3)],
    ids=["fails-once-then-succeeds", "no-retries", "retries-exhausted"],
)
def test_retries(tmp_path, retries, fail_times, status, attempts):
    task = ct.electron(retries=retries)(flaky.fn)

    @ct.lattice
    def wf(counter):
        return task(counter, fail_times)

    counter = tmp_path / "counter"
    result = ct.dispatch_sync(wf)(str(counter))
    assert result.status == status, result.error
    node = result.get_node_result(0)
    assert node["attempts"] == attempts
    assert int(counter.read_text()) == attempts
    if status == "COMPLETED":
        assert result.result == attempts
    else:
        assert f"attempt {attempts} fails on purpose" in node["error"]


# ------------------------------------------------------------------------------ cooperative stop


def test_cancel_requested_lets_a_loop_stop_cleanly(tmp_path):
    @ct.lattice
    def wf(pid_file, marker):
        return cooperative(pid_file, marker)

    assert ct.cancel_requested() is False  # outside a task
    pid_file, marker = tmp_path / "pid", tmp_path / "marker"
    dispatch_id = ct.dispatch(wf)(str(pid_file), str(marker))
    pid = read_pid(pid_file, 20)
    time.sleep(0.2)
    assert ct.get_result(dispatch_id).get_node_result(0)["status"] == "RUNNING"
    ct.cancel(dispatch_id)
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    assert marker.read_text() == "stopped cleanly"  # it saw the request and returned
    # the truth: it did not complete its work; it was stopped and its process is gone
    assert result.status == "CANCELLED"
    node = result.get_node_result(0)
    assert node["status"] == "CANCELLED" and node["cancel_outcome"] == "killed"
    assert node["output"] is None
    assert wait_gone([pid], 5) == []


def test_a_cooperative_task_that_ignores_the_request_is_killed_after_the_grace(tmp_path):
    with executor(workers=1, grace=1.0) as ex:

        @ct.lattice(executor=ex)
        def wf(pid_file):
            return asks_once_then_ignores(pid_file)

        pid_file = tmp_path / "pid"
        dispatch_id = ct.dispatch(wf)(str(pid_file))
        pid = read_pid(pid_file, 20)
        t0 = time.monotonic()
        ct.cancel(dispatch_id)
        # the cancel is recorded before cancel() returns; the kill waits out the grace
        assert ct.get_result(dispatch_id).status == ct.Status.CANCELLING
        result = ct.get_result(dispatch_id, wait=True, timeout=30)
        took = time.monotonic() - t0
        assert result.status == "CANCELLED"
        assert result.get_node_result(0)["cancel_outcome"] == "killed"
        assert 0.9 <= took < 10, f"grace 1 s, took {took:.2f} s"
        assert wait_gone([pid], 5) == []


def test_cancelling_one_dispatch_leaves_another_on_the_same_executor_alone(tmp_path):
    with executor(workers=2, grace=0.5) as ex:

        @ct.lattice(executor=ex)
        def victim(pid_file):
            return sleeper(30, pid_file)

        @ct.lattice(executor=ex)
        def bystander(pid_file):
            return after(sleeper(1.5, pid_file))

        v = ct.dispatch(victim)(str(tmp_path / "v"))
        b = ct.dispatch(bystander)(str(tmp_path / "b"))
        v_pid, b_pid = read_pid(tmp_path / "v", 20), read_pid(tmp_path / "b", 20)
        ct.cancel(v)
        assert ct.get_result(v, wait=True, timeout=30).status == "CANCELLED"
        assert wait_gone([v_pid], 5) == []
        assert psutil.pid_exists(b_pid)
        result = ct.get_result(b, wait=True, timeout=30)
        assert result.status == "COMPLETED" and result.result == ("after", 1.5)


def test_timeout_counts_from_the_start_not_from_the_queue():
    quick_with_timeout = ct.electron(timeout=1.0)(inc.fn)
    with executor(workers=1, grace=0.5) as ex:

        @ct.lattice(executor=ex)
        def wf():
            # one worker: the second task waits 2 s in the queue, then runs in no time
            return [sleeper(2.0), quick_with_timeout(1)]

        result = ct.dispatch_sync(wf)()
        assert result.status == "COMPLETED", str(result)
        assert result.result == [2.0, 2]
