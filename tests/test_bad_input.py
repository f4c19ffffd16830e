"""Bad input a user would try, beyond tests/test_errors.py: huge outputs and arguments,
exits of every kind, and inputs that cannot cross a process boundary."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import valent as ct


def _huge(n):
    return b"v" * n


def _length(blob):
    return len(blob)


def _exit_code(code):
    sys.exit(code)


def _hard_exit(code):
    os._exit(code)


def _inc(x):
    return x + 1


def test_a_two_hundred_megabyte_output_is_kept_and_passed_on(local_executor, results_dir):
    huge = ct.electron(_huge, executor=local_executor)
    length = ct.electron(_length, executor=local_executor)

    @ct.lattice
    def wf(n):
        return length(huge(n))

    n = 200 * 2**20
    r = ct.dispatch_sync(wf)(n)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == n
    node = r.get_node_result(0)
    assert len(node["output"]) == n
    # big outputs live in files beside the store, private to the user
    files = list((results_dir / "outputs").rglob("*.pkl"))
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files)


@pytest.mark.parametrize(
    ("fn", "arg", "expect"),
    [(_exit_code, 3, "SystemExit: 3"), (_hard_exit, 4, "exit code 4")],
)
def test_exits_fail_the_node_and_keep_the_rest(local_executor, fn, arg, expect):
    bad = ct.electron(fn, executor=local_executor)
    inc = ct.electron(_inc, executor=local_executor)

    @ct.lattice
    def wf(x):
        return [bad(x), inc(x)]

    r = ct.dispatch_sync(wf)(arg)
    assert r.status == ct.Status.FAILED
    assert expect in r.get_node_result(0)["error"]
    assert r.get_node_result(2)["output"] == arg + 1  # computed before or beside: kept


def test_an_unpicklable_keyword_argument_names_it(local_executor):
    inc = ct.electron(_inc, executor=local_executor)

    @ct.lattice
    def wf(lock):
        return inc(x=lock)

    with pytest.raises(ct.PicklingError) as info:
        ct.dispatch(wf)(threading.Lock())
    msg = str(info.value)
    assert "argument 'x' of _inc(0)" in msg and "lock" in msg.lower()


def test_a_lattice_that_raises_while_tracing_is_the_users_error():
    @ct.lattice
    def wf(x):
        raise ValueError("bad input to the workflow")

    with pytest.raises(ValueError, match="bad input"):
        ct.dispatch(wf)(1)


def test_bad_executor_settings_are_refused_where_they_are_made():
    with pytest.raises(ValueError, match="workers"):
        ct.executors.LocalExecutor(workers=0)
    with pytest.raises(ValueError, match="grace"):
        ct.executors.LocalExecutor(grace=-1)
    with pytest.raises(ct.ValentError, match="executor must be"):
        ct.electron(_inc, executor=42)
    with pytest.raises(ct.ValentError, match="timeout"):
        ct.electron(_inc, timeout=-5)
    with pytest.raises(ct.ValentError, match="retries"):
        ct.electron(_inc, retries=-1)


def test_get_result_with_a_timeout_leaves_the_dispatch_running(local_executor):
    import time

    def _sleep(s):
        time.sleep(s)
        return s

    sleep = ct.electron(_sleep, executor=local_executor)

    @ct.lattice
    def wf(s):
        return sleep(s)

    did = ct.dispatch(wf)(30)
    with pytest.raises(ct.DispatchTimeoutError, match="goes on"):
        ct.get_result(did, wait=True, timeout=0.2)
    assert ct.get_result(did).status in (ct.Status.RUNNING, ct.Status.NEW_OBJECT)
    ct.cancel(did)
    assert ct.get_result(did, wait=True, timeout=60).status == ct.Status.CANCELLED


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"timeout": 1e10}, "more than 31536000"),  # busy-looped the dispatcher (OverflowError)
        ({"timeout": float("inf")}, "not a finite number"),
        ({"timeout": float("nan")}, "not a finite number"),
        ({"timeout": True}, "not a number"),  # a bool is an int in Python, not one second
        ({"timeout": 0}, "not greater than 0"),
        ({"timeout": "5"}, "not a number"),
        ({"retries": True}, "not a whole number"),
        ({"retries": -1}, "less than 0"),
        ({"retries": 1.0}, "not a whole number"),
        ({"retries": float("inf")}, "not a whole number"),
    ],
)
def test_electron_numbers_are_checked_when_decorated(kwargs, problem):
    (key,) = kwargs
    with pytest.raises(ct.ValentError) as info:
        ct.electron(executor="local", **kwargs)(_inc)
    msg = str(info.value)
    assert "@electron _inc" in msg and f"{key}=" in msg and problem in msg


def test_the_longest_timeout_accepted_runs_normally(local_executor):
    from valent.checks import MAX_SECONDS

    inc = ct.electron(_inc, executor=local_executor, timeout=MAX_SECONDS, retries=2)
    assert inc.timeout == MAX_SECONDS  # one year: the bound itself must not overflow timers

    @ct.lattice
    def wf(x):
        return inc(x)

    r = ct.dispatch_sync(wf)(1)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == 2
