"""The CLI against a dispatch owned by another process: list, watch, cancel, owner killed.

One Python process (the "owner", a script run as a subprocess) dispatches sleeping Local
tasks and waits; `valent ...` subprocesses look at it and control it through the store.
Each task writes its worker's pid and the pid of a subprocess it started, so the tests can
check with psutil that cancelled (or orphaned) work is really gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from core_support import wait_gone

OWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import valent as ct

    piddir, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    @ct.electron(executor=ct.executors.LocalExecutor(workers=n, grace=0.2))
    def sleeper(i, secs):
        child = subprocess.Popen(["sleep", str(secs + 60)])
        path = os.path.join(piddir, f"{i}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(path + ".tmp", path)
        print(f"sleeper {i} up", flush=True)
        time.sleep(secs)
        child.kill()
        return i

    @ct.electron
    def total(xs):
        return sum(xs)

    @ct.lattice
    def sleepers(n, secs):
        return total([sleeper(i, secs) for i in range(n)])

    dispatch_id = ct.dispatch(sleepers)(n, secs)
    print(dispatch_id, flush=True)
    result = ct.get_result(dispatch_id, wait=True)
    print("FINAL", result.status, flush=True)
    """
)


def valent(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run `valent ARGS` as a user would, with this test's results store."""
    return subprocess.run(
        [sys.executable, "-m", "valent.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=dict(os.environ), **kw,
    )


@contextlib.contextmanager
def valent_bg(*args: str) -> Iterator[subprocess.Popen]:
    """`valent ARGS` running in the background (text pipes); killed if still running after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "valent.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def valent_json(*args: str) -> dict | list:
    res = valent(*args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def read_rest(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The rest of a process's stdout and stderr once it exits (killed after ``timeout``).

    Unlike ``communicate``, keeps what an earlier ``readline`` already buffered.
    """
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        out = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait()
    finally:
        timer.cancel()
    return out, err


class Owner:
    """A dispatching process: its Popen, dispatch id and the pids its tasks wrote."""

    def __init__(self, tmp_path: Path, n: int, secs: float):
        self.n = n
        self.piddir = tmp_path / f"pids-{time.monotonic_ns()}"
        self.piddir.mkdir()
        script = tmp_path / "owner.py"
        script.write_text(OWNER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.piddir), str(n), str(secs)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
        )
        self.dispatch_id = self.proc.stdout.readline().strip()
        assert len(self.dispatch_id) == 36, self.proc.stderr.read()
        self.task_pids: list[int] = []

    def wait_running(self, timeout: float = 30) -> list[int]:
        """Wait until every task wrote its pids; return [worker, child] pids of all."""
        deadline = time.monotonic() + timeout
        files = [self.piddir / f"{i}.pid" for i in range(self.n)]
        while not all(f.exists() for f in files):
            assert time.monotonic() < deadline, f"tasks never started: {os.listdir(self.piddir)}"
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.02)
        self.task_pids = [int(p) for f in files for p in f.read_text().split()]
        return self.task_pids

    def finish(self, timeout: float = 30) -> str:
        """Wait for the owner to exit; its stdout."""
        out, err = read_rest(self.proc, timeout)
        assert self.proc.returncode == 0, err
        return out

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        # the owner's workers die with it (lifeline); their tasks' subprocesses with them
        left = wait_gone(self.task_pids, timeout=10)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"task processes left behind: {left}"


@pytest.fixture
def owner(tmp_path):
    started: list[Owner] = []

    def start(n: int = 2, secs: float = 60.0) -> Owner:
        o = Owner(tmp_path, n, secs)
        started.append(o)
        return o

    yield start
    for o in started:
        o.cleanup()


