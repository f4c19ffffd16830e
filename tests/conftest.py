"""Shared fixtures: a private results dir per test, and a check that no process is left."""

from __future__ import annotations

import os
import time

import psutil
import pytest


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    """Every test gets its own results store (and no user config)."""
    d = tmp_path / "results"
    monkeypatch.setenv("VALENT_RESULTS_DIR", str(d))
    monkeypatch.setenv("VALENT_CONFIG", "")
    monkeypatch.delenv("VALENT_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return d


def live_descendants(pid: int | None = None) -> list[psutil.Process]:
    """Non-zombie descendants of this process (or ``pid``)."""
    try:
        procs = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); return those left."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.02)
    return left


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def local_executor():
    """A fresh LocalExecutor shut down after the test (its workers must all be gone)."""
    import valent as ct

    ex = ct.executors.LocalExecutor(workers=2, grace=0.5)
    yield ex
    pids = ex.pool.worker_pids() if ex._pool is not None else []
    ex.shutdown()
    assert wait_gone(pids) == [], "LocalExecutor left worker processes behind"


@pytest.fixture(scope="session", autouse=True)
def no_processes_left():
    """At the end of the session, every process the tests started must be gone."""
    yield
    from valent import api

    if api._dispatcher is not None:
        api._dispatcher.shutdown_executors()
    deadline = time.monotonic() + 15
    left = live_descendants()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = live_descendants()
    assert not left, "processes left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in left
    )


def wait_for(predicate, timeout: float = 10.0, every: float = 0.02):
    """Poll ``predicate()`` until it returns something truthy (returned) or ``timeout`` passes
    (then None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def read_pid(path, timeout: float = 10.0) -> int:
    """The pid a task wrote to ``path`` (waiting for the file to appear)."""
    text = wait_for(lambda: path.exists() and path.read_text().strip(), timeout)
    assert text, f"the task never wrote {path}"
    return int(text)
