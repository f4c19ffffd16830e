"""Process helpers for the core tests, importable by name from any test module.

(``from conftest import ...`` is ambiguous once tests/ssh and tests/dask have their own
conftest.py: whichever was imported last answers. conftest.py re-exports these.)
"""

from __future__ import annotations

import os
import time

import psutil


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
