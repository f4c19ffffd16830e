"""Helpers of the SSH executor tests (imported by the tests and the benchmark)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import valent
from valent.testing.procs import wait_until  # noqa: F401


class Submitted:
    """A task handed to an executor, with the Event its ``wake`` sets."""

    def __init__(self, ex, fn, *args, **kwargs):
        self.ex = ex
        self.woken = threading.Event()
        self.task = valent.Task(
            dispatch_id=uuid.uuid4().hex[:8],
            node_id=0,
            name=fn.__name__,
            fn=fn,
            args=args,
            kwargs=kwargs,
        )
        self.handle = ex.run(self.task, self.woken.set)

    def state(self):
        return self.ex.poll(self.handle)

    def wait(self, timeout: float = 60.0):
        """Wait, woken by ``wake`` only (no polling loop), until the state is final."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.ex.poll(self.handle)
            if st.final:
                return st
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"task still {st} after {timeout}s")
            self.woken.wait(left)
            self.woken.clear()

    def wait_running(self, timeout: float = 30.0):
        """Wait until the task is Running (its runner said the function starts), then 0.2 s
        more: a cancel in the microseconds between that word and the call is taken back
        (``dequeued``, see ``runner.UNSTARTED_RC``), and tests that cancel a running task
        expect it killed."""
        deadline = time.monotonic() + timeout
        while not isinstance(self.ex.poll(self.handle), valent.Running):
            left = deadline - time.monotonic()
            if left <= 0 or self.ex.poll(self.handle).final:
                raise AssertionError(f"task not running: {self.ex.poll(self.handle)}")
            self.woken.wait(left)
            self.woken.clear()
        time.sleep(0.2)
        return self.ex.poll(self.handle)


def task_processes(handle) -> list[int]:
    """Live processes of a remote task: its process group (the runner and what it started
    there) and any process elsewhere carrying its token (what left the group)."""
    import psutil
    import rig

    found = set(rig.token_processes(handle.token))
    if handle.pid is not None:
        for p in psutil.process_iter(["status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if os.getpgid(p.pid) == handle.pid:
                    found.add(p.pid)
            except ProcessLookupError:
                continue
    return sorted(found)
