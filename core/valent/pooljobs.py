"""The pool's bookkeeping: a queued or running :class:`Job`, a worker process, and helpers."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import threading
import time

import cloudpickle

from .task import Pending, TaskState


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled back."""


class Job:
    """One task in the pool. ``state`` is a valent ``TaskState``; ``done`` is an Event."""

    __slots__ = (
        "id", "fn_entry", "args_blob", "on_change", "state", "worker", "done",
        "kill_requested", "label",
    )

    def __init__(self, jid: int, fn_entry, args_blob: bytes, on_change, label: str):
        self.id = jid
        self.fn_entry = fn_entry
        self.args_blob = args_blob
        self.on_change = on_change
        self.state: TaskState = Pending()
        self.worker: _Worker | None = None
        self.done = threading.Event()
        self.kill_requested = False
        self.label = label

    def wait(self, timeout: float | None = None) -> TaskState:
        """Block until the job is final (or ``timeout``); return its state."""
        self.done.wait(timeout)
        return self.state

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.label} {type(self.state).__name__}>"


class _Worker:
    __slots__ = (
        "proc", "sock", "lifeline", "known", "job", "idle_since", "out_path", "err_path",
        "doomed", "kill_deadline", "tree", "dead_at", "index", "key", "ready", "cpu_mark",
        "rbuf",
    )

    def __init__(self, proc, sock, lifeline, out_path, err_path, index):
        self.proc: subprocess.Popen = proc
        self.sock: socket.socket = sock
        self.lifeline: int = lifeline
        self.known: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.job: Job | None = None
        self.idle_since = time.monotonic()
        self.out_path = out_path
        self.err_path = err_path
        self.doomed = False
        self.kill_deadline: float | None = None
        self.tree: list[tuple[int, float]] = []
        self.dead_at: float | None = None
        self.index = index
        self.key = sock.fileno()
        self.ready = False
        self.cpu_mark: tuple[float, float] | None = None
        self.rbuf = bytearray()  # bytes received from the worker, not yet a whole message

    @property
    def pid(self) -> int:
        return self.proc.pid


def cpu_mark(pid: int) -> tuple[float, float] | None:
    """(CPU seconds used, monotonic time) of a process, or None if it is gone."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return (t.user + t.system, time.monotonic())


def unpack_error(payload: tuple) -> BaseException:
    blob, text, _tb = payload
    if blob is not None:
        try:
            return cloudpickle.loads(blob)
        except Exception:
            pass
    return RemoteError(text)


def tail(path: str, limit: int = 1 << 16) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


