"""The embedded dispatcher: one background thread per process runs every dispatch it owns.

Split by role, as CPython's ``concurrent/futures/process.py`` is:

- :class:`Dispatcher`, the public face, is thread-safe and only puts messages on the loop's
  queue (start a dispatch, cancel, call a function on the loop thread) and answers which
  dispatches this process owns;
- :class:`_Loop`, run by the dispatcher's thread alone, holds and changes every dispatch's
  state: starting nodes, polling them, timeouts, cancelling, finishing dispatches;
- :class:`_StoreBatch` collects store changes and writes them in one transaction per store,
  at most ``FLUSH_EVERY`` after the oldest (a node's changes merge into one row write; the
  latest state is what is written), at once when a dispatch ends or a cancel replies; the
  same fields for many nodes (parameters completing, unstarted nodes dequeued) are one
  statement.

Ready tasks are started ``SUBMIT_SLICE`` at a time between reads of the queue, so a cancel
of a million-node dispatch is read before every task reached its executor. Executors are
called directly (not through pluggy) while valent's default hooks are the only ones.

Event-driven: executors call a task's ``wake`` and the loop polls just that task; timers
cover electron timeouts, cancel retries and executors that ask for safety-net polls.

Chaining: on an executor that declares ``Capabilities(chain=True)``, while fewer than
``CHAIN_BELOW`` unchained tasks are in flight (a wide graph keeps its executors busy without
it) and at most ``CHAIN_AHEAD`` chained tasks wait for their parents, a node whose parents
are all completed or started on that same executor is started at once, its missing inputs
given as :class:`valent.task.Upstream` markers; the executor passes the values where the
tasks run (Dask: worker to worker). Such a node stays NEW_OBJECT in the store until its
parents complete here, and its state is read only then, so what a user sees is the same as
without chaining; a parent that fails or is cancelled cancels it (the executor never runs
its body).

Truth rules enforced here (DESIGN.md "Truth invariants"): what happened first decides. A
task that failed before the cancel was requested is FAILED (``too_late``); whatever ends a
task after the request is CANCELLED with a truthful outcome; no retry starts after a cancel;
a failed store write stops the dispatch and ends it FAILED with the store error as cause.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import cloudpickle

from .._plugins.contract import Executor
from .._plugins.manager import Plugins
from .._store import Store
from ..errors import StoreError, TaskTimeoutError, ValentError
from ..graph import ELECTRON, PARAMETER, SUBLATTICE, Ref
from ..status import FINAL, CancelOutcome, Status
from ..task import Cancelled, Completed, Failed, Running, Task, Upstream
from .nest import Builder
from .resolve import Executors
from .reuse import blob_digest, in_digest, node_fn_digest
from .rules import lattice_status, sublattice_outcome
from .runstate import (
    DispatchRun,
    NodeRun,
    compute_inline,
    error_text,
    release_inputs,
    structure_value,
)

EXTERNAL_CANCEL_EVERY = 0.2
"""How often (s) the loop looks for cancel requests other processes left in the store."""
CANCEL_RETRIES = 3
"""Tries of a cancel an executor answered ``failed`` before that answer is final."""
FLUSH_EVERY = 0.05
"""How long (s) node and dispatch changes may wait in the loop before they are written.

