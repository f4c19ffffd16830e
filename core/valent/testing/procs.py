"""Process facts for tests: what is alive (zombies count as gone), and waiting for it.

Public so that a plugin author's tests can make the same checks valent's own make.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def live_descendants(pid: int | None = None) -> list[psutil.Process]:
    """The non-zombie descendants of this process (or of ``pid``)."""
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


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if alive(p)]
    return left


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.01) -> Any:
    """Poll ``pred()`` until it returns something truthy (returned) or ``timeout`` seconds
    pass (then its last, falsy, answer). The one wait of every valent test suite."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees all of it or no file (tasks use this
    to tell a test their pid or that they ran)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_pids(path: str | os.PathLike[str], timeout: float = 10.0) -> list[int]:
    """The pids a task wrote to ``path`` (whitespace-separated), waiting for the file."""
    path = os.fspath(path)
    text = wait_until(lambda: os.path.exists(path) and open(path).read().strip(), timeout)
    assert text, f"the task never wrote {path}"
    return [int(x) for x in text.split()]


def read_pid(path: str | os.PathLike[str], timeout: float = 10.0) -> int:
    """The pid a task wrote to ``path``, waiting for the file."""
    return read_pids(path, timeout)[0]


def pgid(pid: int) -> int | None:
    """The process group of ``pid``, or None once it is gone."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
