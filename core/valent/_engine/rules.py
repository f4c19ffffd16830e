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
    if all(s == Status.COMPLETED for s in statuses):
        if not any(o == CancelOutcome.RUNS_TO_COMPLETION for o in outcomes):
            return Status.COMPLETED
        return Status.CANCELLED
    if any(s == Status.FAILED for s in statuses):
        return Status.FAILED
    return Status.CANCELLED
