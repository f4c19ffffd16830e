"""The embedded dispatcher: one background thread per process that runs every dispatch it owns.

Event-driven: executors call a task's ``wake`` and the thread polls just that task; timers
cover electron timeouts, cancel retries and executors that ask for safety-net polls. Node
changes are written to the store in one transaction per loop turn, and cancels go to each
executor in one batch per turn.

Chaining: on an executor that declares ``Capabilities(chain=True)``, a node whose parents
are all completed or started on that same executor is started at once, its missing inputs
given as :class:`valent.task.Upstream` markers; the executor passes the values where the
tasks run (Dask: worker to worker). Such a node stays NEW_OBJECT in the store until its
parents complete here, and its state is read only then, so what a user sees is the same as
without chaining; a parent that fails or is cancelled cancels it (the executor never runs
its body).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle

from .cancelling import CancelMixin
from .errors import StoreError, TaskTimeoutError, ValentError
from .executor import Executor
from .graph import ELECTRON, PARAMETER, Ref
from .plugins import Plugins
from .rules import lattice_status
from .runstate import (
    DispatchRun,
    NodeRun,
    compute_inline,
    error_text,
    release_inputs,
    structure_value,
)
from .status import CancelOutcome, Status
from .store import Store
from .task import Cancelled, Completed, Failed, Running, Task, Upstream

EXTERNAL_CANCEL_EVERY = 0.2
_WAKE, _START, _CANCEL, _CALL = range(4)


class Dispatcher(CancelMixin):
    """Runs dispatches on a background thread; create one per process with ``get_dispatcher``."""

    def __init__(self, store: Store, plugins: Plugins):
        self.store = store
        self.plugins = plugins
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.runs: dict[str, DispatchRun] = {}
        self._named: dict[str, Executor] = {}
        self._used: dict[int, Executor] = {}
        self._timers: list[tuple[float, int, Any, Any]] = []
        self._seq = itertools.count()
        self._nupd: dict[tuple[str, int], dict[str, Any]] = {}
        self._dupd: dict[str, dict[str, Any]] = {}
        self._finishing: list[DispatchRun] = []
        self._cancels: dict[int, NodeRun] = {}  # cancels to send this turn, in order
        self._repoll: collections.deque[NodeRun] = collections.deque()
        self._chaining = False
        self._next_external = 0.0
        self._observers = plugins.has_observers
        # follow the process's plugins when built from them: a plugin registered (or
        # valent.timing enabled) after the first dispatch still takes part
        from .plugins import get_plugins

        self._follow_plugins = plugins is get_plugins()
        self.owner = (os.getpid(), socket.gethostname(), _process_start())
        self._thread = threading.Thread(target=self._loop, name="valent-dispatcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public (any thread)

    def start(self, run: DispatchRun) -> None:
        """Begin running ``run`` (already written to its store)."""
        if run.store is None:
            run.store = self.store
        self.runs[run.id] = run
        self.q.put((_START, run))

    def cancel(self, dispatch_id: str, task_ids: list[int] | None) -> str:
        """Cancel a dispatch this process owns; returns the message for the user."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self.q.put((_CANCEL, (dispatch_id, task_ids, reply)))
        answer = reply.get()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the dispatcher thread and return its result (for tests, tools)."""
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self.q.put((_CALL, (fn, reply)))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def named_executor(self, name: str) -> Executor | None:
        """The shared instance this dispatcher made for an executor name, if any."""
        return self._named.get(name)

    def active(self) -> list[DispatchRun]:
        return list(self.runs.values())

    def shutdown_executors(self) -> None:
        """Shut down every executor this dispatcher used (at interpreter exit)."""
        for ex in list(self._used.values()):
            try:
                ex.shutdown()
            except Exception:
                traceback.print_exc()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # a bug here must not stop every dispatch in the process
                traceback.print_exc()

    def _turn(self) -> None:
        timeout = self._timeout()
        try:
            events = [self.q.get(timeout=timeout)]
        except queue.Empty:
            events = []
        if self._follow_plugins:
            from .plugins import get_plugins

            self.plugins = get_plugins()
        self._observers = self.plugins.has_observers
        while True:
            try:
                events.append(self.q.get_nowait())
            except queue.Empty:
                break
        woken: dict[int, NodeRun] = {}
        # cancel replies wait for this turn's flush: once cancel() returns, a get_result()
        # sees CANCELLING (or the final status), never the RUNNING of before the cancel
        replies: list[tuple[queue.SimpleQueue, Any]] = []
        try:
            for kind, payload in events:
                if kind == _WAKE:
                    woken[id(payload)] = payload
                elif kind == _START:
                    self._start(payload)
                elif kind == _CANCEL:
                    did, task_ids, reply = payload
                    try:
                        replies.append((reply, self._cancel(did, task_ids)))
                    except Exception as exc:
                        replies.append((reply, exc))
                elif kind == _CALL:
                    fn, reply = payload
                    try:
                        reply.put((True, fn()))
                    except Exception as exc:
                        reply.put((False, exc))
            for nr in woken.values():
                self._poll(nr)
            self._fire_timers()
            now = time.monotonic()
            if self.runs and now >= self._next_external:
                self._next_external = now + EXTERNAL_CANCEL_EVERY
                self._external_cancels()
            self._drain()
            self._flush()
        finally:
            for reply, answer in replies:
                reply.put(answer)

    def _timeout(self) -> float | None:
        if self._cancels or self._repoll:
            return 0.0
        t: float | None = None
        if self._timers:
            t = max(0.0, self._timers[0][0] - time.monotonic())
        if self.runs:
            t = EXTERNAL_CANCEL_EVERY if t is None else min(t, EXTERNAL_CANCEL_EVERY)
        return t

    def _drain(self) -> None:
        """Poll chained nodes whose parents just completed; send the turn's cancels."""
        while self._repoll or self._cancels:
            while self._repoll:
                self._poll(self._repoll.popleft())
            if self._cancels:
                self._send_cancels()

    def _at(self, delay: float, what: Any, nr: Any) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), what, nr))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, what, nr = heapq.heappop(self._timers)
            if nr.final:
                continue
            if (
                what == "timeout"
                and nr.deadline is not None
                and now >= nr.deadline - 0.001
                and not nr.timed_out
            ):
                nr.timed_out = True
                self._cancel_node(nr, "timeout")
            elif what == "poll":
                self._poll(nr)
                if not nr.final and nr.executor is not None and nr.executor.poll_interval:
                    self._at(nr.executor.poll_interval, "poll", nr)
            elif what == "recancel":
                self._send_cancel(nr)

    # ------------------------------------------------------------------ starting

    def _start(self, run: DispatchRun) -> None:
        now = time.time()
        run.status = Status.RUNNING
        self._dupd[run.id] = {"status": Status.RUNNING.value, "start_time": now}
        ready = []
        for nr in run.nodes:
            if nr.node.kind == PARAMETER:
                nr.value = nr.node.value
                nr.start_time = nr.end_time = now
                self._set(nr, Status.COMPLETED)
            elif nr.waiting == 0:
                ready.append(nr)
        for nr in run.nodes:
            if nr.node.kind == PARAMETER:
                self._release_children(nr)
        for nr in ready:
            if not nr.final and not nr.submitted:
                self._submit(nr)
        self._check_done(run)

    def _release_children(self, nr: NodeRun) -> None:
        run = nr.run
        for cid in run.children[nr.node.id]:
            child = run.nodes[cid]
            child.waiting -= 1
            if child.waiting != 0 or child.final:
                continue
            if child.chained:  # started already: now its state counts
                if child.status == Status.NEW_OBJECT and child.cancel_at is None:
                    self._set(child, Status.PENDING)
                self._repoll.append(child)
            elif not run.cancel_requested:
                self._submit(child)

    def _submit(self, nr: NodeRun, chained: bool = False) -> None:
        node = nr.node
        nr.submitted = True
        nr.chained = chained
        try:
            args = tuple(self._resolve(nr.run, a, chained) for a in node.args)
            kwargs = {k: self._resolve(nr.run, v, chained) for k, v in node.kwargs.items()}
        except Exception as exc:
            self._fail(nr, exc, traceback.format_exc())
            return
        if node.kind != ELECTRON:
            try:
                nr.value = compute_inline(node, args, kwargs)
            except Exception as exc:
                self._fail(nr, exc, traceback.format_exc())
                return
            nr.start_time = nr.end_time = time.time()
            self._complete(nr, None)
            return
        try:
            executor = self._executor_for(nr)
        except Exception as exc:  # a bad config or an executor that cannot be made
            self._fail(nr, exc, "" if isinstance(exc, ValentError) else traceback.format_exc())
            return
        nr.attempts += 1
        electron = node.electron
        task = Task(
            nr.run.id, node.id, node.name, node.fn, args, kwargs,
            electron.timeout if electron else None, nr.attempts,
        )
        try:
            nr.handle = self.plugins.run(executor, task, _waker(self.q, nr))
        except Exception as exc:
            self._fail(nr, exc, traceback.format_exc())
            return
        if not chained:
            self._set(nr, Status.PENDING)
        nr.deadline = None  # a timeout counts from when the task is running
        if executor.poll_interval:
            self._at(executor.poll_interval, "poll", nr)
        if not self._chaining and getattr(executor.capabilities, "chain", False):
            self._chain_from(nr)

    def _resolve(self, run: DispatchRun, ref: Any, chained: bool = False) -> Any:
        if not isinstance(ref, Ref):
            return ref
        parent = run.nodes[ref.node_id]
        if chained and parent.status != Status.COMPLETED:
            return Upstream(parent.handle, parent.node.id)
        return parent.get_value()

    def _chain_from(self, root: NodeRun) -> None:
        """Start every dependent of ``root`` (and theirs, ...) that can be chained on it."""
        self._chaining = True
        try:
            stack = [root]
            while stack:
                parent = stack.pop()
                if parent.final or parent.handle is None:
                    continue
                for cid in parent.run.children[parent.node.id]:
                    child = parent.run.nodes[cid]
                    if self._can_chain(child):
                        self._submit(child, chained=True)
                        stack.append(child)
        finally:
            self._chaining = False

    def _can_chain(self, nr: NodeRun) -> bool:
        """Every parent completed or started (for good: no retry left) on the chaining
        executor ``nr`` runs on, and at least one not completed yet."""
        if nr.submitted or nr.final or nr.waiting == 0 or nr.node.kind != ELECTRON:
            return False
        if nr.run.cancel_requested:
            return False
        try:
            ex = self._executor_for(nr)
        except Exception:  # reported when it is submitted the usual way
            return False
        if not getattr(ex.capabilities, "chain", False):
            return False
        for pid in nr.node.parents:
            p = nr.run.nodes[pid]
            if p.status == Status.COMPLETED:
                continue
            if p.final or p.handle is None or p.executor is not ex or p.cancel_at is not None:
                return False
            if p.attempts <= (p.node.electron.retries if p.node.electron else 0):
                return False  # a retry would start a new task: the marker would be stale
        return True

    def _executor_for(self, nr: NodeRun) -> Executor:
        electron = nr.node.electron
        spec = electron.executor if electron is not None else None
        if spec is None:
            spec = nr.run.graph.executor
        if spec is None:
            from .config import default_executor_name

            spec = default_executor_name()
        if isinstance(spec, Executor):
            ex = spec
        else:
            ex = self._named.get(spec)
            if ex is None:
                ex = self._named[spec] = make_executor(self.plugins, spec)
        nr.executor = ex
        if id(ex) not in nr.run.executors:
            nr.run.executors.add(id(ex))
            nr.run.executor_objs.append(ex)
        self._used[id(ex)] = ex
        return ex

    # ------------------------------------------------------------------ polling

    def _poll(self, nr: NodeRun) -> None:
        if nr.final or nr.executor is None or nr.handle is None:
            return
        if nr.waiting and nr.cancel_at is None:
            return  # chained, and a parent is not complete here yet: read it then
        try:
            state = self.plugins.poll(nr.executor, nr.handle)
        except Exception as exc:
            self._fail(nr, exc, traceback.format_exc())
            return
        if isinstance(state, Running):
            if nr.status != Status.RUNNING:
                nr.start_time = state.started_at or time.time()
                extra = None
                if state.stdout_path or state.stderr_path:
                    nr.live = True
                    extra = {"live_output": json.dumps([state.stdout_path, state.stderr_path])}
                self._set(nr, Status.RUNNING, extra)
                electron = nr.node.electron
                if electron is not None and electron.timeout and nr.deadline is None:
                    nr.deadline = time.monotonic() + electron.timeout
                    self._at(electron.timeout, "timeout", nr)
            return
        if not state.final:
            return
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
            self._complete(nr, out)
        elif isinstance(state, Failed):
            if (
                nr.attempts <= (nr.node.electron.retries if nr.node.electron else 0)
                and nr.cancel_at is None
            ):
                nr.handle = None
                self._upd(nr, {"attempts": nr.attempts, "error": error_text(state.error)})
                self._submit(nr)
                return
            self._fail(nr, state.error, state.traceback, out)
        elif isinstance(state, Cancelled):
            nr.cancel_outcome = state.outcome
            if nr.upstream_cancel and state.outcome == CancelOutcome.DEQUEUED:
                nr.cancel_outcome = None  # never started: shown as any node after a failure
            if nr.timed_out:
                err = TaskTimeoutError(
                    f"{nr.node.label} timed out after {nr.node.electron.timeout} s and was "
                    f"stopped ({state.outcome.value})"
                )
                self._fail(nr, err, "", out)
            else:
                self._cancelled(nr, nr.reason or "cancel requested", out)

    # ------------------------------------------------------------------ finishing nodes

    def _set(self, nr: NodeRun, status: Status, extra: dict[str, Any] | None = None) -> None:
        nr.status = status
        fields: dict[str, Any] = {"status": status.value}
        if status == Status.RUNNING or (status.is_final and nr.start_time is not None):
            fields["start_time"] = nr.start_time
        if status.is_final:
            fields["end_time"] = nr.end_time or time.time()
            if nr.live:
                fields["live_output"] = None
            if nr.cancel_outcome is not None:
                fields["cancel_outcome"] = nr.cancel_outcome.value
                if nr.cancel_outcome in (CancelOutcome.KILLED, CancelOutcome.DEQUEUED):
                    fields["cancel_confirmed_at"] = time.time()
            if nr.attempts:
                fields["attempts"] = nr.attempts
            if nr.executor is not None:
                fields["executor"] = nr.executor.name
        if extra:
            fields.update(extra)
        self._upd(nr, fields)
        if self._observers:
            try:
                self.plugins.node_status(nr.run.id, nr.node.id, nr.node.name, status)
            except Exception:
                traceback.print_exc()
        if status.is_final:
            nr.run.remaining -= 1
            release_inputs(nr)
            self._check_done(nr.run)

    def _upd(self, nr: NodeRun, fields: dict[str, Any]) -> None:
        key = (nr.run.id, nr.node.id)
        cur = self._nupd.get(key)
        if cur is None:
            self._nupd[key] = fields
        else:
            cur.update(fields)

    def _complete(self, nr: NodeRun, out: dict[str, Any] | None) -> None:
        extra = dict(out or {})
        try:
            blob = nr.pickled if nr.pickled is not None else cloudpickle.dumps(nr.value)
            extra.update(nr.run.store.output_fields(nr.run.id, nr.node.id, blob))
        except Exception as exc:
            # an output that cannot be kept fails the node, and the dispatch stops cleanly
            # (what is already stored stays as it is)
            self._fail(nr, ValentError(f"its output could not be stored: {exc}"), "", out)
            if not nr.run.cancel_requested:
                self._cancel(nr.run.id, None)
            return
        if nr.attempts > 1 and nr.error is None:
            # earlier attempts failed: the node succeeded, say so rather than keep their error
            extra.setdefault("error", None)
            extra.setdefault("traceback", None)
            extra.setdefault("reason", f"succeeded on attempt {nr.attempts}")
        self._set(nr, Status.COMPLETED, extra)
        self._release_children(nr)

    def _fail(self, nr: NodeRun, error: Any, tb: str, out: dict[str, Any] | None = None) -> None:
        nr.error = error_text(error)
        extra = {"error": nr.error, "traceback": tb or None, **(out or {})}
        nr.end_time = time.time()
        self._set(nr, Status.FAILED, extra)
        self._cascade(nr, f"upstream: {nr.node.label} failed")

    def _cancelled(self, nr: NodeRun, reason: str, out: dict[str, Any] | None = None) -> None:
        nr.end_time = nr.end_time or time.time()
        self._set(nr, Status.CANCELLED, {"reason": reason, **(out or {})})
        self._cascade(nr, f"upstream: {nr.node.label} cancelled")

    def _cascade(self, nr: NodeRun, reason: str) -> None:
        """Dependents of a failed or cancelled node never start."""
        stack = list(nr.run.children[nr.node.id])
        while stack:
            child = nr.run.nodes[stack.pop()]
            if child.final or child.cancel_at is not None:
                continue
            if child.chained:  # its executor has it: stop it there, then say what happened
                child.upstream_cancel = True
                self._cancel_node(child, "upstream", requested=False)
                stack.extend(nr.run.children[child.node.id])
                continue
            if child.submitted:
                continue
            child.reason = reason
            child.end_time = time.time()
            self._set(child, Status.CANCELLED, {"reason": "upstream"})
            stack.extend(nr.run.children[child.node.id])

    # ------------------------------------------------------------------ finishing dispatches

    def _check_done(self, run: DispatchRun) -> None:
        if run.remaining > 0 or run.status.is_final or run.status == Status.NEW_OBJECT:
            return
        status = lattice_status(
            [nr.status for nr in run.nodes], [nr.cancel_outcome for nr in run.nodes]
        )
        fields: dict[str, Any] = {"status": status.value, "end_time": time.time()}
        if status == Status.COMPLETED:
            try:
                value = structure_value(run, run.graph.result)
                blob = cloudpickle.dumps(value)
                f = run.store.output_fields(run.id, None, blob)
                fields.update({"result": f["output"], "result_file": f["output_file"]})
            except Exception as exc:
                status = Status.FAILED
                fields["status"] = status.value
                fields["error"] = f"the lattice's return value cannot be stored: {exc}"
        elif status == Status.FAILED:
            failed = [nr for nr in run.nodes if nr.status == Status.FAILED]
            fields["error"] = "; ".join(f"{nr.node.label}: {nr.error}" for nr in failed[:5])
        run.status = status
        self._dupd.setdefault(run.id, {}).update(fields)
        self._finishing.append(run)

    def _store_of(self, dispatch_id: str) -> Store:
        run = self.runs.get(dispatch_id)
        return run.store if run is not None and run.store is not None else self.store

    def _flush(self) -> None:
        self._write_updates()
        if self._cancels or self._repoll:  # a store error cancelled dispatches: do it now
            self._drain()
            self._write_updates()
        finishing, self._finishing = self._finishing, []
        for run in finishing:
            self.runs.pop(run.id, None)
            for ex in run.executor_objs:
                try:
                    ex.close_dispatch(run.id)
                except Exception:
                    traceback.print_exc()
            if self._observers:
                try:
                    self.plugins.dispatch_finished(run.id, run.status)
                except Exception:
                    traceback.print_exc()
            run.done.set()

    def _write_updates(self) -> None:
        """One transaction per store for the turn's node and dispatch changes."""
        if self._nupd or self._dupd:
            nupd, dupd = self._nupd, self._dupd
            self._nupd, self._dupd = {}, {}
            # each dispatch goes to the store it was created in (VALENT_RESULTS_DIR may differ)
            batches: dict[int, tuple[Store, list, list]] = {}
            for (d, n), f in nupd.items():
                st = self._store_of(d)
                batches.setdefault(id(st), (st, [], []))[1].append((d, n, f))
            for d, f in dupd.items():
                st = self._store_of(d)
                batches.setdefault(id(st), (st, [], []))[2].append((d, f))
            for st, nodes, disps in batches.values():
                try:
                    st.apply(nodes, disps)
                except StoreError as exc:
                    print(f"valent: {exc}", file=sys.stderr)
                    for run in list(self.runs.values()):
                        if run.store is not st:
                            continue
                        run.store_error = exc
                        if not run.cancel_requested and not run.status.is_final:
                            self._cancel(run.id, None)


def make_executor(plugins: Plugins, name: str) -> Executor:
    """A new executor of the class registered as ``name``, with the config's settings."""
    from .config import executor_from_config

    return executor_from_config(name, plugins.executor_class(name))


def _waker(q: queue.SimpleQueue, nr: NodeRun):
    item = (_WAKE, nr)
    return lambda: q.put(item)


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()
