"""PoolExecutor: tasks run in valent's warm, killable process pool."""

from __future__ import annotations

from valent.plugin import (
    CancelOutcome,
    Capabilities,
    Executor,
    Job,
    ProcessPool,
    Task,
    TaskState,
    Wake,
)


class PoolExecutor(Executor):
    """Runs tasks in a warm pool of worker processes; cancel kills a task's process tree.

    :param workers: worker processes (each runs one task at a time).
    :param grace: seconds a task that checks ``valent.cancel_requested()`` gets to return
        before SIGKILL.
    """

    name = "pool"
    capabilities = Capabilities(cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0)

    def __init__(self, workers: int = 2, grace: float = 1.0):
        self.workers = workers
        self.grace = grace
        self._pool: ProcessPool | None = None

    def run(self, task: Task, wake: Wake) -> Job:
        if self._pool is None:  # start the workers on first use
            self._pool = ProcessPool(self.workers, grace=self.grace, name="valent-pool")
        return self._pool.submit(
            task.fn, task.args, task.kwargs, notify=wake, label=task.label
        )

    def poll(self, handle: Job) -> TaskState:
        return handle.state  # the pool keeps a valent TaskState on each job

    def cancel(self, handle: Job) -> CancelOutcome:
        return self._pool.cancel(handle)  # DEQUEUED, KILLED or TOO_LATE

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