def test_listed_watched_and_cancelled_from_another_process(owner):
    o = owner(n=3)
    pids = o.wait_running()
    did = o.dispatch_id

    listed = valent_json("list")
    assert [d["dispatch_id"] for d in listed] == [did]
    assert listed[0]["status"] == "RUNNING" and listed[0]["lattice_name"] == "sleepers"
    table = valent("list").stdout
    assert did[:8] in table and "RUNNING" in table and "sleepers" in table

    status = valent_json("status", did[:6])
    assert status["dispatch_id"] == did and status["status"] == "RUNNING"
    assert sorted(n["node_id"] for n in status["nodes"] if n["status"] == "RUNNING") == [0, 3, 6]

    with valent_bg("watch", did[:8], "--interval", "0.1") as watch:
        first = watch.stdout.readline()  # the watcher is following before we cancel
        assert did[:8] in first and "RUNNING" in first

        t0 = time.monotonic()
        res = valent("cancel", did[:8])
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("killed") >= 3, res.stdout
        assert "CANCELLED" in res.stdout and "stopped after" in res.stdout
        assert took < 30, took  # expected well under 1 s (bench_cli_cancel.py)
        assert wait_gone(pids, timeout=5) == [], "cancelled tasks still running"

        out, err = read_rest(watch, timeout=20)
    assert watch.returncode == 0, err
    text = first + out
    for i in (0, 3, 6):
        assert f"sleeper({i}) RUNNING" in text
        assert f"sleeper({i}) CANCELLED (killed)" in text
    assert f"dispatch {did[:8]} ended CANCELLED" in text

    assert "FINAL CANCELLED" in o.finish()
    final = valent_json("status", did)
    assert final["status"] == "CANCELLED"
    assert {n["cancel_outcome"] for n in final["nodes"] if n["name"] == "sleeper"} == {"killed"}


def test_cancel_one_task_then_no_wait(owner):
    o = owner(n=2)
    pids = o.wait_running()
    did = o.dispatch_id

    res = valent("cancel", did, "--task", "0", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["confirmed"] is True
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert by_id[0]["status"] == "CANCELLED" and by_id[0]["cancel_outcome"] == "killed"
    assert 3 not in by_id  # the other sleeper was not a target
    assert by_id[6]["status"] == "CANCELLED"  # `total` depends on task 0
    assert wait_gone(pids[:2], timeout=5) == []
    assert psutil.pid_exists(pids[2]) and psutil.Process(pids[2]).status() != "zombie"

    status = valent_json("status", did)
    assert status["status"] == "RUNNING"
    assert {n["node_id"]: n["status"] for n in status["nodes"]}[3] == "RUNNING"

    res = valent("cancel", did, "--no-wait")
    assert res.returncode == 0 and "cancel requested" in res.stdout, res.stderr
    assert "FINAL CANCELLED" in o.finish()
    assert wait_gone(pids, timeout=5) == []


def test_logs_of_a_running_task_show_its_output_so_far(owner):
    o = owner(n=1)
    o.wait_running()
    did = o.dispatch_id
    deadline = time.monotonic() + 30
    while True:  # the print may land a moment after the pid file
        res = valent("logs", did, "sleeper")
        assert res.returncode == 0, res.stderr
        if "sleeper 0 up" in res.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "sleeper(0) [RUNNING] stdout (so far) ==" in res.stdout, res.stdout
    assert "sleeper 0 up" in res.stdout
    assert "total(" not in valent("logs", did).stdout  # listing all: only tasks with output

    assert valent("cancel", did).returncode == 0
    assert "FINAL CANCELLED" in o.finish()
    res = valent("logs", did, "sleeper")
    assert "sleeper(0) [CANCELLED] stdout ==" in res.stdout, res.stdout  # stored, no "so far"
    assert "sleeper 0 up" in res.stdout
    row = sqlite3.connect(Path(os.environ["VALENT_RESULTS_DIR"]) / "valent.db").execute(
        "SELECT live_output FROM nodes WHERE dispatch_id = ? AND node_id = 0", (did,)
    ).fetchone()
    assert row == (None,)  # the file paths are forgotten once the task ended


def test_logs_follow_prints_output_as_it_comes_until_the_task_ends(owner):
    o = owner(n=1)
    o.wait_running()
    did = o.dispatch_id
    assert valent("logs", did, "--follow").returncode == 1  # which task? NODE is required
    with valent_bg("logs", did[:8], "sleeper", "--follow") as follow:
        first = follow.stdout.readline()  # printed while the task runs
        assert first == "sleeper 0 up\n", first
        assert follow.poll() is None  # still following
        assert valent("cancel", did).returncode == 0
        out, err = read_rest(follow, timeout=20)
    assert follow.returncode == 0, err
    assert "sleeper 0 up" not in out  # not printed twice
    assert "== sleeper(0) ended CANCELLED" in err, err
    assert "FINAL CANCELLED" in o.finish()


def test_owner_killed_is_detected_by_every_reader(owner, results_dir):
    o = owner(n=2)
    pids = o.wait_running()
    did = o.dispatch_id
    o.proc.send_signal(signal.SIGKILL)
    o.proc.wait(timeout=10)

    # its Local workers kill themselves (lifeline pipe), their subprocesses with them
    assert wait_gone(pids, timeout=10) == [], "the dead owner's task processes survived it"

    db = results_dir / "valent.db"

    def stored_status() -> str:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT status FROM dispatches WHERE dispatch_id = ?", (did,)
            ).fetchone()[0]

    def back_to_running() -> None:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE dispatches SET status = 'RUNNING', error = NULL")

    assert stored_status() == "RUNNING"  # nobody has looked yet
    assert valent_json("list")[0]["status"] == "FAILED"

    back_to_running()
    res = valent("watch", did, timeout=30)
    assert res.returncode == 0 and f"dispatch {did[:8]} ended FAILED" in res.stdout

    back_to_running()
    shown = valent_json("show", did)
    assert shown["status"] == "FAILED"

    back_to_running()
    status = valent_json("status", did)
    assert status["status"] == "FAILED"
    assert f"pid {o.proc.pid}" in status["error"] and "killed" in status["error"]
    sleepers = [n for n in status["nodes"] if n["name"] == "sleeper"]
    assert {(n["status"], n["reason"]) for n in sleepers} == {("CANCELLED", "owner process died")}

    back_to_running()
    res = valent("cancel", did)
    assert res.returncode == 0 and "already finished (FAILED)" in res.stdout, res.stdout
    assert "killed before the dispatch finished" in res.stdout
    assert stored_status() == "FAILED"


