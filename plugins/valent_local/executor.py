"""``LocalExecutor``: each task in a warm worker process of this machine, killable with its tree."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from valent.plugin import (
    MAX_SECONDS,
    CancelOutcome,
    Capabilities,
    Count,
    Executor,
    ExecutorError,
    Job,
    PoolUp,
    ProcessPool,
    Seconds,
    Task,
    TaskState,
    Upstream,
    Wake,
    require,
)


class LocalExecutor(Executor):
    """Runs tasks in worker processes on this machine.

    Workers are started once and reused; each runs one task at a time in its own process
    group. Cancel dequeues a task that has not started, or stops a running one: SIGTERM to its
    group (a task that uses ``cancel_requested()`` gets ``grace`` seconds), then SIGKILL; its
    subprocesses go too, and the worker is replaced.

    :param workers: a fixed number of worker processes. Default: elastic, from the CPU count
        up to ``max_workers``, growing only while queued tasks wait behind busy workers and
        the CPUs are not saturated (so sleeping or waiting tasks run side by side).
    :param max_workers: the ceiling of the elastic pool (default ``max(32, 4 * CPUs)``).
    :param grace: seconds between SIGTERM and SIGKILL for cooperative tasks.
    :param capture_output: capture each task's stdout and stderr into the store.

    It chains (``Capabilities.chain``): a task whose one upstream task runs on this executor
    is sent to the same worker right behind it and starts there as soon as it ends, the
    value passed in the worker (the dispatcher still stores every node's state and value);
    if the upstream does not complete, its body never runs. When many tasks wait, busy
    workers are sent the next ones ahead (of functions known to be quick), so that no task
    waits for a round trip through the pool.
    """

    name = "local"
    capabilities = Capabilities(
        cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0, chain=True
    )

    def __init__(
        self,
        workers: Count | None = None,
        max_workers: Count | None = None,
        grace: Seconds = 1.0,
        capture_output: bool = True,
    ):
        for key, count in (("workers", workers), ("max_workers", max_workers)):
            if count is not None:
                require("LocalExecutor", key, count, integer=True, ge=1)
        require("LocalExecutor", "grace", grace, ge=0, le=MAX_SECONDS)
        self.workers = workers
        self.max_workers = max_workers
        self.grace = grace
        self.capture_output = capture_output
        self.capabilities = dataclasses.replace(type(self).capabilities, grace=grace)
        self._pool: ProcessPool | None = None
        self._lock = threading.Lock()

    @property
    def pool(self) -> ProcessPool:
        """The worker pool, started on first use (and again in a forked child: a pool's
        workers and thread belong to the process that started it; and after the pool stopped
        on an internal error: its jobs failed, later ones get a new pool)."""
        pool = self._pool
        if pool is None or not pool.usable():
            with self._lock:
                if self._pool is None or not self._pool.usable():
                    cap = self.max_workers
                    pool = ProcessPool(
                        self.workers,
                        # the elastic pool starts at the CPU count: never above the ceiling
                        min_workers=None if cap is None else min(os.cpu_count() or 1, cap),
                        max_workers=cap,
                        grace=self.grace,
                        capture=self.capture_output,
                        name="valent-local",
                    )
                    pool.start()
                    self._pool = pool
        return self._pool

    def run(self, task: Task, wake: Wake) -> Job:
        pool = self._pool
        if pool is None or not pool.usable():
            pool = self.pool
        args, kwargs, ups = task.args, task.kwargs, None
        if _has_upstream(args, kwargs):
            args, kwargs, ups = self._mark_upstream(task)
        return pool.submit(task.fn, args, kwargs, notify=wake, label=task.label, ups=ups)

    def _mark_upstream(self, task: Task) -> tuple[tuple, dict, list[Job]]:
        """Chaining: ``Upstream`` markers become ``PoolUp(i)``; ``ups[i]`` is the upstream
        job. A task whose one upstream runs here starts in the same worker right after it,
        the value passed there (no round trip through the dispatcher)."""
        ups: list[Job] = []
        index: dict[int, int] = {}

        def mark(v: Any) -> Any:
            if not isinstance(v, Upstream):
                return v
            if not isinstance(v.handle, Job):
                raise ExecutorError(
                    f"{task.label}: an Upstream marker must hold a job this LocalExecutor "
                    f"started, got {v.handle!r}"
                )
            i = index.get(id(v.handle))
            if i is None:
                i = index[id(v.handle)] = len(ups)
                ups.append(v.handle)
            return PoolUp(i)

        args = tuple(mark(a) for a in task.args)
        return args, {k: mark(v) for k, v in task.kwargs.items()}, ups

    def poll(self, handle: Job) -> TaskState:
        return handle.state

    def cancel(self, handle: Job) -> CancelOutcome:
        return self.pool.cancel(handle)

    def cancel_many(self, handles: list[Job]) -> list[CancelOutcome]:
        """One pass of the pool: the workers of all the running ones are stopped at once."""
        return self.pool.cancel_many(handles)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def __repr__(self) -> str:
        args: list[str] = []
        if self.workers is not None:
            args.append(f"workers={self.workers}")
        if self.grace != 1.0:
            args.append(f"grace={self.grace}")
        return f"LocalExecutor({', '.join(args)})"

    def __reduce__(self) -> Any:
        return (LocalExecutor, (self.workers, self.max_workers, self.grace, self.capture_output))


def _has_upstream(args: tuple, kwargs: dict) -> bool:
    """Any ``Upstream`` marker among the arguments? (``Task.upstream`` makes two lists, a
    generator makes an object: a fan-out starts thousands of tasks, each one more object for
    the garbage collector to count.)"""
    for a in args:
        if isinstance(a, Upstream):
            return True
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, Upstream):
                return True
    return False
