"""Helpers of the Dask executor tests: process checks and a dispatcher-like driver."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psutil
import valent
from valent.testing.procs import alive, live_descendants, wait_until  # noqa: F401


def descendants() -> dict[int, psutil.Process]:
    """Live (non-zombie) descendants of this process, by PID."""
    return {p.pid: p for p in live_descendants()}


def is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:
        return True


def cluster_pids(client) -> set[int]:
    """PIDs of the Dask workers and of the warm pools inside them."""
    from valent_dask.worker_side import pool_pids

    pids = set(client.run(os.getpid).values())
    for got in client.run(pool_pids).values():
        pids.update(got)
    return pids


def local_pool_pids() -> set[int]:
    """PIDs of the warm pool of the dispatcher's shared "local" executor (not ours to check)."""
    from valent import api

    if api._dispatcher is None:
        return set()
    ex = api._dispatcher.named_executor("local")
    if ex is None or getattr(ex, "_pool", None) is None:
        return set()
    return set(ex.pool.own_pids())


class Runner:
    """Drives one executor the way the dispatcher does: run, wake, poll, cancel."""

    def __init__(self, executor: valent.Executor):
        self.executor = executor
        self.dispatch_id = uuid.uuid4().hex[:12]
        self._n = 0

    def start(self, fn, *args, **kwargs) -> tuple[object, threading.Event]:
        self._n += 1
        task = valent.Task(
            dispatch_id=self.dispatch_id, node_id=self._n, name=fn.__name__, fn=fn,
            args=args, kwargs=kwargs,
        )
        woke = threading.Event()
        handle = self.executor.run(task, woke.set)
        return handle, woke

    def wait(self, handle, woke: threading.Event, timeout: float = 30.0) -> valent.TaskState:
        """Poll on every wake until the state is final."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.executor.poll(handle)
            if state.final:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"task not final after {timeout} s: {state!r}")
            woke.wait(min(left, 1.0))
            woke.clear()

    def call(self, fn, *args, timeout: float = 30.0, **kwargs) -> valent.TaskState:
        h, w = self.start(fn, *args, **kwargs)
        return self.wait(h, w, timeout)
