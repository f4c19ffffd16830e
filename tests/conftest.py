"""Shared fixtures: a private results dir per test, and a check that no process is left."""

from __future__ import annotations

import time

import pytest
from core_support import live_descendants, read_pid, wait_gone, wait_until  # noqa: F401


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    """Every test gets its own results store (and no user config)."""
    d = tmp_path / "results"
    monkeypatch.setenv("VALENT_RESULTS_DIR", str(d))
    monkeypatch.setenv("VALENT_CONFIG", "")
    monkeypatch.delenv("VALENT_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return d


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

