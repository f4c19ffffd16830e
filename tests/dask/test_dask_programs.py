"""The cluster valent starts (scheduler and workers as their own programs), and clusters it
does not own (``dask scheduler`` / ``dask worker`` programs, connected to by address).

Scripts run as real subprocesses; every process they (or a test) start is found by PID or by
the ``VALENT_TEST_TAG`` environment variable it inherits, and must be gone at the end.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid

import cloudpickle
import dask_tasks as T
import pytest
import valent
import valent as ct
from dask_support import (
    DaskPrograms,
    NetnsHost,
    Runner,
    alive,
    descendants,
    end_pids,
    free_port,
    tagged_processes,
    wait_until,
)
from valent import CancelOutcome, Status
from valent.testing.procs import read_pids
from valent.testing.procs import write_atomic as _write

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ------------------------------------------------------------------ scripts valent owns


def _run_script(tmp_path, code: str, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess,
                                                                       str, float]:
    """Run ``code`` as a script file in its own results dir; return (proc, tag, seconds)."""
    script = tmp_path / f"script_{uuid.uuid4().hex[:6]}.py"
    script.write_text(textwrap.dedent(code))
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "VALENT_CONFIG"}
    env.update(VALENT_RESULTS_DIR=str(tmp_path / "results"), VALENT_TEST_TAG=tag)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=str(tmp_path),
    )
    return proc, tag, time.monotonic() - t0


def _no_tagged_left(tag: str) -> None:
    left: list[str] = []
    if not wait_until(lambda: not tagged_processes(tag), 20, 0.1):
        procs = tagged_processes(tag)
        for p in procs:
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            except Exception:  # noqa: BLE001 - it ended meanwhile
                left.append(str(p.pid))
        end_pids([p.pid for p in procs])  # clean up, then fail
    assert not left, f"left behind: {left}"


def _dispatch_count(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "results" / "valent.db") as db:
        return db.execute("SELECT COUNT(*) FROM dispatches").fetchone()[0]


PLAIN_SCRIPT = """
import valent as ct

@ct.electron(executor="dask")
def add(a, b):
    return a + b

@ct.lattice
def flow(x):
    return add(add(x, 1), 2)

d = ct.dispatch(flow)(1)
r = ct.get_result(d, wait=True)
print("RESULT", r.status, r.result)
"""


def test_plain_script_without_main_guard_just_works(tmp_path):
    """Issue 12 #11: no ``if __name__ == "__main__":``, as Covalent users write scripts."""
    proc, tag, _ = _run_script(tmp_path, PLAIN_SCRIPT)
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["RESULT", "COMPLETED", "4"], proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "Nanny" not in proc.stderr, proc.stderr
        assert _dispatch_count(tmp_path) == 1, "the script ran more than once"
    finally:
        _no_tagged_left(tag)


TWO_CLUSTERS = """
import valent as ct

kill = ct.executors.DaskExecutor(n_workers=1, cancel_mode="kill")
finish = ct.executors.DaskExecutor(n_workers=1, cancel_mode="finish")

@ct.electron(executor=kill)
def a(x):
    return x + 1

@ct.electron(executor=finish)
def b(x):
    return x * 10

@ct.lattice
def flow(x):
    return b(a(x))

r = ct.dispatch_sync(flow)(1)
print("RESULT", r.status, r.result, flush=True)
# no shutdown(): exit must end both clusters, within seconds
"""


def test_exit_after_two_own_clusters_is_prompt_and_clean(tmp_path):
    """Issue 12 #12: a kill-mode and a finish-mode cluster in one script; exit did hang."""
    for _ in range(3):
        proc, tag, took = _run_script(tmp_path, TWO_CLUSTERS, timeout=60)
        try:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.split() == ["RESULT", "COMPLETED", "20"], proc.stdout
            assert "Traceback" not in proc.stderr, proc.stderr
        finally:
            _no_tagged_left(tag)


