"""Faults: a worker SIGKILLed from outside, a full or read-only results disk, two processes on
one store. The disk faults use a real tmpfs mounted by the test (root only; skipped where
mounting is not allowed)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import valent as ct
from core_support import wait_gone


def _pid_task(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def _quick(x):
    return x + 1


def _big(n_bytes):
    return b"x" * n_bytes


def _wait_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_worker_sigkilled_from_outside_fails_its_node_with_the_signal(tmp_path, local_executor):
    pid_task = ct.electron(_pid_task, executor=local_executor)
    quick = ct.electron(_quick, executor=local_executor)

    @ct.lattice
    def wf(path):
        return [pid_task(path, 60), quick(1)]

    path = str(tmp_path / "pid")
    did = ct.dispatch(wf)(path)
    _wait_file(path)
    worker = int(open(path).read())
    os.kill(worker, signal.SIGKILL)
    r = ct.get_result(did, wait=True, timeout=60)
    assert r.status == ct.Status.FAILED
    node = r.get_node_result(0)
    assert node["status"] == ct.Status.FAILED
    assert "SIGKILL" in node["error"] and "died" in node["error"]
    assert r.get_node_result(3)["output"] == 2  # the other branch completed and is kept
    assert wait_gone([worker]) == []
    # the pool replaced the worker: the next dispatch runs
    @ct.lattice
    def after(x):
        return quick(x)

    assert ct.dispatch_sync(after)(1).result == 2


# ---------------------------------------------------------------------- disk faults


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs: a results disk that fills up (and can be made read-only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        _release_stores(mnt)
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def _release_stores(mnt) -> None:
    """Close every connection this process holds to a store under ``mnt`` (all threads)."""
    from valent import _store as store_mod
    from valent.api import get_dispatcher

    mine = [k for k in store_mod._stores if str(k).startswith(str(mnt))]
    stores = [store_mod._stores[k] for k in mine]
    get_dispatcher().call(lambda: [s.close() for s in stores])  # the dispatcher thread's
    for k in mine:
        store_mod._stores.pop(k).close()  # and this thread's


def _integrity(db: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_disk_full_fails_the_dispatch_cleanly_and_keeps_what_was_stored(
    tiny_disk, monkeypatch, local_executor
):
    results = tiny_disk / "results"
    monkeypatch.setenv("VALENT_RESULTS_DIR", str(results))
    quick = ct.electron(_quick, executor=local_executor)
    big = ct.electron(_big, executor=local_executor)

    @ct.lattice
    def first(x):
        return quick(x)

    done = ct.dispatch_sync(first)(41)
    assert done.status == ct.Status.COMPLETED and done.result == 42

    @ct.lattice
    def overflowing(n):
        return [quick(1), big(n)]

    did = ct.dispatch(overflowing)(3 * 1024 * 1024)  # 3 MiB output on a 2 MiB disk
    try:
        r = ct.get_result(did, wait=True, timeout=60)
    except ct.StoreError as exc:  # the store could not even record the failure
        assert "disk" in str(exc).lower() or "full" in str(exc).lower(), exc
    else:
        assert r.status == ct.Status.FAILED
        node = [n for n in r.get_all_node_results() if n["node_name"] == "_big"][0]
        assert node["status"] == ct.Status.FAILED
        assert "could not be stored" in node["error"]
        assert "space" in node["error"].lower() or "full" in node["error"].lower()
    # what was stored before is intact and readable
    again = ct.get_result(done.dispatch_id)
    assert again.status == ct.Status.COMPLETED and again.result == 42
    assert _integrity(str(results / "valent.db")) == "ok"


def test_read_only_results_dir_is_a_clear_error_and_loses_nothing(
    tiny_disk, monkeypatch, local_executor
):
    results = tiny_disk / "results"
    monkeypatch.setenv("VALENT_RESULTS_DIR", str(results))
    quick = ct.electron(_quick, executor=local_executor)

    @ct.lattice
    def first(x):
        return quick(x)

    done = ct.dispatch_sync(first)(1)
    assert done.result == 2
    _release_stores(tiny_disk)  # so that the file system can be remounted read-only
    res = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {res.stderr.strip()}")
    try:
        # what was stored is still readable
        again = ct.get_result(done.dispatch_id)
        assert again.status == ct.Status.COMPLETED and again.result == 2
        # a new dispatch is refused with a clear error, and nothing is half-written
        with pytest.raises(ct.StoreError) as info:
            ct.dispatch(first)(5)
        assert "results store" in str(info.value) and "writable" in str(info.value)
        assert "readonly" in str(info.value)
        assert ct.get_result(done.dispatch_id).result == 2
    finally:
        _release_stores(tiny_disk)
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_disk)], check=True)
    assert _integrity(str(results / "valent.db")) == "ok"


# ---------------------------------------------------------------------- one store, two processes

WRITER = textwrap.dedent(
    """
    import sys, valent as ct

    def inc(x):
        return x + 1

    inc_e = ct.electron(inc)

    @ct.lattice
    def wf(n, tag):
        return [inc_e(i) for i in range(n)]

    ids = [ct.dispatch(wf)(20, sys.argv[1]) for _ in range(10)]
    for i in ids:
        r = ct.get_result(i, wait=True, timeout=120)
        assert r.status == "COMPLETED", r
        assert r.result == list(range(1, 21)), r.result
    print(" ".join(ids))
    """
)


def test_two_processes_dispatch_and_read_one_store(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ)
    procs = [
        subprocess.Popen([sys.executable, str(script), f"p{k}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for k in range(2)
    ]
    # meanwhile this process reads the same store and dispatches too
    quick = ct.electron(_quick)

    @ct.lattice
    def mine(x):
        return quick(x)

    mine_ids = []
    while any(p.poll() is None for p in procs):
        mine_ids.append(ct.dispatch(mine)(len(mine_ids)))
        for row in ct.get_result(mine_ids[-1]).get_all_node_results():
            assert row["status"] in set(ct.Status)
        time.sleep(0.05)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    theirs = [i for out, _ in outs for i in out.split()]
    assert len(theirs) == 20 and all(uuid.UUID(i) for i in theirs)
    for did in theirs:
        r = ct.get_result(did)
        assert r.status == ct.Status.COMPLETED and r.result == list(range(1, 21))
    for k, did in enumerate(mine_ids):
        assert ct.get_result(did, wait=True, timeout=60).result == k + 1
