"""Several processes, one store: read results from another process (while running and after
the owner exited), cancel from another process, and an owner killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import valent as ct
from core_support import wait_gone, wait_until

OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import valent as ct

    piddir, mode = sys.argv[1], sys.argv[2]

    @ct.electron
    def sleeper(i, secs):
        child = subprocess.Popen(["sleep", "60"])
        path = os.path.join(piddir, f"{i}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(path + ".tmp", path)
        time.sleep(secs)
        return i

    @ct.electron
    def add(a, b):
        return a + b

    @ct.lattice
    def wf(secs):
        return add(sleeper(0, secs), sleeper(1, secs))

    dispatch_id = ct.dispatch(wf)(float(sys.argv[3]))
    print(dispatch_id, flush=True)
    if mode == "wait":
        print(ct.get_result(dispatch_id, wait=True).status, flush=True)
    # mode "exit": leave at once; the interpreter waits for the dispatch at exit
    """
)


def _read(code: str, dispatch_id: str) -> str:
    """Run ``code`` in a fresh Python with ``r = ct.get_result(dispatch_id)``; its stdout."""
    script = f"import valent as ct\nr = ct.get_result({dispatch_id!r})\n{code}"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _owner(tmp_path, mode: str, secs: float) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), mode, str(secs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    dispatch_id = proc.stdout.readline().strip()
    assert len(dispatch_id) == 36, proc.stderr.read() if proc.poll() is not None else dispatch_id
    return proc, dispatch_id


def _task_pids(tmp_path, n=2) -> list[int]:
    pids = []
    for i in range(n):
        path = tmp_path / f"{i}.pid"
        text = wait_until(lambda path=path: path.exists() and path.read_text(), 30)
        assert text, f"task {i} never started"
        pids += [int(x) for x in text.split()]
    return pids


@ct.electron
def gated(gate, value):
    while not os.path.exists(gate):
        time.sleep(0.02)
    return value * 2


@ct.electron
def quick(x):
    return x + 1


@ct.lattice
def gated_flow(gate, value):
    return {"doubled": gated(gate, value), "quick": quick(value)}


def test_results_read_from_another_process_while_running_and_after(tmp_path):
    gate = tmp_path / "gate"
    dispatch_id = ct.dispatch(gated_flow)(str(gate), 21)

    def gated_runs_quick_done():
        statuses = ct.get_result(dispatch_id).node_statuses()
        return statuses["gated(0)"] == "RUNNING" and statuses["quick(3)"] == "COMPLETED"

    assert wait_until(gated_runs_quick_done, 20)
    seen = _read(
        "print(r.status, r.get_node_result(0)['status'], r.get_all_node_outputs()['quick(3)'])",
        dispatch_id,
    )
    assert seen == "RUNNING RUNNING 22"  # the independent branch is done, the gated one runs
    gate.write_text("open")
    assert ct.get_result(dispatch_id, wait=True, timeout=30).status == "COMPLETED"
    assert _read("print(r.status, r.result)", dispatch_id) == (
        "COMPLETED {'doubled': 42, 'quick': 22}"
    )


def test_results_outlive_the_dispatching_process(tmp_path):
    proc, dispatch_id = _owner(tmp_path, "exit", 0.2)
    assert proc.wait(60) == 0, proc.stderr.read()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"
    result = ct.get_result(dispatch_id)
    assert result.status == "COMPLETED" and result.result == 1
    assert result.get_all_node_outputs()["sleeper(0)"] == 0
    assert _read("print(r.status, r.result)", dispatch_id) == "COMPLETED 1"
    assert wait_gone(_task_pids(tmp_path)) == []  # the owner's workers went with it


def test_cancel_from_another_process_reaches_the_owner(tmp_path):
    proc, dispatch_id = _owner(tmp_path, "wait", 60)
    try:
        pids = _task_pids(tmp_path)
        t0 = time.monotonic()
        msg = ct.cancel(dispatch_id)  # this process does not own it: goes through the store
        assert "cancel requested" in msg and str(proc.pid) in msg
        result = ct.get_result(dispatch_id, wait=True, timeout=30)
        took = time.monotonic() - t0
        assert result.status == "CANCELLED"
        assert took < 15, f"cross-process cancel took {took:.1f} s"
        for node in result.get_all_node_results():
            if node["node_name"] == "sleeper":
                assert node["status"] == "CANCELLED" and node["cancel_outcome"] == "killed"
        assert wait_gone(pids, 5) == []  # workers and their grandchildren
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == "CANCELLED"  # the owner saw its own dispatch end CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cancel_of_chosen_tasks_from_another_process_of_a_dispatch_owned_here(tmp_path):
    gate = tmp_path / "never-opened"
    dispatch_id = ct.dispatch(gated_flow)(str(gate), 1)
    assert wait_until(
        lambda: ct.get_result(dispatch_id).get_node_result(0)["status"] == "RUNNING", 20
    )
    out = _read(f"print(ct.cancel({dispatch_id!r}, task_ids=[0]))", dispatch_id)
    assert "cancel requested" in out and str(os.getpid()) in out
    result = ct.get_result(dispatch_id, wait=True, timeout=30)
    assert result.status == "CANCELLED"
    assert result.get_node_result(0)["cancel_outcome"] == "killed"
    quick_node = result.get_node_result(3)
    assert quick_node["status"] == "COMPLETED" and quick_node["output"] == 2


def test_owner_killed_mid_run_is_reported_failed_not_running(tmp_path):
    proc, dispatch_id = _owner(tmp_path, "wait", 60)
    pids = _task_pids(tmp_path)
    assert ct.get_result(dispatch_id).status == "RUNNING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    proc.stderr.close()
    result = ct.get_result(dispatch_id)
    assert result.status == "FAILED"
    assert "killed" in result.error and str(proc.pid) in result.error
    for node in result.get_all_node_results():
        if node["node_name"] != "add" and not node["node_name"].startswith(":"):
            assert node["status"] == "CANCELLED" and node["reason"] == "owner process died"
    assert ct.get_result(dispatch_id, wait=True, timeout=10).status == "FAILED"
    assert "already finished" in ct.cancel(dispatch_id)
    # the owner's workers and their subprocesses do not outlive it
    assert wait_gone(pids, 10) == []


def test_exit_waits_for_a_running_dispatch_and_ctrl_c_cancels_it(tmp_path):
    proc, dispatch_id = _owner(tmp_path, "exit", 60)  # the script ends at once
    try:
        pids = _task_pids(tmp_path)
        time.sleep(0.3)
        assert proc.poll() is None  # waiting for its dispatch at exit, not gone
        assert ct.get_result(dispatch_id).status == "RUNNING"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert "waiting for 1 running dispatch" in err and "Ctrl-C: cancelled" in err, err
        assert "Traceback" not in err, err
        assert proc.returncode == 130
        result = ct.get_result(dispatch_id, wait=True, timeout=10)
        assert result.status == "CANCELLED", result.error
        assert {n["cancel_outcome"] for n in result.get_all_node_results()} >= {"killed"}
        assert wait_gone(pids, 5) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
