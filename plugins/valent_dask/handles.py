"""Task handles, and how workers' answers and Dask futures map to valent states."""

from __future__ import annotations

import time
from typing import Any

import cloudpickle
import valent
from valent import CancelOutcome, ExecutorError, WorkerDiedError
from valent.plugin import Cancelled, Completed, Failed, Pending, Task, TaskState

from . import worker_side as ws

STOPPED = (CancelOutcome.DEQUEUED, CancelOutcome.KILLED)
"""Cancel outcomes after which a task never completes."""


class Handle:
    """One task on the cluster, as ``run`` returns it to the dispatcher."""

    __slots__ = (
        "task", "wake", "future", "state", "outcome", "submitted_at", "ups", "up_futures",
        "batch", "index",
    )

    def __init__(self, task: Task, wake: valent.Wake):
        self.task = task
        self.wake = wake
        self.future: Any = None
        self.state: TaskState = Pending()
        self.outcome: CancelOutcome | None = None
        self.submitted_at = time.time()
        self.ups: list[Handle] = []
        """A chained task's upstream handles, in the order of its ``Up`` markers."""
        self.up_futures: list[Any] = []
        """The Dask futures it was given for those still running when it was sent."""
        self.batch: list[Handle] | None = None
        """The tasks that share its Dask task (``future``), in order, when it went in a batch."""
        self.index: int | None = None
        """Its place in that batch, and so in the list of result tuples the batch returns."""

    def will_not_complete(self) -> bool:
        """True when this task ended other than completed, or a cancel is stopping it."""
        st = self.state
        return self.outcome in STOPPED or (st.final and not isinstance(st, Completed))

    def upstream_lost(self) -> bool:
        """True when an upstream task of this chained task did not (or will not) complete."""
        if any(u.will_not_complete() for u in self.ups):
            return True
        return any(f.status in ("error", "cancelled") for f in self.up_futures)

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
    if ws.DEQUEUED in said:  # a worker had it, but its body had not started and never will
        return CancelOutcome.DEQUEUED
    if ws.FINISHED in said:
        return CancelOutcome.TOO_LATE
    if any(not isinstance(a, dict) for a in answers.values()):
        return CancelOutcome.FAILED  # a worker that did not answer may be running it
    # not running on any worker, and tombstoned on all: it never will start
    return CancelOutcome.DEQUEUED


def _not_its_own(h: Handle, value: Any) -> bool:
    """Did a chained task's future fail (or get cancelled) because of an upstream task?"""
    if h.upstream_lost():
        return True
    task = getattr(value, "task", None)  # KilledWorker names the task that killed the worker
    return task is not None and task != h.task.key


def _cancel_error(value: Any) -> bool:
    """Is ``value`` the error Dask gives for a cancelled future (not the task's own error)?"""
    from distributed.client import FutureCancelledError

    return isinstance(value, FutureCancelledError)


def to_state(h: Handle, future: Any, value: Any) -> TaskState:
    """Map a task's returned tuple (or the future's error) to a valent state."""
    now = time.time()
    label = h.task.label
    if h.ups and not isinstance(value, tuple) and _not_its_own(h, value):
        # Dask failed or dropped it because an upstream task did: its body never ran
        return Cancelled(CancelOutcome.DEQUEUED, ended_at=now)
    if value is None or _cancel_error(value):
        if h.outcome is not None:
            return Cancelled(h.outcome, ended_at=now)
        why = getattr(value, "reason", None)
        if why == "scheduler-connection-lost":
            msg = (
                f"{label} was lost: the connection to the Dask scheduler broke while it was "
                f"on the cluster (the scheduler restarted or is unreachable); Dask said: {value}"
            )
        else:
            msg = f"Dask dropped {label}: its future was cancelled outside valent ({value})"
        err = ExecutorError(msg)
        err.__cause__ = value
        return Failed(err, "", ended_at=now)
    if isinstance(value, BaseException):
        from distributed.scheduler import KilledWorker

        name = type(value).__name__
        if isinstance(value, KilledWorker):
            where = label
            if h.batch is not None:  # its body may not have started: the batch's did
                where = (
                    f"the batch of {len(h.batch)} tasks that held {label} (run as one Dask "
                    "task)"
                )
            err: BaseException = WorkerDiedError(
                f"the Dask worker running {where} died ({name}: {value}); Dask gave up "
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
            from valent.plugin import RemoteError

            exc = RemoteError(text)
        return Failed(exc, tb, started, ended, out, errtxt)
    if kind == ws.CANCELLED:
        _, outcome, started, ended, out, errtxt = value
        return Cancelled(CancelOutcome(outcome), started, ended, out, errtxt)
    # SKIPPED: a cancel tombstoned it before it started
    return Cancelled(h.outcome or CancelOutcome.DEQUEUED, ended_at=now)
