"""The rule that turns node statuses into a dispatch's final status."""

from __future__ import annotations

from collections.abc import Sequence

from ..status import CancelOutcome, Status


def lattice_status(
    statuses: Sequence[Status], outcomes: Sequence[CancelOutcome | None]
) -> Status:
    """The final status of a dispatch whose nodes are all final.

    1. every node COMPLETED and no cancel caught any of them running -> COMPLETED
       (a cancel that arrives after the last node finished changes nothing);
    2. else any node FAILED by its own error -> FAILED;
    3. else -> CANCELLED (a cancel stopped, dequeued, or let run to completion some node).
    """
    present = set(statuses)  # one pass in C: a dispatch may have a million nodes
    if present <= {Status.COMPLETED}:
        if CancelOutcome.RUNS_TO_COMPLETION not in set(outcomes):
            return Status.COMPLETED
        return Status.CANCELLED
    if Status.FAILED in present:
        return Status.FAILED
    return Status.CANCELLED


_INNER_FIRST = (
    CancelOutcome.KILLED,
    CancelOutcome.FAILED,
    CancelOutcome.RUNS_TO_COMPLETION,
    CancelOutcome.DEQUEUED,
    CancelOutcome.TOO_LATE,
)


def sublattice_outcome(outcomes: Sequence[CancelOutcome | None]) -> CancelOutcome:
    """The cancel outcome of a sublattice node, from those of its child dispatch's nodes
    (a nested sublattice's node carries its own aggregate): the first of

    1. ``killed``: a running task inside was stopped;
    2. ``failed``: the cancel of a task inside failed (it may still run);
    3. ``runs_to_completion``: a task inside could not be stopped and finished;
    4. ``dequeued``: tasks inside were stopped before they started;
    5. ``too_late``: everything inside had finished.

    (``dequeued`` when no node inside has an outcome: none had started.)
    """
    present = set(o for o in outcomes if o is not None)
    for o in _INNER_FIRST:
        if o in present:
            return o
    return CancelOutcome.DEQUEUED
