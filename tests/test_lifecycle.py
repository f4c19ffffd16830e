"""Ctrl-C, SIGTERM and fork, in real processes (valent.lifecycle).

The first Ctrl-C (or SIGTERM) in a script waiting for its dispatch cancels what the process
owns, waits for the stop to be confirmed, prints one line (no traceback) and exits 130 (143
for SIGTERM). A child made by ``os.fork()`` gets its own dispatcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import valent as ct
from core_support import wait_gone, wait_until

SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import valent as ct

    piddir, how = sys.argv[1], sys.argv[2]

    @ct.electron
    def sleeper(i):
        child = subprocess.Popen(["sleep", "60"])
        path = os.path.join(piddir, f"{i}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid}")
        os.replace(path + ".tmp", path)
        time.sleep(60)
        return i

    @ct.electron
    def total(xs):
        return sum(xs)

    @ct.lattice
    def wf():
        return total([sleeper(0), sleeper(1), sleeper(2)])

    if how == "sync":
        print(ct.dispatch_sync(wf)().status, flush=True)
    else:
        did = ct.dispatch(wf)()
        print(did, flush=True)
        print(ct.get_result(did, wait=True).status, flush=True)
    print("after", flush=True)
    """
)


def _started(tmp_path, n=2) -> list[int]:
    pids: list[int] = []
    for i in range(n):
        path = tmp_path / f"{i}.pid"
        text = wait_until(lambda path=path: path.exists() and path.read_text(), 60)
        assert text, f"task {i} never started"
        pids += [int(x) for x in text.split()]
    return pids


@pytest.mark.parametrize(
    ("sig", "code", "name", "how"),
    [
        (signal.SIGINT, 130, "Ctrl-C", "sync"),
        (signal.SIGINT, 130, "Ctrl-C", "wait"),
        (signal.SIGTERM, -signal.SIGTERM, "SIGTERM", "sync"),  # 143 in a shell
    ],
)
def test_first_signal_cancels_what_the_script_owns_and_exits(tmp_path, sig, code, name, how):
    """#9: one signal stops the work: truthful outcomes, processes gone, one line, exit."""
    script = tmp_path / "owner.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pids = _started(tmp_path)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"valent: {name}: cancelled"), err
    assert "killed" in lines[0], err
    assert "after" not in out  # the script did not go on as if the run had finished
    assert wait_gone(pids, 10) == []
    from valent._store import get_store

    (row,) = get_store().list_dispatches()
    result = ct.get_result(row["dispatch_id"])
    assert result.status == "CANCELLED", result.error
    outcomes = {n["node_name"]: n["cancel_outcome"] for n in result.get_all_node_results()
                if n["node_name"] == "sleeper"}
    assert set(outcomes.values()) <= {"killed", "dequeued"}


FORKED = textwrap.dedent(
    """
    import multiprocessing, os, sys
    import valent as ct

    @ct.electron
    def add(a, b):
        return a + b

    @ct.lattice
    def wf(a, b):
        return add(a, b)

    # the parent uses valent first, so the child inherits a dispatcher and store
    assert ct.dispatch_sync(wf)(1, 2).result == 3

    def child(tag):
        did = ct.dispatch(wf)(20, 22)
        r = ct.get_result(did, wait=True, timeout=60)
        print(tag, r.status, r.result, os.getpid(), flush=True)
        print(tag, "cancel:", ct.cancel(did), flush=True)

    if sys.argv[1] == "os.fork":
        pid = os.fork()
        if pid == 0:
            try:
                child("fork")
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    else:
        p = multiprocessing.get_context("fork").Process(target=child, args=("mp",))
        p.start()
        p.join(90)
        assert p.exitcode == 0, p.exitcode
    print("parent", ct.dispatch_sync(wf)(2, 3).result, flush=True)
    """
)


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_forked_child_gets_its_own_dispatcher(tmp_path, how):
    """#8: dispatch, wait and cancel work in the child; the dispatch is the child's."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    out = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=120,
        env={**os.environ, "VALENT_RESULTS_DIR": str(tmp_path / "results")},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    tag = "fork" if how == "os.fork" else "mp"
    (mine,) = [line for line in lines if line.startswith(f"{tag} COMPLETED")]
    _, _, value, child_pid = mine.split()
    assert value == "42"
    assert any(line.startswith(f"{tag} cancel:") and "already finished" in line for line in lines)
    assert "parent 5" in lines
    from valent._store import get_store

    store = get_store(tmp_path / "results")
    owners = {r["owner_pid"] for r in store.list_dispatches(limit=10)}
    assert int(child_pid) in owners, (owners, child_pid)
