"""Task handles, and how workers' answers and Dask futures map to valent states."""

from __future__ import annotations

import time
from typing import Any

import cloudpickle
import valent
from valent import CancelOutcome, ExecutorError, WorkerDiedError
from valent.task import Cancelled, Completed, Failed, Pending, Task, TaskState

from . import worker_side as ws


class Handle:
    """One task on the cluster, as ``run`` returns it to the dispatcher."""

    __slots__ = ("task", "wake", "future", "state", "outcome", "submitted_at")

    def __init__(self, task: Task, wake: valent.Wake):
        self.task = task
        self.wake = wake
        self.future: Any = None
        self.state: TaskState = Pending()
        self.outcome: CancelOutcome | None = None
        self.submitted_at = time.time()

    def __repr__(self) -> str:
        return f"<DaskHandle {self.task.key} {type(self.state).__name__}>"


def final_outcome(state: TaskState) -> CancelOutcome:
    """What a cancel of a task already in ``state`` (final) amounts to."""
    return state.outcome if isinstance(state, Cancelled) else CancelOutcome.TOO_LATE


def cancel_outcome(answers: dict | None, key: str) -> CancelOutcome:
    """What the workers' answers to a cancel broadcast mean for ``key``."""
    if answers is None:
        return CancelOutcome.FAILED
    said = {a.get(key) for a in answers.values() if isinstance(a, dict)}
    if ws.KILLED in said:
        return CancelOutcome.KILLED
    if ws.RUNNING in said:
        return CancelOutcome.RUNS_TO_COMPLETION
    if ws.FINISHED in said:
        return CancelOutcome.TOO_LATE
    if any(not isinstance(a, dict) for a in answers.values()):
        return CancelOutcome.FAILED  # a worker that did not answer may be running it
    # not running on any worker, and tombstoned on all: it never will start
    return CancelOutcome.DEQUEUED


def to_state(h: Handle, future: Any, value: Any) -> TaskState:
    """Map a task's returned tuple (or the future's error) to a valent state."""
    now = time.time()
    label = h.task.label
    if value is None:
        if h.outcome is not None:
            return Cancelled(h.outcome, ended_at=now)
        msg = f"Dask dropped {label} (its future was cancelled outside valent)"
        return Failed(ExecutorError(msg), "", ended_at=now)
    if isinstance(value, BaseException):
        from distributed.scheduler import KilledWorker

        name = type(value).__name__
        if isinstance(value, KilledWorker):
            err: BaseException = WorkerDiedError(
                f"the Dask worker running {label} died ({name}: {value}); Dask gave up "
                "after its allowed failures (distributed.scheduler.allowed-failures)"
            )
        else:
            err = ExecutorError(f"Dask could not run {label}: {name}: {value}")
        err.__cause__ = value
        return Failed(err, "", ended_at=now)
    kind = value[0]
    if kind == ws.OK:
        _, pickled, started, ended, out, errtxt = value
        return Completed(
            pickled=pickled, started_at=started, ended_at=ended, stdout=out, stderr=errtxt
        )
    if kind == ws.ERR:
        _, blob, text, tb, started, ended, out, errtxt = value
        exc: BaseException | None = None
        if blob is not None:
            try:
                exc = cloudpickle.loads(blob)
            except Exception:  # noqa: BLE001 - its class may not exist here
                exc = None
        if exc is None:
            from valent.procpool import RemoteError

            exc = RemoteError(text)
        return Failed(exc, tb, started, ended, out, errtxt)
    if kind == ws.CANCELLED:
        _, outcome, started, ended, out, errtxt = value
        return Cancelled(CancelOutcome(outcome), started, ended, out, errtxt)
    # SKIPPED: a cancel tombstoned it before it started
    return Cancelled(h.outcome or CancelOutcome.DEQUEUED, ended_at=now)
