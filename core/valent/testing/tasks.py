"""Task functions the conformance suite runs on an executor (standard library only).

They communicate with the test through small files in a directory the test owns, written
atomically, so the test can tell when a task started, which PIDs it has, and whether it saw
a cancel request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

STARTED = "started"
"""File a task writes when it starts; its content is the task's PID."""
CHILD = "child.pid"
"""File ``spawn_and_wait`` writes with the PID of the subprocess it started."""
SAW_CANCEL = "saw-cancel"
"""File ``hold`` writes when ``valent.cancel_requested()`` turned True."""
RELEASE = "release"
"""File the test writes to let ``hold`` return."""


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so a reader never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add(a: float, b: float) -> float:
    """Return ``a + b``."""
    return a + b


def fail_with(message: str) -> None:
    """Raise ``ValueError(message)``."""
    raise ValueError(message)


def cancel_flag() -> bool:
    """Return what ``valent.cancel_requested()`` says inside the task."""
    from valent import cancel_requested

    return cancel_requested()


def hold(directory: str, seconds: float = 60.0, *after: object) -> str:
    """Run until released, cancelled or ``seconds`` pass; a cooperative long task.

    Writes ``started`` (its PID), then loops: returns ``"stopped"`` after writing
    ``saw-cancel`` when ``valent.cancel_requested()`` is True, ``"released"`` when the test
    wrote ``release``, or ``"timeout"``. ``after`` only makes a dependency in a workflow.
    """
    from valent import cancel_requested

    d = Path(directory)
    write_atomic(d / STARTED, str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cancel_requested():
            write_atomic(d / SAW_CANCEL, str(os.getpid()))
            return "stopped"
        if (d / RELEASE).exists():
            return "released"
        time.sleep(0.01)
    return "timeout"


def spawn_and_wait(directory: str, seconds: float) -> str:
    """Start a subprocess that sleeps ``seconds``, record both PIDs, wait for it.

    Writes ``child.pid`` and then ``started`` (its own PID). It never calls
    ``cancel_requested()``, so only a real kill stops it early.
    """
    d = Path(directory)
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds!r})"])
    write_atomic(d / CHILD, str(child.pid))
    write_atomic(d / STARTED, str(os.getpid()))
    child.wait()
    return "finished"
