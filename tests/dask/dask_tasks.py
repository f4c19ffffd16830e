"""Task functions for the Dask executor tests (pickled by value: workers cannot import tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import valent
from valent.testing.procs import write_atomic as _write


def add(a, b=0):
    return a + b


def noop():
    return None


def shout(text):
    print(text)
    print("to stderr", file=sys.stderr)
    subprocess.run([sys.executable, "-c", f"print('child says {text}')"], check=True)
    return len(text)


def boom(msg):
    raise ValueError(msg)


def whoami():
    """PID of the process running the body and of its parent."""
    return os.getpid(), os.getppid()


def sleep_then_mark(seconds: float, pid_file: str, marker: str, spawn: bool = False):
    """Write our PID (and a child's) to ``pid_file``, sleep, then write ``marker``."""
    pids = [os.getpid()]
    child = None
    if spawn:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        pids.append(child.pid)
    _write(pid_file, " ".join(map(str, pids)))
    time.sleep(seconds)
    _write(marker, "done")
    if child is not None:
        child.kill()
        child.wait()
    return "slept"


def cooperative(seconds: float, pid_file: str):
    """Loop until ``valent.cancel_requested()``; return how we ended."""
    _write(pid_file, str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if valent.cancel_requested():
            return "stopped-cooperatively"
        time.sleep(0.01)
    return "ran-out"


def cooperative_mark(seconds: float, pid_file: str, marker: str):
    """Like ``cooperative``, writing what it saw to ``marker`` (kill mode: no return path)."""
    out = cooperative(seconds, pid_file)
    _write(marker, out)
    return out


def count_attempts_and_sleep(path: str, seconds: float):
    """Append a line per attempt to ``path`` (with our worker's PID), then sleep."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {os.getppid()}\n")
    time.sleep(seconds)
    return "finished"


def kill_my_worker_once(path: str, in_child: bool):
    """First attempt: SIGKILL the Dask worker running us; later attempts: return the count."""
    import signal

    with open(path, "a") as f:
        f.write("attempt\n")
    with open(path) as f:
        n = len(f.read().splitlines())
    if n == 1:
        os.kill(os.getppid() if in_child else os.getpid(), signal.SIGKILL)
        time.sleep(30)
    return n


def mark_and_wait(folder: str, i: int, seconds: float):
    """Write our PID to ``folder/i`` (so a test counts which tasks ran), then wait ``seconds``
    or until ``valent.cancel_requested()``; return ``i``."""
    _write(os.path.join(folder, str(i)), str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not valent.cancel_requested():
        time.sleep(0.01)
    return i


def fail_some(i: int):
    """``i``, or a ValueError for every fifth task."""
    if i % 5 == 3:
        raise ValueError(f"task {i} fails")
    return i


cloudpickle.register_pickle_by_value(sys.modules[__name__])