OWNER_DIES = """
import os, sys, time
import valent as ct

ex = ct.executors.DaskExecutor(n_workers=1, cancel_mode=sys.argv[1])

@ct.electron(executor=ex)
def sleeper(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

@ct.lattice
def flow(path):
    return sleeper(path)

ct.dispatch(flow)(sys.argv[2])
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_own_cluster_dies_with_its_owner(tmp_path, how, mode):
    """Whatever ends the owner (kill -9, SIGTERM), no process of its cluster outlives it."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER_DIES)
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "VALENT_CONFIG"}
    owner_tmp = tmp_path / "owner-tmp"  # where the cluster's folder goes (TMPDIR)
    owner_tmp.mkdir()
    env.update(VALENT_RESULTS_DIR=str(tmp_path / "results"), VALENT_TEST_TAG=tag,
               TMPDIR=str(owner_tmp))
    pidfile = str(tmp_path / "task.pid")
    owner = subprocess.Popen(
        [sys.executable, str(script), mode, pidfile], env=env, cwd=str(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: os.path.exists(pidfile), 90, 0.05), "the task never started"
        task = int(open(pidfile).read())
        assert list(owner_tmp.glob("valent-dask-*"))
        os.kill(owner.pid, getattr(signal, how))
        owner.wait(60)
        assert wait_until(lambda: not alive(task), 30, 0.1), "the task outlived its owner"
        assert wait_until(lambda: not list(owner_tmp.glob("valent-dask-*")), 30, 0.1), (
            "the dead owner's cluster folder was left behind")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        _no_tagged_left(tag)


def test_own_cluster_that_cannot_start_says_why(monkeypatch):
    """A scheduler program that fails at start: one clear error with its log, no process."""
    # a real fault: the scheduler program cannot import its configured preload module
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__PRELOAD", '["valent_no_such_preload"]')
    before = set(descendants())
    ex = valent.executors.DaskExecutor(n_workers=1, connect_timeout=60)
    try:
        state = Runner(ex).call(T.add, 1, 2, timeout=90)
    finally:
        ex.shutdown()
    assert isinstance(state, valent.Failed)
    assert isinstance(state.error, valent.ExecutorError)
    msg = str(state.error)
    assert "scheduler program" in msg and "valent_no_such_preload" in msg, msg
    assert wait_until(lambda: not set(descendants()) - before, 20, 0.1), (
        f"left behind: {set(descendants()) - before}"
    )


def test_dependent_of_a_node_whose_cluster_cannot_start_is_cancelled_upstream():
    """Issue 12 #4 for Dask: the head FAILS with the start error; its dependent is CANCELLED
    with reason "upstream", not FAILED."""
    ex = ct.executors.DaskExecutor(
        scheduler_address=f"tcp://127.0.0.1:{free_port()}", connect_timeout=1
    )

    @ct.electron(executor=ex)
    def head(x):
        return x + 1

    @ct.electron(executor=ex)
    def tail(x):
        return x * 2

    @ct.lattice
    def flow(x):
        return tail(head(x))

    try:
        r = ct.get_result(ct.dispatch(flow)(1), wait=True, timeout=60)
    finally:
        ex.shutdown()
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["head"]["status"] == Status.FAILED
    assert "could not start/connect" in str(nodes["head"]["error"])
    assert nodes["tail"]["status"] == Status.CANCELLED, nodes["tail"]
    assert nodes["tail"]["reason"] == "upstream", nodes["tail"]
    assert r.status == Status.FAILED


# ------------------------------------------------------------------ a cluster not ours


@pytest.fixture
def programs(tmp_path):
    """A fresh ``dask scheduler`` + one ``dask worker`` (its own, it is broken on purpose);
    allowed-failures 0, so a worker death fails the task at once instead of re-running it."""
    c = DaskPrograms(
        str(tmp_path), n_workers=1,
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"},
    )
    try:
        yield c
    finally:
        c.stop()


def _sleeper(seconds: float, pid_file: str) -> str:
    """Write our PID and a subprocess's, then sleep."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    _write(pid_file, f"{os.getpid()} {child.pid}")
    time.sleep(seconds)
    child.kill()
    child.wait()
    return "slept"


def _chain_flow(ex, tmp_path):
    @ct.electron(executor=ex)
    def work(seconds):
        return _sleeper(seconds, str(tmp_path / "pids"))

    @ct.electron(executor=ex)
    def after(x):
        return x + "!"

    @ct.lattice
    def flow(seconds):
        return after(work(seconds))

    return flow


@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_workflow_on_dask_programs(programs, mode):
    """Issue 12 #13a: a workflow runs in both modes on a cluster of separate programs."""
    ex = ct.executors.DaskExecutor(scheduler_address=programs.address, cancel_mode=mode)

    @ct.electron(executor=ex)
    def inc(x):
        return x + 1

    @ct.lattice
    def flow(n):
        return [inc(i) for i in range(n)]

    try:
        r = ct.dispatch_sync(flow)(5)
    finally:
        ex.shutdown()
    assert r.status == Status.COMPLETED and r.result == [1, 2, 3, 4, 5]


def test_worker_killed_under_a_running_kill_mode_task(programs, tmp_path):
    """Issue 12 #13b: the worker process is killed (by PID) under a running kill-mode task."""
    ex = ct.executors.DaskExecutor(scheduler_address=programs.address, grace=0.5)
    worker = programs.worker_pids()[0]
    try:
        did = ct.dispatch(_chain_flow(ex, tmp_path))(300)
        task, sub = read_pids(str(tmp_path / "pids"), 60)
        os.kill(worker, signal.SIGKILL)
        r = ct.get_result(did, wait=True, timeout=90)
    finally:
        ex.shutdown()
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["work"]["status"] == Status.FAILED
    assert "WorkerDiedError" in str(nodes["work"]["error"]), nodes["work"]["error"]
    assert nodes["after"]["status"] == Status.CANCELLED
    assert nodes["after"]["reason"] == "upstream"
    assert r.status == Status.FAILED
    assert wait_until(lambda: not alive(task), 20, 0.1), "the task outlived its worker"
    # its own subprocess is in the task's session; the pool child's group dies with it
    assert wait_until(lambda: not alive(sub), 20, 0.1), "the task's subprocess outlived it"


@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_scheduler_restarted_mid_run(programs, tmp_path, mode):
    """Issue 12 #13c: the scheduler is killed and started again while a task runs."""
    ex = ct.executors.DaskExecutor(
        scheduler_address=programs.address, cancel_mode=mode, grace=0.5
    )
    try:
        did = ct.dispatch(_chain_flow(ex, tmp_path))(300)
        task, sub = read_pids(str(tmp_path / "pids"), 60)
        old = programs.scheduler
        end_pids([old.pid])
        old.wait(10)
        programs.start_scheduler()
        t0 = time.monotonic()
        r = ct.get_result(did, wait=True, timeout=120)
        took = time.monotonic() - t0
    finally:
        ex.shutdown()
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["work"]["status"] == Status.FAILED, nodes["work"]
    assert "scheduler" in str(nodes["work"]["error"]), nodes["work"]["error"]
    assert nodes["after"]["status"] == Status.CANCELLED
    assert nodes["after"]["reason"] == "upstream"
    assert r.status == Status.FAILED
    assert took < 100
    if mode == "kill":  # lost work is stopped, not left running on a worker
        assert wait_until(lambda: not alive(task) and not alive(sub), 60, 0.1), (
            "the lost task kept running"
        )


def test_cancel_kills_on_dask_programs(programs, tmp_path):
    """Issue 12 #13d: cancel in kill mode kills the task and its subprocess (by PID)."""
    ex = ct.executors.DaskExecutor(scheduler_address=programs.address, grace=0.5)
    try:
        did = ct.dispatch(_chain_flow(ex, tmp_path))(300)
        task, sub = read_pids(str(tmp_path / "pids"), 60)
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
    finally:
        ex.shutdown()
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["work"]["status"] == Status.CANCELLED
    assert nodes["work"]["cancel_outcome"] == CancelOutcome.KILLED
    assert nodes["work"]["start_time"] is not None
    assert not alive(task) and not alive(sub), "a killed task or its subprocess survived"


# ------------------------------------------------------------------ cancel truth, kill mode


def _mark_then_sleep(marker: str, seconds: float) -> str:
    _write(marker, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def _exit_on_sigterm(marker: str, seconds: float) -> str:
    """A task whose SIGTERM handler exits with an error (as some libraries install)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    _write(marker, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def test_cancel_right_after_dispatch_is_dequeued_unless_the_body_ran(
    dask_cluster, dask_client, tmp_path
):
    """Issue 12 #1 for Dask: cancelled 0-50 ms after dispatch (queued on the scheduler, on a
    worker, or handed to a warm child not up yet), a task whose body did not start is
    ``dequeued``; ``killed`` only with a start time, and its process gone."""
    import random

    from valent_dask.worker_side import close_pools

    ex = ct.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address, grace=0.5)

    @ct.electron(executor=ex)
    def marked(marker):
        return _mark_then_sleep(marker, 60)

    @ct.lattice
    def flow(marker):
        return marked(marker)

    rng = random.Random(1)
    seen = []
    try:
        for i in range(12):
            if i % 2 == 0:  # cold: the next task waits for a fresh warm child
                dask_client.run(close_pools, False)
            marker = tmp_path / f"marker{i}"
            did = ct.dispatch(flow)(str(marker))
            time.sleep(rng.uniform(0, 0.05))
            ct.cancel(did)
            r = ct.get_result(did, wait=True, timeout=60)
            (n,) = [n for n in r.get_all_node_results() if n["node_name"] == "marked"]
            time.sleep(0.3)  # a body that still ran would have written its marker by now
            pid = int(marker.read_text()) if marker.exists() else None
            seen.append(n["cancel_outcome"])
            assert n["status"] == Status.CANCELLED, n
            if n["cancel_outcome"] == CancelOutcome.KILLED:
                assert n["start_time"] is not None, f"run {i}: killed with no start time"
                # its body ran: the marker is its first line (before the fix: "killed" with a
                # made-up start time, and no marker, in 9 of 12 runs)
                assert pid is not None, f"run {i}: killed, but its body never ran"
                assert not alive(pid), f"run {i}: killed, yet it runs"
            else:
                assert n["cancel_outcome"] == CancelOutcome.DEQUEUED, n
                assert n["start_time"] is None, f"run {i}: dequeued with a start time"
                assert pid is None, f"run {i}: dequeued, but its body ran"
    finally:
        ex.shutdown()
    assert CancelOutcome.DEQUEUED in seen, seen  # the window this test is about was hit


def test_sigterm_handler_that_exits_is_still_a_cancel(dask_cluster, dask_client, tmp_path):
    """Issue 12 #2 for Dask kill mode: a task whose SIGTERM handler calls ``sys.exit(1)``
    after a cancel ends CANCELLED (``killed``), not FAILED."""
    ex = ct.executors.DaskExecutor(scheduler_address=dask_cluster.scheduler_address, grace=2)
    marker = tmp_path / "marker"
    r = Runner(ex)
    try:
        h, w = r.start(_exit_on_sigterm, str(marker), 60)
        assert wait_until(marker.exists, 60, 0.02), "the task never started"
        pid = int(marker.read_text())
        assert ex.cancel(h) == CancelOutcome.KILLED
        state = r.wait(h, w, timeout=30)
    finally:
        ex.shutdown()
    assert isinstance(state, valent.Cancelled), state
    assert state.outcome == CancelOutcome.KILLED and state.started_at is not None
    assert not alive(pid)


FORK_SCRIPT = """
import os, sys, threading
import valent

def body(x):
    return x + 1

def run(ex, x):
    woke = threading.Event()
    h = ex.run(valent.Task("fork", x, "body", body, args=(x,)), woke.set)
    while not ex.poll(h).final:
        woke.wait(1); woke.clear()
    return ex.poll(h).get_value()

ex = valent.executors.DaskExecutor(n_workers=1)
print(run(ex, 1), flush=True)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit: atexit runs in the child, which must not touch our cluster
os.waitpid(pid, 0)
print(run(ex, 2), flush=True)
"""


def test_a_forked_child_exiting_leaves_the_owners_cluster_alone(tmp_path):
    """A child made by os.fork() that exits normally runs the atexit hooks it inherited; it
    must not close (or end the programs of) the cluster its parent owns."""
    proc, tag, _ = _run_script(tmp_path, FORK_SCRIPT, timeout=120)
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["2", "3"], (proc.stdout, proc.stderr)
    finally:
        _no_tagged_left(tag)


BUSY_AT_EXIT = """
import os, sys, threading, time
import valent

def body(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

ex = valent.executors.DaskExecutor(n_workers=1, cancel_mode=sys.argv[1])
woke = threading.Event()
h = ex.run(valent.Task("busy", 1, "body", body, args=(sys.argv[2],)), woke.set)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
print("exiting", flush=True)
# exit with the task still running and no shutdown()
"""


@pytest.mark.parametrize("mode", ["kill", "finish"])
def test_exit_with_a_task_still_running_is_prompt(tmp_path, mode):
    """Exit finishes within seconds whatever runs (a finish-mode body cannot be interrupted:
    its worker is ended with the cluster), and leaves no process."""
    script = tmp_path / "busy.py"
    script.write_text(BUSY_AT_EXIT)
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "VALENT_CONFIG"}
    env.update(VALENT_RESULTS_DIR=str(tmp_path / "results"), VALENT_TEST_TAG=tag)
    owner = subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path / "task.pid")], env=env,
        cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "exiting", owner.stderr.read()
        t0 = time.monotonic()
        owner.wait(60)
        took = time.monotonic() - t0
        assert owner.returncode == 0, owner.stderr.read()
        assert took < 30, f"exit took {took:.1f} s"  # ~1-4 s expected
        assert "Traceback" not in owner.stderr.read()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        _no_tagged_left(tag)


@pytest.fixture
def remote_programs(tmp_path):
    """``dask scheduler`` here and a ``dask worker`` on a simulated second host (a network
    namespace, reached over its own address); allowed-failures 0."""
    try:
        host = NetnsHost()
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot simulate a second host with ip netns: {exc}")
    host_tmp = tmp_path / "host-tmp"  # the other host's own /tmp: what a host death leaves
    host_tmp.mkdir()                     # there (the worker's pool folder) stays there
    try:
        c = DaskPrograms(
            str(tmp_path), n_workers=1,
            env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0", "TMPDIR": str(host_tmp)},
            host=host.host_ip, worker_host=host.ip, worker_prefix=host.prefix,
        )
        try:
            yield c
        finally:
            c.stop()
    finally:
        host.close()


def test_worker_on_another_host_cancel_and_host_death(remote_programs, tmp_path):
    """Kill mode with a worker on another (simulated) host: a cancel kills the task and its
    subprocess; then the host dies under a running task (every process started there is
    killed): the task FAILS with WorkerDiedError, its dependent is CANCELLED upstream."""
    with remote_programs.client() as c:
        (addr,) = c.scheduler_info()["workers"]
    assert remote_programs.worker_host in addr  # the worker really is on the other address
    ex = ct.executors.DaskExecutor(scheduler_address=remote_programs.address, grace=0.5)
    flow = _chain_flow(ex, tmp_path)
    try:
        did = ct.dispatch(flow)(300)
        task, sub = read_pids(str(tmp_path / "pids"), 60)
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
        work = next(n for n in r.get_all_node_results() if n["node_name"] == "work")
        assert work["status"] == Status.CANCELLED and work["cancel_outcome"] == "killed"
        assert wait_until(lambda: not alive(task) and not alive(sub), 10, 0.05)

        os.unlink(tmp_path / "pids")
        did = ct.dispatch(flow)(300)
        task, sub = read_pids(str(tmp_path / "pids"), 60)
        end_pids([p for w in remote_programs.workers for p in _tree(w.pid)], grace=0)
        r = ct.get_result(did, wait=True, timeout=90)
    finally:
        ex.shutdown()
    nodes = {n["node_name"]: n for n in r.get_all_node_results()}
    assert nodes["work"]["status"] == Status.FAILED
    assert "WorkerDiedError" in str(nodes["work"]["error"]), nodes["work"]["error"]
    assert nodes["after"]["status"] == Status.CANCELLED
    assert nodes["after"]["reason"] == "upstream"


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the processes started on the simulated host)."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


OWNER_OF_A_REMOTE_TASK = """
import os, subprocess, sys, time
import valent as ct

ex = ct.executors.DaskExecutor(scheduler_address=sys.argv[1], cancel_mode="kill")

@ct.electron(executor=ex)
def sleeper(path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(path + ".tmp", path)
    time.sleep(300)

@ct.lattice
def flow(path):
    return sleeper(path)

ct.dispatch(flow)(sys.argv[2])
time.sleep(300)
"""


def test_kill_mode_task_on_a_cluster_not_ours_dies_with_its_owner(programs, tmp_path):
    """The dispatching process is killed (-9) while its kill-mode task runs on a cluster it
    does not own: the scheduler lets go of the task's key, and the task's processes end."""
    script = tmp_path / "remote_owner.py"
    script.write_text(OWNER_OF_A_REMOTE_TASK)
    env = {k: v for k, v in os.environ.items() if k != "VALENT_CONFIG"}
    env["VALENT_RESULTS_DIR"] = str(tmp_path / "results")
    pidfile = str(tmp_path / "pids")
    owner = subprocess.Popen(
        [sys.executable, str(script), programs.address, pidfile], env=env, cwd=str(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        task, sub = read_pids(pidfile, 60)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
        assert wait_until(lambda: not alive(task) and not alive(sub), 30, 0.1), (
            "the task outlived its owner on the cluster"
        )
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    ex = ct.executors.DaskExecutor(scheduler_address=programs.address)
    try:  # the worker is still serving
        assert Runner(ex).call(T.add, 1, 2, timeout=60).get_value() == 3
    finally:
        ex.shutdown()
