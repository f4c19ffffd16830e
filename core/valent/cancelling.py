"""How the dispatcher cancels: whole dispatches or chosen nodes, retries, cross-process requests.

A mixin of :class:`valent.dispatcher.Dispatcher`; it runs on the dispatcher's thread and uses
its queue of store updates, timers and node helpers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .errors import StoreError
from .status import CancelOutcome, Status

if TYPE_CHECKING:
    from .executor import Executor
    from .runstate import NodeRun
    from .store import Store

CANCEL_RETRIES = 3


class CancelMixin:
    """Cancelling, for the dispatcher."""

    def _cancel(self, dispatch_id: str, task_ids: list[int] | None) -> str:
        run = self.runs.get(dispatch_id)
        if run is None:
            status = self.store.dispatch_status(dispatch_id)
            return f"Dispatch {dispatch_id} already finished ({status}); nothing to cancel."
        if task_ids is None:
            targets = [nr for nr in run.nodes if not nr.final]
            run.cancel_requested = True
        else:
            bad = [t for t in task_ids if not (isinstance(t, int) and 0 <= t < len(run.nodes))]
            if bad:
                return (
                    f"Dispatch {dispatch_id}: no task id(s) {bad}; "
                    f"valid ids are 0..{len(run.nodes) - 1}."
                )
            wanted: dict[int, None] = {}
            stack = list(task_ids)
            while stack:
                t = stack.pop()
                if t not in wanted:
                    wanted[t] = None
                    stack.extend(run.children[t])
            targets = [run.nodes[t] for t in sorted(wanted) if not run.nodes[t].final]
        now = time.time()
        for nr in reversed(targets):  # dependents first: each is dequeued in its own right
            if nr.final or nr.cancel_at is not None:
                continue
            nr.cancel_at = now
            self._upd(nr, {"cancel_requested_at": now})
            self._cancel_node(nr, "cancel requested")
        if task_ids is None and run.status == Status.RUNNING and run.remaining:
            run.status = Status.CANCELLING
            self._dupd.setdefault(run.id, {}).update(
                {"status": Status.CANCELLING.value, "cancel_requested_at": now}
            )
        self._check_done(run)
        if task_ids is None:
            return f"Dispatch {dispatch_id} cancelled."
        return f"Dispatch {dispatch_id}: cancelled task(s) {sorted(set(task_ids))} and dependents."

    def _cancel_node(self, nr: NodeRun, reason: str, requested: bool = True) -> None:
        """Cancel one node: at once if it is not started, else through its executor (sent
        with the turn's other cancels). ``requested``: a user's or a timeout's cancel (kept
        in the store), not the cascade of an upstream failure."""
        if nr.final:
            return
        nr.reason = reason
        if nr.cancel_at is None:
            nr.cancel_at = time.time()
            if requested:
                self._upd(nr, {"cancel_requested_at": nr.cancel_at})
        if not nr.submitted or nr.handle is None:
            nr.submitted = True  # never to start
            nr.cancel_outcome = CancelOutcome.DEQUEUED
            nr.end_time = time.time()
            self._cancelled(nr, reason)
            return
        self._send_cancel(nr)

    def _send_cancel(self, nr: NodeRun) -> None:
        """Queue ``nr``'s cancel; the turn sends each executor its queue in one batch."""
        self._cancels[id(nr)] = nr

    def _send_cancels(self) -> None:
        queued, self._cancels = self._cancels, {}
        groups: dict[int, tuple[Executor, list[NodeRun]]] = {}
        for nr in queued.values():
            if not nr.final and nr.handle is not None:
                groups.setdefault(id(nr.executor), (nr.executor, []))[1].append(nr)
        for ex, nrs in groups.values():
            for nr in nrs:
                nr.cancel_tries += 1
            try:
                outcomes = list(self.plugins.cancel_many(ex, [nr.handle for nr in nrs]))
                if len(outcomes) != len(nrs):
                    raise ValueError(
                        f"{type(ex).__name__}.cancel_many returned {len(outcomes)} outcomes "
                        f"for {len(nrs)} tasks"
                    )
            except Exception as exc:
                outcomes = [CancelOutcome.FAILED] * len(nrs)
                for nr in nrs:
                    self._upd(nr, {"reason": f"cancel failed: {exc!r}"})
            for nr, outcome in zip(nrs, outcomes, strict=True):
                self._cancel_sent(nr, outcome)

    def _cancel_sent(self, nr: NodeRun, outcome: CancelOutcome | None) -> None:
        try:
            outcome = CancelOutcome(outcome) if outcome is not None else CancelOutcome.FAILED
        except ValueError:
            outcome = CancelOutcome.FAILED
        if outcome == CancelOutcome.FAILED and nr.cancel_tries < CANCEL_RETRIES:
            self._at(0.5 * nr.cancel_tries, "recancel", nr)
            return
        nr.cancel_outcome = outcome
        if not nr.upstream_cancel:  # shown while confirmed; after a failure, only the end
            self._upd(nr, {"cancel_outcome": outcome.value})
        self._poll(nr)

    def _external_cancels(self) -> None:
        by_store: dict[int, tuple[Store, list[str]]] = {}
        for run in self.runs.values():
            by_store.setdefault(id(run.store), (run.store, []))[1].append(run.id)
        for store, ids in by_store.values():
            try:
                requests = store.take_cancel_requests(ids)
            except StoreError:
                continue
            for did, task_ids in requests:
                self._cancel(did, task_ids)
