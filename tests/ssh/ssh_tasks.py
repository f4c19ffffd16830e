"""Task functions the SSH tests run remotely (pickled by value: the host cannot import this)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import valent


def add(a, b):
    print(f"adding {a} and {b}")
    print("a warning", file=sys.stderr)
    return a + b


def boom(message):
    raise ValueError(message)


def noop():
    return None


def whoami():
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "cwd": os.getcwd()}


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def timed_sleep(seconds):
    t0 = time.time()
    time.sleep(seconds)
    return (t0, time.time(), os.getpid())


def spawn_and_wait(seconds):
    """Run a shell subprocess (same process group) and wait for it."""
    subprocess.run(["sh", "-c", f"sleep {seconds}; echo done"], check=False)
    return "finished"


def spawn_escapee_and_wait(seconds):
    """A subprocess in its own session (escapes the group) plus one in the group."""
    subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    subprocess.run(["sleep", str(seconds)], check=False)
    return "finished"


def leave_background_child(seconds):
    """Start a child in the task's group and return without waiting for it."""
    subprocess.Popen(["sleep", str(seconds)])
    return "returned"


def ignore_sigterm(seconds):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    valent.cancel_requested()  # the task looks at the token, so SIGTERM does not end it
    time.sleep(seconds)
    return "not stopped"


def cooperative(marker, seconds):
    """Loop until cancel is requested, then record that and return cleanly."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if valent.cancel_requested():
            with open(marker, "w") as f:
                f.write("stopped cleanly")
            return "stopped"
        time.sleep(0.01)
    return "ran out"


def cooperative_imported(seconds):
    """Like ``cooperative`` but with the function imported by name, not via the module."""
    from valent import cancel_requested

    deadline = time.time() + seconds
    while time.time() < deadline:
        if cancel_requested():
            return "stopped"
        time.sleep(0.01)
    return "ran out"


def big(n):
    return os.urandom(n)


def exit_hard(code):
    os._exit(code)


def _load_slowly(seconds, value):
    time.sleep(seconds)
    return value


class SlowToLoad:
    """An argument that takes ``seconds`` to unpickle on the host: the task is loading, its
    function not yet called, for that long."""

    def __init__(self, seconds, value):
        self.seconds = seconds
        self.value = value

    def __reduce__(self):
        return (_load_slowly, (self.seconds, self.value))


def write_marker(path, value):
    """The body's first act: leave a file saying it ran."""
    with open(path, "w") as f:
        f.write("the body ran")
    return value
