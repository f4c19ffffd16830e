"""Statuses of dispatches and nodes, and the outcomes a cancel can have."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Status of a dispatch (lattice) or of one node.

    A ``StrEnum``: ``result.status == "CANCELLED"`` holds.
    """

    NEW_OBJECT = "NEW_OBJECT"
    """Created, not dispatched yet."""
    PENDING = "PENDING"
    """Node handed to its executor, not started yet."""
    RUNNING = "RUNNING"
    """Started and not finished."""
    CANCELLING = "CANCELLING"
    """Dispatch only: a cancel was requested and executors are confirming the stop."""
    COMPLETED = "COMPLETED"
    """Finished and produced its output."""
    FAILED = "FAILED"
    """Finished with an error (of its own, or a timeout, or its process died)."""
    CANCELLED = "CANCELLED"
    """Stopped or never started because of a cancel or an upstream failure."""

    @property
    def is_final(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED."""
        return self in FINAL


FINAL: frozenset[Status] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
FINAL_VALUES: frozenset[str] = frozenset(s.value for s in FINAL)
"""The final statuses as the store holds them (plain strings)."""


class CancelOutcome(StrEnum):
    """What a cancel did to one node, as its executor reports it."""

    DEQUEUED = "dequeued"
    """It had not started and will never start."""
    KILLED = "killed"
    """It was running; its process (group) is confirmed gone."""
    RUNS_TO_COMPLETION = "runs_to_completion"
    """The executor cannot stop it: it finishes, its output is kept, the node ends COMPLETED."""
    TOO_LATE = "too_late"
    """It had already finished when the cancel arrived."""
    FAILED = "failed"
    """The cancel itself failed (e.g. host unreachable), after retries."""