Changes of the same node in that time merge into one row write (a quick task's PENDING,
RUNNING and COMPLETED are one update); the latest state is always what is written, so a
node still running at the write is written RUNNING with its start time. A dispatch that
ends, a cancel (its reply waits for the write) and a store error write at once."""
FLUSH_MAX = 50_000
"""Node changes held at most before they are written whatever the time (bounds memory)."""
CHAIN_AHEAD = 2_000
"""Most chained tasks started ahead of their parents' completion at once: a 100,000-node
graph is chained a window at a time (each completion chains more), not all in the first
turn (memory for every task at once, in the dispatcher and the executor)."""
CHAIN_BELOW = 8
"""Chain only while fewer tasks than this, started with all their inputs, are in flight: a
chain then saves a round trip through the dispatcher per task, while a wide graph already
keeps its executors busy, and chaining it only costs work (measured: a 20,000-node layered
graph ran in half the time and CPU without chaining)."""
SUBMIT_SLICE = 0.02
"""Longest time (s) a turn spends starting ready tasks before it reads its queue again: a
cancel sent while a million tasks become ready is seen after one slice, not after all of
them were handed to their executors."""

_WAKE, _START, _CANCEL, _CALL, _BUILT = range(5)
_VALUE = {s: s.value for s in Status}


def check_task_ids(dispatch_id: str, task_ids: list[int] | None, node_count: int) -> str | None:
    """The message for task ids a dispatch does not have (None when all are valid).

    The owner and any other process answer a bad ``cancel(id, task_ids=...)`` the same way.
    """
    if task_ids is None:
        return None
    bad = [
        t for t in task_ids
        if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < node_count)
    ]
    if not bad:
        return None
    return f"Dispatch {dispatch_id}: no task id(s) {bad}; valid ids are 0..{node_count - 1}."


class Dispatcher:
    """Runs dispatches on a background thread; one per process (``api.get_dispatcher``).

    Every method may be called from any thread: they put messages on the loop's queue (or
    read the locked table of owned dispatches); only the loop's thread touches run state.
    """

    def __init__(self, store: Store, plugins: Plugins):
        from .._plugins.manager import get_plugins

        # follow the process's plugins when built from them: a plugin registered (or
        # valent.timing enabled) after the first dispatch still takes part
        follow = plugins is get_plugins()
        self._plugins = plugins
        self.plugins_now: Callable[[], Plugins] = get_plugins if follow else self._fixed_plugins
        self.store = store
        self.executors = Executors(self.plugins_now)
        self.owner = (os.getpid(), socket.gethostname(), _process_start())
        self._owned: dict[str, DispatchRun] = {}
        self._owned_lock = threading.Lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = _Loop(
            self._q, store, self.plugins_now, self._forget, self.executors, self.owner,
            self._own,
        )
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="valent-dispatcher", daemon=True
        )
        self._thread.start()

    def _fixed_plugins(self) -> Plugins:
        return self._plugins

    # ---------------------------------------------------------------- public (any thread)

    def start(self, run: DispatchRun, cancelled: bool = False) -> None:
        """Begin running ``run`` (already written to its store); ``cancelled``: start
        nothing of it and end it CANCELLED (its tasks dequeued)."""
        if run.store is None:
            run.store = self.store
        with self._owned_lock:
            self._owned[run.id] = run
        self._q.put((_START, (run, cancelled)))

    def owned(self, dispatch_id: str) -> DispatchRun | None:
        """The run of ``dispatch_id`` if this process owns it and it is not finished."""
        with self._owned_lock:
            return self._owned.get(dispatch_id)

    def active(self) -> list[DispatchRun]:
        """The dispatches this process owns that have not finished (top level: a
        sublattice's child dispatch goes with its parent's)."""
        with self._owned_lock:
            return [r for r in self._owned.values() if r.parent is None]

    def cancel(self, dispatch_id: str, task_ids: list[int] | None) -> str:
        """Cancel a dispatch this process owns; returns the message for the user.

        Returns once the request is in the store (CANCELLING), not once it is confirmed.
        """
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._q.put((_CANCEL, (dispatch_id, task_ids, reply)))
        answer = reply.get()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the dispatcher's thread and return its result (tests, tools)."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._q.put((_CALL, (fn, reply)))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def named_executor(self, name: str) -> Executor | None:
        """The shared instance this process made for an executor name, if any."""
        return self.executors.named(name)

    def shutdown_executors(self) -> None:
        """Shut down every executor this process used (at interpreter exit)."""
        self.executors.shutdown()

    def _own(self, run: DispatchRun) -> None:
        with self._owned_lock:
            self._owned[run.id] = run

    def _forget(self, run: DispatchRun) -> None:
        with self._owned_lock:
            self._owned.pop(run.id, None)


class _StoreBatch:
    """The store changes of one loop turn, written in one transaction per store.

    ``bulk``: the same fields for many nodes of a dispatch (its parameters completing, a
    whole dispatch's unstarted nodes dequeued), one statement each, written before the
    per-node changes; a node's per-node change made before a bulk one takes its fields, so
    the newer value is always the one written.
    """

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, int], dict[str, Any]] = {}
        self.dispatches: dict[str, dict[str, Any]] = {}
        self.bulk: list[tuple[str, dict[str, Any], list[int]]] = []

    def node(self, nr: NodeRun, fields: dict[str, Any]) -> None:
        key = (nr.run.id, nr.node.id)
        cur = self.nodes.get(key)
        if cur is None:
            self.nodes[key] = fields
        else:
            cur.update(fields)

    def many(self, run: DispatchRun, fields: dict[str, Any], node_ids: list[int]) -> None:
        """The same ``fields`` for every node in ``node_ids`` (one statement)."""
        if not node_ids:
            return
        if self.nodes:
            did, nodes, plain = run.id, self.nodes, []
            for nid in node_ids:
                cur = nodes.get((did, nid))
                if cur is None:
                    plain.append(nid)
                else:
                    cur.update(fields)  # written after the bulk ones: keep it newest
            node_ids = plain
        if node_ids:
            self.bulk.append((run.id, fields, node_ids))

    def dispatch(self, run: DispatchRun, fields: dict[str, Any]) -> None:
        self.dispatches.setdefault(run.id, {}).update(fields)

    def __bool__(self) -> bool:
        return bool(self.nodes or self.dispatches or self.bulk)

    def take(self) -> tuple[dict, dict, list]:
        nodes, dispatches, bulk = self.nodes, self.dispatches, self.bulk
        self.nodes, self.dispatches, self.bulk = {}, {}, []
        return nodes, dispatches, bulk

    def put_back(self, nodes: dict, dispatches: dict, bulk: list) -> None:
        """Keep changes a failed write did not store, under the newer ones."""
        # a newer bulk change of a node with an older per-node change: newer than the old
        from_bulk: dict[tuple[str, int], dict[str, Any]] = {}
        if nodes:
            for did, fields, ids in self.bulk:
                for nid in ids:
                    if (did, nid) in nodes:
                        from_bulk.setdefault((did, nid), {}).update(fields)
        self.bulk = list(bulk) + self.bulk
        for key, fields in nodes.items():
            self.nodes[key] = {**fields, **from_bulk.get(key, {}), **self.nodes.get(key, {})}
        for key, fields in dispatches.items():
            self.dispatches[key] = {**fields, **self.dispatches.get(key, {})}


class _Loop:
    """The dispatcher's thread: the one owner of every run's state."""

    def __init__(
        self,
        q: queue.SimpleQueue,
        store: Store,
        plugins_now: Callable[[], Plugins],
        forget: Callable[[DispatchRun], None],
        executors: Executors | None = None,
        owner: tuple[int, str, float] | None = None,
        own: Callable[[DispatchRun], None] | None = None,
    ):
        self.q = q
        self.store = store
        self.plugins_now = plugins_now
        self.plugins = plugins_now()
        self.forget = forget
        self.runs: dict[str, DispatchRun] = {}
        self.batch = _StoreBatch()
        self.timers: list[tuple[float, int, str, NodeRun]] = []
        self.seq = itertools.count()
        self.finishing: list[DispatchRun] = []
        self.cancels: dict[int, NodeRun] = {}  # cancels to send this turn, in order
        self.repoll: deque[NodeRun] = deque()
        self.chaining = False
        self.next_external = 0.0
        self.flush_due: float | None = None  # when the batch's oldest change must be written
        self.observers = self.plugins.has_observers
        self.calls = self.plugins.calls()  # the hooks, or the executors' own methods
        self.own = own or (lambda run: None)
        self.builder = Builder(
            executors or Executors(plugins_now), owner or (os.getpid(), "", 0.0), self.deliver
        )
        self.fn_digests: dict[int, tuple[Any, str | None]] = {}
        self.reused: deque[tuple[NodeRun, Any]] = deque()  # nodes taking an earlier output
        self.ready: deque[NodeRun] = deque()  # nodes whose inputs are all there, to start
        self.ahead = 0  # chained nodes started whose parents have not all completed here
        self.plain = 0  # tasks in flight that were started with all their inputs (not chained)

    def deliver(self, nr: NodeRun, child: DispatchRun | None, exc: Any, tb: str) -> None:
        """(builder thread) A sublattice's child dispatch is built, or could not be."""
        self.q.put((_BUILT, (nr, child, exc, tb)))

    # ---------------------------------------------------------------- the turn

    def run_forever(self) -> None:
        while True:
            try:
                self.turn()
            except Exception:  # a bug here must not stop every dispatch in the process
                traceback.print_exc()

    def turn(self) -> None:
        """Wait for messages or a timer; start, cancel, poll; send cancels; write the store."""
        try:
            events = [self.q.get(timeout=self.timeout())]
        except queue.Empty:
            events = []
        self.plugins = self.plugins_now()
        self.observers = self.plugins.has_observers
        self.calls = self.plugins.calls()
        while True:
            try:
                events.append(self.q.get_nowait())
            except queue.Empty:
                break
        woken: dict[int, NodeRun] = {}
        # cancel replies wait for this turn's write: once cancel() returns, a get_result()
        # sees CANCELLING (or the final status), never the RUNNING of before the cancel
        replies: list[tuple[queue.SimpleQueue, Any]] = []
        try:
            for kind, payload in events:
                if kind == _WAKE:
                    woken[id(payload)] = payload
                elif kind == _START:
                    self.start(*payload)
                elif kind == _CANCEL:
                    did, task_ids, reply = payload
                    try:
                        replies.append((reply, self.cancel(did, task_ids)))
                    except Exception as exc:
                        replies.append((reply, exc))
                elif kind == _BUILT:
                    self.built(*payload)
                elif kind == _CALL:
                    fn, reply = payload
                    try:
                        reply.put((True, fn()))
                    except Exception as exc:
                        reply.put((False, exc))
            for nr in woken.values():
                self.poll(nr)
            self.fire_timers()
            now = time.monotonic()
            if self.runs and now >= self.next_external:
                self.next_external = now + EXTERNAL_CANCEL_EVERY
                self.external_cancels()
            self.drain()
            self.flush(force=bool(replies))
        finally:
            for reply, answer in replies:
                reply.put(answer)

    def timeout(self) -> float | None:
        if self.cancels or self.repoll or self.reused or self.ready:
            return 0.0
        t: float | None = None
        if self.timers:
            t = max(0.0, self.timers[0][0] - time.monotonic())
        if self.flush_due is not None:
            due = max(0.0, self.flush_due - time.monotonic())
            t = due if t is None else min(t, due)
        if self.runs:
            t = EXTERNAL_CANCEL_EVERY if t is None else min(t, EXTERNAL_CANCEL_EVERY)
        return t

    def drain(self) -> None:
        """Poll chained nodes whose parents just completed; send the turn's cancels; start
        ready nodes for at most ``SUBMIT_SLICE`` (the rest in the next turns)."""
        deadline = time.monotonic() + SUBMIT_SLICE
        while (
            self.repoll or self.cancels or self.reused
            or (self.ready and time.monotonic() < deadline)
        ):
            while self.reused:
                self.reuse_now(*self.reused.popleft())
            while self.repoll:
                self.poll(self.repoll.popleft())
            if self.cancels:
                self.send_cancels()
            if self.ready:
                self.submit_ready(deadline)

    def at(self, delay: float, what: str, nr: NodeRun) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.seq), what, nr))

    def fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, what, nr = heapq.heappop(self.timers)
            if nr.final:
                continue
            if (
                what == "timeout"
                and nr.deadline is not None
                and now >= nr.deadline - 0.001
                and not nr.timed_out
            ):
                nr.timed_out = True
                self.cancel_node(nr, "timeout")
            elif what == "poll":
                self.poll(nr)
                if not nr.final and nr.executor is not None and nr.executor.poll_interval:
                    self.at(nr.executor.poll_interval, "poll", nr)
            elif what == "recancel":
                self.send_cancel(nr)

    # ---------------------------------------------------------------- starting

    def start(self, run: DispatchRun, cancelled: bool = False) -> None:
        """Start a dispatch; ``cancelled``: one that starts nothing and ends CANCELLED, its
        tasks dequeued (a sublattice's child built after its node was cancelled, a dispatch
        whose triggers were stopped before any fired)."""
        self.runs[run.id] = run
        if run.parent is None:
            self.fn_digests.clear()  # functions' globals may have changed since
        if cancelled:
            run.cancel_requested = True
        now = time.time()
        run.status = Status.RUNNING
        self.batch.dispatch(run, {"status": Status.RUNNING.value, "start_time": now})
        nodes, children = run.nodes, run.children
        ready = []
        reused = []
        params: list[int] = []
        completed = Status.COMPLETED
        for nr in nodes:
            node = nr.node
            if node.kind == PARAMETER:  # COMPLETED at once, written in one statement
                nr.value = node.value
                nr.start_time = nr.end_time = now
                nr.status = completed
                params.append(node.id)
            elif nr.reused:  # COMPLETED in the store already (a redispatch's reuse)
                run.remaining -= 1
                release_inputs(nr)
                reused.append(nr)
            elif nr.waiting == 0:
                ready.append(nr)
        if params:
            run.remaining -= len(params)  # a parameter has no parents: no inputs to release
            self.batch.many(
                run, {"status": completed.value, "start_time": now, "end_time": now}, params
            )
            if self.observers:
                for nid in params:
                    self.observed(nodes[nid], completed)
            for nid in params:  # release_children, for a dispatch where nothing started yet
                for cid in children[nid]:
                    child = nodes[cid]
                    child.waiting -= 1
                    if child.waiting == 0 and child.status not in FINAL:
                        ready.append(child)
        for nr in reused:
            self.release_children(nr)
        if not run.cancel_requested:
            self.ready.extend(ready)  # started by the turn's drain, a slice at a time
        if cancelled:
            self.cancel(run.id, None)
        self.check_done(run)

    def release_children(self, nr: NodeRun) -> None:
        run = nr.run
        for cid in run.children[nr.node.id]:
            child = run.nodes[cid]
            child.waiting -= 1
            if child.waiting != 0 or child.final:
                continue
            if child.chained:  # started already: now its state counts
                self.ahead -= 1
                if child.status == Status.NEW_OBJECT and child.cancel_at is None:
                    self.set(child, Status.PENDING)
                self.repoll.append(child)
            elif not run.cancel_requested:
                self.ready.append(child)

    def submit_ready(self, deadline: float) -> None:
        """Start ready nodes until none is left or ``deadline`` (monotonic) has passed."""
        ready = self.ready
        n = 0
        while ready:
            nr = ready.popleft()
            if not nr.submitted and not nr.final and not nr.run.cancel_requested:
                self.submit(nr)
            n += 1
            if not n & 63 and time.monotonic() >= deadline:
                return

    def submit(self, nr: NodeRun, chained: bool = False, reuse: bool = True) -> None:
        node = nr.node
        nr.submitted = True
        nr.chained = chained
        if reuse and nr.run.reuse is not None and node.kind == ELECTRON and not chained:
            # not taken before the start (a parent ran again): its inputs may still match
            old = nr.run.reuse.match(
                node.id, node.name, node.kind, self.fn_digest(nr), self.in_digest(nr)
            )
            if old is not None:
                self.reused.append((nr, old))  # in this turn's drain: no deep recursion
                return
        try:
            args = tuple(self.resolve(nr.run, a, chained) for a in node.args)
            kwargs = {k: self.resolve(nr.run, v, chained) for k, v in node.kwargs.items()}
        except Exception as exc:
            self.fail(nr, exc, traceback.format_exc())
            return
        if node.kind == SUBLATTICE:
            nr.building = True
            self.set(nr, Status.PENDING)
            self.builder.submit(nr, args, kwargs)
            return
        if node.kind != ELECTRON:
            try:
                nr.value = compute_inline(node, args, kwargs)
            except Exception as exc:
                self.fail(nr, exc, traceback.format_exc())
                return
            nr.start_time = nr.end_time = time.time()
            self.complete(nr, None)
            return
        executor = nr.executor
        assert executor is not None, "dispatch resolves every electron's executor"
        nr.run.use(executor)
        nr.attempts += 1
        electron = node.electron
        task = Task(
            nr.run.id, node.id, node.name, node.fn, args, kwargs,
            electron.timeout if electron else None, nr.attempts,
        )
        try:
            nr.handle = self.calls.run(executor, task, _waker(self.q, nr))
        except Exception as exc:
            self.fail(nr, exc, traceback.format_exc())
            return
        if not chained:
            self.plain += 1
            self.set(nr, Status.PENDING)
        nr.deadline = None  # a timeout counts from when the task is running
        if executor.poll_interval:
            self.at(executor.poll_interval, "poll", nr)
        if (
            not self.chaining
            and self.plain < CHAIN_BELOW
            and getattr(executor.capabilities, "chain", False)
        ):
            self.chain_from(nr)

    # ---------------------------------------------------------------- reuse and sublattices

    def fn_digest(self, nr: NodeRun) -> str | None:
        """The digest of the node's function (cached per function while runs go on)."""
        if nr.fn_digest is None:
            nr.fn_digest = node_fn_digest(nr.node, self.fn_digests)
        return nr.fn_digest

    def in_digest(self, nr: NodeRun) -> str | None:
        """The digest of the node's inputs, from its parents' output digests."""
        if nr.in_digest is None:
            nodes = nr.run.nodes
            nr.in_digest = in_digest(
                nr.node.args, nr.node.kwargs, lambda i: nodes[i].out_digest
            )
        return nr.in_digest

    def reuse_now(self, nr: NodeRun, old: Any) -> None:
        """Complete ``nr`` with the output of the earlier dispatch's node (start == end)."""
        if nr.final:
            return
        try:
            nr.pickled, nr.output_file = nr.run.store.node_output(
                nr.run.reuse.source_id, nr.node.id
            )
        except StoreError:
            nr.pickled = nr.output_file = None
        if nr.pickled is None and not nr.output_file:
            self.submit(nr, reuse=False)  # its output is gone: run it after all
            return
        nr.start_time = nr.end_time = time.time()
        self.complete(nr, {"reason": f"reused from {nr.run.reuse.source_id}"})

    def built(
        self, nr: NodeRun, child: DispatchRun | None, exc: Any, tb: str
    ) -> None:
        """A sublattice's child dispatch is built (in the store): run it as the node."""
        nr.building = False
        if child is None:
            if not nr.final:
                self.fail(nr, exc, tb)
            return
        child.parent = nr
        nr.sub = child
        self.batch.node(nr, {"sub_dispatch_id": child.id})
        self.own(child)
        if nr.final:  # cancelled while it was being built: nothing of it starts
            self.start(child, cancelled=True)
            return
        nr.start_time = time.time()
        self.set(nr, Status.RUNNING)
        timeout = nr.node.electron.timeout if nr.node.electron is not None else None
        if timeout and math.isfinite(timeout):
            nr.deadline = time.monotonic() + timeout
            self.at(timeout, "timeout", nr)
        self.start(child, cancelled=nr.run.cancel_requested and nr.cancel_at is not None)

    def sub_done(self, child: DispatchRun) -> None:
        """A child dispatch is final: its sublattice node ends as it did."""
        nr = child.parent
        if nr is None or nr.final:
            return
        nr.end_time = time.time()
        what = f"sublattice {nr.node.label} (dispatch {child.id})"
        if child.status == Status.COMPLETED:
            if nr.cancel_at is not None:
                nr.cancel_outcome = CancelOutcome.TOO_LATE
            nr.pickled = child.result_blob
            self.complete(nr, None)
        elif child.status == Status.FAILED and not nr.timed_out:
            if nr.cancel_at is not None:
                nr.cancel_outcome = CancelOutcome.TOO_LATE  # it failed before the cancel
            self.fail(nr, f"in {what}: {child.error}", "")
        else:
            outcome = sublattice_outcome([n.cancel_outcome for n in child.nodes])
            nr.cancel_outcome = outcome
            if nr.timed_out:
                err = TaskTimeoutError(
                    f"{nr.node.label} timed out after {nr.node.electron.timeout} s and its "
                    f"dispatch {child.id} was stopped ({outcome.value})"
                )
                self.fail(nr, err, "")
            else:
                self.cancelled(nr, nr.reason or f"{what} was cancelled")

    def resolve(self, run: DispatchRun, ref: Any, chained: bool = False) -> Any:
        if not isinstance(ref, Ref):
            return ref
        parent = run.nodes[ref.node_id]
        if chained and parent.status != Status.COMPLETED:
            return Upstream(parent.handle, parent.node.id)
        return parent.get_value()

    def chain_from(self, root: NodeRun) -> None:
        """Start every dependent of ``root`` (and theirs, ...) that can be chained on it."""
        self.chaining = True
        try:
            stack = [root]
            while stack:
                parent = stack.pop()
                if parent.final or parent.handle is None:
                    continue
                for cid in parent.run.children[parent.node.id]:
                    if self.ahead >= CHAIN_AHEAD:
                        return  # the rest is chained as these complete
                    child = parent.run.nodes[cid]
                    if self.can_chain(child):
                        self.ahead += 1
                        self.submit(child, chained=True)
                        stack.append(child)
        finally:
            self.chaining = False

    def can_chain(self, nr: NodeRun) -> bool:
        """Every parent completed or started (for good: no retry left) on the chaining
        executor ``nr`` runs on, and at least one not completed yet."""
        if nr.submitted or nr.final or nr.waiting == 0 or nr.node.kind != ELECTRON:
            return False
        if nr.run.cancel_requested:
            return False
        if nr.run.reuse is not None:
            return False  # a redispatch may reuse its output once its inputs are known
        ex = nr.executor
        if ex is None or not getattr(ex.capabilities, "chain", False):
            return False
        for pid in nr.node.parents:
            p = nr.run.nodes[pid]
            if p.status == Status.COMPLETED:
                continue
            if pid in nr.node.waits:
                return False  # an ordering edge carries no value: wait for it to complete
            if p.final or p.handle is None or p.executor is not ex or p.cancel_at is not None:
                return False
            if p.attempts <= p.retries:
                return False  # a retry would start a new task: the marker would be stale
        return True

    # ---------------------------------------------------------------- polling

    def poll(self, nr: NodeRun) -> None:
        if nr.final or nr.executor is None or nr.handle is None:
            return
        if nr.waiting and nr.cancel_at is None:
            return  # chained, and a parent is not complete here yet: read it then
        try:
            state = self.calls.poll(nr.executor, nr.handle)
        except Exception as exc:
            if nr.cancel_at is not None:
                # an error while stopping it: the cancel came first
                self.cancel_ended(nr, CancelOutcome.FAILED, {"error": error_text(exc)})
            else:
                self.fail(nr, exc, traceback.format_exc())
            return
        if isinstance(state, Running):
            if nr.status != Status.RUNNING:
                nr.start_time = state.started_at or time.time()
                extra = None
                if state.stdout_path or state.stderr_path:
                    nr.live = True
                    extra = {"live_output": json.dumps([state.stdout_path, state.stderr_path])}
                self.set(nr, Status.RUNNING, extra)
                timeout = nr.node.electron.timeout if nr.node.electron is not None else None
                if timeout and math.isfinite(timeout) and nr.deadline is None:
                    nr.deadline = time.monotonic() + timeout
                    self.at(timeout, "timeout", nr)
            return
        if not state.final:
            return
        if isinstance(state, Cancelled) and state.outcome == CancelOutcome.DEQUEUED:
            nr.start_time = None  # never started, whatever was said (a start taken back)
        else:
            nr.start_time = getattr(state, "started_at", None) or nr.start_time
        if nr.start_time is None and not isinstance(state, Cancelled):
            nr.start_time = time.time()  # a dequeued task never started: no start time
        nr.end_time = getattr(state, "ended_at", None) or time.time()
        out = {"stdout": state.stdout or None, "stderr": state.stderr or None}
        if isinstance(state, Completed):
            if nr.cancel_at is not None and nr.cancel_outcome != CancelOutcome.RUNS_TO_COMPLETION:
                nr.cancel_outcome = CancelOutcome.TOO_LATE
            nr.pickled = state.pickled
            if state.pickled is None:
                nr.value = state.value
            self.complete(nr, out)
        elif isinstance(state, Failed):
            self.failed(nr, state, out)
        elif isinstance(state, Cancelled):
            self.cancel_ended(nr, state.outcome, out)

    def failed(self, nr: NodeRun, state: Failed, out: dict[str, Any]) -> None:
        """The task raised. What happened first decides: its error, or the cancel."""
        ended = state.ended_at if state.ended_at is not None else time.time()
        error = {"error": error_text(state.error), "traceback": state.traceback or None}
        # the cancel reached it only if its executor answered, and not "too late" (it found
        # the task finished): else its own error came first, whatever the clocks say
        reached = nr.cancel_outcome not in (None, CancelOutcome.TOO_LATE)
        if nr.cancel_at is not None and (
            nr.upstream_cancel or (ended >= nr.cancel_at and reached)
        ):
            # it ended after the cancel was requested (its own SIGTERM handler, an error
            # while stopping): the cancel ended it; keep what it said
            self.cancel_ended(nr, nr.cancel_outcome, {**out, **error})
            return
        if nr.attempts <= nr.retries:
            if nr.cancel_at is None and not nr.run.cancel_requested:
                self.drop_handle(nr)
                self.batch.node(nr, {"attempts": nr.attempts, "error": error["error"]})
                self.submit(nr)
                return
            # failed before the cancel, which stops the retry that was to start
            nr.cancel_outcome = CancelOutcome.DEQUEUED
            self.cancel_ended(nr, CancelOutcome.DEQUEUED, {**out, **error})
            return
        if nr.cancel_at is not None:
            nr.cancel_outcome = CancelOutcome.TOO_LATE  # failed before the cancel came
        self.fail(nr, state.error, state.traceback, out)

    def cancel_ended(
        self, nr: NodeRun, outcome: CancelOutcome | None, out: dict[str, Any] | None
    ) -> None:
        """The task ended after its cancel was requested: CANCELLED (or timed out)."""
        if outcome is None:
            # ended before the executor answered the cancel: say what it was doing
            outcome = CancelOutcome.KILLED if nr.start_time is not None else CancelOutcome.DEQUEUED
        nr.cancel_outcome = outcome
        if nr.upstream_cancel and outcome == CancelOutcome.DEQUEUED:
            nr.cancel_outcome = None  # never started: shown as any node after a failure
        if nr.timed_out:
            err = TaskTimeoutError(
                f"{nr.node.label} timed out after {nr.node.electron.timeout} s and was "
                f"stopped ({outcome.value})"
            )
            self.fail(nr, err, "", {k: v for k, v in (out or {}).items() if k != "error"})
        elif nr.upstream_cancel:
            self.cancelled(nr, "upstream", out)
        else:
            self.cancelled(nr, nr.reason or "cancel requested", out)

    # ---------------------------------------------------------------- node changes

    def set(self, nr: NodeRun, status: Status, extra: dict[str, Any] | None = None) -> None:
        was, nr.status = nr.status, status
        fields: dict[str, Any] = {"status": _VALUE[status]}
        final = status in FINAL
        if status is Status.RUNNING or (final and (
                nr.start_time is not None or was is Status.RUNNING)):  # (a start taken back)
            fields["start_time"] = nr.start_time
        if final:
            fields["end_time"] = nr.end_time or time.time()
            if nr.live:
                fields["live_output"] = None
            if nr.cancel_outcome is not None:
                fields["cancel_outcome"] = nr.cancel_outcome.value
                if nr.cancel_outcome in (CancelOutcome.KILLED, CancelOutcome.DEQUEUED):
                    fields["cancel_confirmed_at"] = time.time()
            if nr.attempts:
                fields["attempts"] = nr.attempts
            if nr.executor is not None and nr.submitted:
                fields["executor"] = nr.executor.name
        if extra:
            fields.update(extra)
        self.batch.node(nr, fields)
        if self.observers:
            self.observed(nr, status)
        if final:
            if nr.chained and nr.waiting:
                self.ahead -= 1  # ended before its parents completed here
            self.drop_handle(nr)  # the executor's record of it (and what it holds) can go
            nr.run.remaining -= 1
            release_inputs(nr)
            self.check_done(nr.run)

    def drop_handle(self, nr: NodeRun) -> None:
        """Forget the executor's handle of ``nr`` (it ended, or a retry starts anew)."""
        if nr.handle is not None:
            if not nr.chained:
                self.plain -= 1
            nr.handle = None

    def observed(self, nr: NodeRun, status: Status) -> None:
        """Tell the lifecycle observers (``valent_node_status``) of a node's new status."""
        try:
            self.plugins.node_status(nr.run.id, nr.node.id, nr.node.name, status)
        except Exception:
            traceback.print_exc()

    def complete(self, nr: NodeRun, out: dict[str, Any] | None) -> None:
        extra = dict(out or {})
        try:
            if nr.pickled is None and nr.output_file:
                nr.get_value()  # a reused output kept in a file: read it
            blob = nr.pickled if nr.pickled is not None else cloudpickle.dumps(nr.value)
        except Exception as exc:
            self.fail(nr, ValentError(f"its return value cannot be pickled: {exc}"), "", out)
            return
        try:
            extra.update(nr.run.store.output_fields(nr.run.id, nr.node.id, blob))
        except StoreError as exc:
            # computed, but there is no room to keep it: say it is lost, stop the dispatch
            lost = ValentError(
                f"it completed, but its output ({len(blob)} bytes) could not be stored and "
                f"is lost: {exc}"
            )
            self.fail(nr, lost, "", out)
            self.store_failed(nr.run.store, exc)
            return
        if nr.node.kind != PARAMETER:
            nr.out_digest = extra["out_digest"] = blob_digest(blob)
            if nr.node.kind != SUBLATTICE:
                extra["fn_digest"] = self.fn_digest(nr)
                extra["in_digest"] = self.in_digest(nr)
        if nr.attempts > 1 and nr.error is None:
            # earlier attempts failed: the node succeeded, say so rather than keep their error
            extra.setdefault("error", None)
            extra.setdefault("traceback", None)
            extra.setdefault("reason", f"succeeded on attempt {nr.attempts}")
        self.set(nr, Status.COMPLETED, extra)
        self.release_children(nr)

    def fail(self, nr: NodeRun, error: Any, tb: str, out: dict[str, Any] | None = None) -> None:
        nr.error = error_text(error)
        extra = {"error": nr.error, "traceback": tb or None, **(out or {})}
        nr.end_time = nr.end_time or time.time()
        self.set(nr, Status.FAILED, extra)
        self.cascade(nr, f"upstream: {nr.node.label} failed")

    def cancelled(self, nr: NodeRun, reason: str, out: dict[str, Any] | None = None) -> None:
        nr.end_time = nr.end_time or time.time()
        self.set(nr, Status.CANCELLED, {**(out or {}), "reason": reason})
        self.cascade(nr, f"upstream: {nr.node.label} cancelled")

    def cascade(self, nr: NodeRun, reason: str) -> None:
        """Dependents of a failed or cancelled node never start."""
        stack = list(nr.run.children[nr.node.id])
        while stack:
            child = nr.run.nodes[stack.pop()]
            if child.final or child.cancel_at is not None:
                continue
            if child.chained:  # its executor has it: stop it there, then say what happened
                child.upstream_cancel = True
                self.cancel_node(child, "upstream", requested=False)
                stack.extend(nr.run.children[child.node.id])
                continue
            if child.submitted:
                continue
            child.reason = reason
            child.end_time = time.time()
            self.set(child, Status.CANCELLED, {"reason": "upstream"})
            stack.extend(nr.run.children[child.node.id])

    # ---------------------------------------------------------------- cancelling

    def cancel(self, dispatch_id: str, task_ids: list[int] | None, reason: str = "") -> str:
        """Cancel a whole dispatch or the listed nodes and their dependents."""
        run = self.runs.get(dispatch_id)
        if run is None:
            status = self.store.dispatch_status(dispatch_id)
            return f"Dispatch {dispatch_id} already finished ({status}); nothing to cancel."
        problem = check_task_ids(dispatch_id, task_ids, len(run.nodes))
        if problem:
            return problem
        reason = reason or "cancel requested"
        if task_ids is None:
            targets = [nr for nr in run.nodes if nr.status not in FINAL]
            run.cancel_requested = True
        else:
            wanted: dict[int, None] = {}
            stack = list(task_ids)
            while stack:
                t = stack.pop()
                if t not in wanted:
                    wanted[t] = None
                    stack.extend(run.children[t])
            targets = [run.nodes[t] for t in sorted(wanted) if not run.nodes[t].final]
        now = time.time()
        targets = self.dequeue_unstarted(run, targets, reason, now, task_ids is None)
        for nr in reversed(targets):  # dependents first: each is dequeued in its own right
            if nr.final or nr.cancel_at is not None:
                continue
            nr.cancel_at = now
            self.batch.node(nr, {"cancel_requested_at": now})
            self.cancel_node(nr, reason)
        if task_ids is None and self.ready:  # none of its nodes is to start now
            self.ready = deque(nr for nr in self.ready if nr.run is not run)
        if task_ids is None and run.status == Status.RUNNING and run.remaining:
            run.status = Status.CANCELLING
            self.batch.dispatch(
                run, {"status": Status.CANCELLING.value, "cancel_requested_at": now}
            )
        self.check_done(run)
        if task_ids is None:
            return f"Dispatch {dispatch_id} cancelled."
        return f"Dispatch {dispatch_id}: cancelled task(s) {sorted(set(task_ids))} and dependents."

    def dequeue_unstarted(
        self, run: DispatchRun, targets: list[NodeRun], reason: str, now: float, whole: bool
    ) -> list[NodeRun]:
        """Cancel every target that was never handed to an executor (``dequeued``, each in
        its own right, as ``cancel_node`` would), written in one statement; return the
        others, to cancel one by one. ``whole``: the whole dispatch is cancelled (its values
        go with it: no input is released node by node)."""
        rest: list[NodeRun] = []
        ids: list[int] = []
        dequeued, cancelled = CancelOutcome.DEQUEUED, Status.CANCELLED
        for nr in targets:
            if nr.submitted or nr.final or nr.cancel_at is not None:
                rest.append(nr)
                continue
            nr.cancel_at = nr.end_time = now
            nr.reason = reason
            nr.submitted = True  # never to start
            nr.cancel_outcome = dequeued
            nr.status = cancelled
            ids.append(nr.node.id)
            if not whole and nr.node.parents:
                release_inputs(nr)
        if ids:
            run.remaining -= len(ids)
            fields = {
                "cancel_requested_at": now, "status": cancelled.value, "end_time": now,
                "cancel_outcome": dequeued.value, "cancel_confirmed_at": now, "reason": reason,
            }
            self.batch.many(run, fields, ids)
            if self.observers:
                for nid in ids:
                    self.observed(run.nodes[nid], cancelled)
        return rest

    def cancel_node(self, nr: NodeRun, reason: str, requested: bool = True) -> None:
        """Cancel one node: at once if it is not started, else through its executor (sent
        with the turn's other cancels). ``requested``: a user's or a timeout's cancel (kept
        in the store), not the cascade of an upstream failure."""
        if nr.final:
            return
        nr.reason = reason
        if nr.cancel_at is None:
            nr.cancel_at = time.time()
            if requested:
                self.batch.node(nr, {"cancel_requested_at": nr.cancel_at})
        if nr.sub is not None:  # a running sublattice: cancel its dispatch, every level
            self.cancel(nr.sub.id, None, reason)
            return
        if not nr.submitted or nr.handle is None:
            nr.submitted = True  # never to start
            nr.cancel_outcome = CancelOutcome.DEQUEUED
            nr.end_time = time.time()
            self.cancelled(nr, reason)
            return
        self.send_cancel(nr)

    def send_cancel(self, nr: NodeRun) -> None:
        """Queue ``nr``'s cancel; the turn sends each executor its queue in one batch."""
        self.cancels[id(nr)] = nr

    def send_cancels(self) -> None:
        queued, self.cancels = self.cancels, {}
        groups: dict[int, tuple[Executor, list[NodeRun]]] = {}
        for nr in queued.values():
            if not nr.final and nr.handle is not None:
                groups.setdefault(id(nr.executor), (nr.executor, []))[1].append(nr)
        for ex, nrs in groups.values():
            for nr in nrs:
                nr.cancel_tries += 1
            try:
                outcomes = list(self.calls.cancel_many(ex, [nr.handle for nr in nrs]))
                if len(outcomes) != len(nrs):
                    raise ValueError(
                        f"{type(ex).__name__}.cancel_many returned {len(outcomes)} outcomes "
                        f"for {len(nrs)} tasks"
                    )
            except Exception as exc:
                outcomes = [CancelOutcome.FAILED] * len(nrs)
                for nr in nrs:
                    self.batch.node(nr, {"reason": f"cancel failed: {exc!r}"})
            for nr, outcome in zip(nrs, outcomes, strict=True):
                self.cancel_sent(nr, outcome)

    def cancel_sent(self, nr: NodeRun, outcome: CancelOutcome | None) -> None:
        try:
            outcome = CancelOutcome(outcome) if outcome is not None else CancelOutcome.FAILED
        except ValueError:
            outcome = CancelOutcome.FAILED
        if outcome == CancelOutcome.FAILED and nr.cancel_tries < CANCEL_RETRIES:
            self.at(0.5 * nr.cancel_tries, "recancel", nr)
            return
        nr.cancel_outcome = outcome
        if not nr.upstream_cancel:  # shown while confirmed; after a failure, only the end
            self.batch.node(nr, {"cancel_outcome": outcome.value})
        self.poll(nr)

    def external_cancels(self) -> None:
        """Cancel requests other processes left in the store (``valent cancel``)."""
        by_store: dict[int, tuple[Store, list[str]]] = {}
        for run in self.runs.values():
            by_store.setdefault(id(run.store), (run.store, []))[1].append(run.id)
        for store, ids in by_store.values():
            try:
                requests = store.take_cancel_requests(ids)
            except StoreError:
                continue
            for did, task_ids in requests:
                self.cancel(did, task_ids)

    # ---------------------------------------------------------------- finishing dispatches

    def check_done(self, run: DispatchRun) -> None:
        if run.remaining > 0 or run.status.is_final or run.status == Status.NEW_OBJECT:
            return
        status = lattice_status(
            [nr.status for nr in run.nodes], [nr.cancel_outcome for nr in run.nodes]
        )
        fields: dict[str, Any] = {"status": status.value, "end_time": time.time()}
        if run.store_error is not None:
            status = Status.FAILED
            fields.update(status=status.value, error=store_failure_text(run.store_error))
        elif status == Status.COMPLETED:
            try:
                value = structure_value(run, run.graph.result)
                blob = cloudpickle.dumps(value)
                f = run.store.output_fields(run.id, None, blob)
                fields.update({"result": f["output"], "result_file": f["output_file"]})
                run.result_blob = blob
            except Exception as exc:
                status = Status.FAILED
                fields["status"] = status.value
                fields["error"] = f"the lattice's return value cannot be stored: {exc}"
        elif status == Status.FAILED:
            failed = [nr for nr in run.nodes if nr.status == Status.FAILED]
            fields["error"] = "; ".join(f"{nr.node.label}: {nr.error}" for nr in failed[:5])
        run.status = status
        run.error = fields.get("error")
        self.batch.dispatch(run, fields)
        self.finishing.append(run)
        if run.parent is not None:
            self.sub_done(run)

    def store_of(self, dispatch_id: str) -> Store:
        run = self.runs.get(dispatch_id)
        return run.store if run is not None and run.store is not None else self.store

    def flush(self, force: bool = False) -> None:
        """Write the batch when it is due (``FLUSH_EVERY``), too big, ``force``d (a cancel's
        reply waits for it) or a dispatch ends; then finish the dispatches that ended."""
        if self.batch:
            now = time.monotonic()
            if self.flush_due is None:
                self.flush_due = now + FLUSH_EVERY
            if (
                force
                or self.finishing
                or now >= self.flush_due
                or len(self.batch.nodes) >= FLUSH_MAX
            ):
                self.flush_due = None
                self.write_batch()
                if self.cancels or self.repoll:  # a store error stopped dispatches: do it now
                    self.drain()
                    self.write_batch()
        finishing, self.finishing = self.finishing, []
        for run in finishing:
            if run.store_error is not None:
                self.write_final_after_error(run)
            self.runs.pop(run.id, None)
            for ex in run.executor_objs:
                try:
                    ex.close_dispatch(run.id)
                except Exception:
                    traceback.print_exc()
            if self.observers:
                try:
                    self.plugins.dispatch_finished(run.id, run.status)
                except Exception:
                    traceback.print_exc()
            self.forget(run)
            run.done.set()

    def write_batch(self) -> None:
        """One transaction per store for the turn's node and dispatch changes.

        A failed write keeps the changes (to be written with the final state) and stops
        every dispatch of that store (see ``store_failed``).
        """
        if not self.batch:
            return
        nodes, dispatches, bulk = self.batch.take()
        # each dispatch goes to the store it was created in (VALENT_RESULTS_DIR may differ)
        batches: dict[int, tuple[Store, dict, dict, list]] = {}
        for b in bulk:
            st = self.store_of(b[0])
            batches.setdefault(id(st), (st, {}, {}, []))[3].append(b)
        for key, f in nodes.items():
            st = self.store_of(key[0])
            batches.setdefault(id(st), (st, {}, {}, []))[1][key] = f
        for d, f in dispatches.items():
            st = self.store_of(d)
            batches.setdefault(id(st), (st, {}, {}, []))[2][d] = f
        for st, bn, bd, bb in batches.values():
            try:
                st.apply([(d, n, f) for (d, n), f in bn.items()], list(bd.items()), bb)
            except StoreError as exc:
                if len(bn) > 1:  # keep what fits: written one by one, the rest put back
                    bn, bd, bb = self.write_one_by_one(st, bn, bd, bb)
                self.batch.put_back(bn, bd, bb)
                self.store_failed(st, exc)

    def write_one_by_one(
        self, st: Store, nodes: dict, dispatches: dict, bulk: list
    ) -> tuple[dict, dict, list]:
        """After a batch did not fit (a full disk): write its changes one transaction each,
        so every output that still fits is stored (nothing computed is lost for want of room
        for the whole batch). Returns what could not be written."""
        left_bulk = []
        for b in bulk:
            try:
                st.apply([], [], [b])
            except StoreError:
                left_bulk.append(b)
        if left_bulk:  # per-node changes go after the bulk ones: keep them together
            return nodes, dispatches, left_bulk
        left_nodes = {}
        for key, f in nodes.items():
            try:
                st.apply([(key[0], key[1], f)], [], [])
            except StoreError:
                left_nodes[key] = f
        return left_nodes, dispatches, []

    def store_failed(self, store: Store, exc: StoreError) -> None:
        """A write to ``store`` failed: stop each of its dispatches, which end FAILED."""
        for run in list(self.runs.values()):
            if run.store is not store or run.store_error is not None:
                continue
            run.store_error = exc
            print(
                f"valent: dispatch {run.id}: {store_failure_text(exc)}; stopping it",
                file=sys.stderr,
            )
            if not run.status.is_final:
                self.cancel(run.id, None, reason=f"stopped: {store_failure_text(exc)}")

    def write_final_after_error(self, run: DispatchRun) -> None:
        """Write the final state of a dispatch stopped by a store error, as far as the
        store allows; say on stderr what could not be written."""
        nodes = {k: f for k, f in self.batch.nodes.items() if k[0] == run.id}
        disp = self.batch.dispatches.get(run.id)
        bulk = [b for b in self.batch.bulk if b[0] == run.id]
        if not nodes and disp is None and not bulk:
            return  # already written with the turn's batch
        for k in nodes:
            del self.batch.nodes[k]
        self.batch.dispatches.pop(run.id, None)
        self.batch.bulk = [b for b in self.batch.bulk if b[0] != run.id]
        node_rows = [(d, n, f) for (d, n), f in nodes.items()]
        disp_rows = [(run.id, disp)] if disp is not None else []
        writer = getattr(run.store, "write_after_error", None)
        try:
            if writer is not None:
                writer(node_rows, disp_rows, bulk)
            else:
                run.store.apply(node_rows, disp_rows, bulk)
        except StoreError as exc:
            print(
                f"valent: dispatch {run.id}: its final state could not be stored ({exc}); "
                "what the store shows for it is out of date",
                file=sys.stderr,
            )


def store_failure_text(exc: StoreError) -> str:
    return f"the results store failed: {exc}"


def _waker(q: queue.SimpleQueue, nr: NodeRun) -> Callable[[], None]:
    item = (_WAKE, nr)
    return lambda: q.put(item)


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()