def test_watch_ctrl_c_leaves_the_dispatch_running(owner):
    o = owner(n=1)
    o.wait_running()
    did = o.dispatch_id
    with valent_bg("watch", did) as watch:
        assert "RUNNING" in watch.stdout.readline()
        watch.send_signal(signal.SIGINT)
        out, err = read_rest(watch, timeout=20)
    assert watch.returncode == 130
    assert "Traceback" not in err and f"dispatch {did[:8]} goes on" in err
    assert valent_json("status", did)["status"] == "RUNNING"
    assert o.proc.poll() is None
    res = valent("cancel", did)
    assert res.returncode == 0, res.stderr
    assert "FINAL CANCELLED" in o.finish()


def test_cancel_not_confirmed_in_time_exits_3(results_dir):
    """An owner that is alive but never answers (not a valent process): exit 3, one line."""
    from valent._store import get_store

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        proc = psutil.Process(sleeper.pid)
        get_store().create_dispatch(
            {
                "dispatch_id": "deadbeef-0000-4000-8000-000000000000",
                "lattice_name": "silent",
                "status": "RUNNING",
                "created_at": time.time(),
                "start_time": time.time(),
                "owner_pid": sleeper.pid,
                "owner_host": __import__("socket").gethostname(),
                "owner_started": proc.create_time(),
                "node_count": 1,
            },
            [{"dispatch_id": "deadbeef-0000-4000-8000-000000000000", "node_id": 0,
              "name": "task", "kind": "electron", "executor": "local", "parents": "[]",
              "status": "RUNNING", "output": None}],
        )
        res = valent("cancel", "deadbeef", "--timeout", "0.5")
        assert res.returncode == 3, (res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
        assert "not confirmed within 0.5s" in res.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
