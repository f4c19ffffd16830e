"""``DaskExecutor``: run electrons on a Dask cluster, and stop them for real when asked."""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Literal

import cloudpickle
import valent
from valent import CancelOutcome, Capabilities, ExecutorError, PicklingError
from valent.plugin import (
    MAX_SECONDS,
    Cancelled,
    Completed,
    Count,
    Failed,
    Pending,
    PositiveSeconds,
    Running,
    Seconds,
    Task,
    TaskState,
    Upstream,
    dumps,
    require,
)

from . import worker_side as ws
from .handles import Handle, cancel_outcome, final_outcome, to_state

log = logging.getLogger("valent.dask")

CANCEL_MODES = ("kill", "finish")
INLINE_GAP = 0.005
"""A task submitted this long after the previous one goes out at once, not batched."""
RUNNING_CHECK = 0.5
"""Seconds between asks to the workers which of our pending tasks have started."""
FN_CACHE = 256
ALONE_KEPT = 60.0
"""Seconds a task sent alone stays in the record after its cancel: Dask's cancel message
reaches the scheduler within milliseconds; after it the task can go to no worker."""
BATCH_DEPTH = 4
"""Tasks go out in batches only when more than this many per worker thread of the cluster
are waiting or running (a deep queue); then each Dask task runs several of them."""
BATCH_SHARE = 4
"""A batch takes at most 1/(this x worker threads) of the tasks still to send in the burst:
at least this many batches per thread, so Dask can still spread and steal them, and the
batches shrink towards the end of the burst (down to one task), so the tail stays balanced."""
BATCH_MAX = 32
"""Tasks per batch at most."""
Blobs = tuple[str, bytes, bytes]
"""A task as sent: its function's cache token, the function pickled, its arguments pickled."""


class DaskExecutor(valent.Executor):
    """Run each task on a Dask cluster: one started on first use, or yours.

    :param scheduler_address: an existing scheduler (``tcp://host:8786``); None starts a
        cluster on 127.0.0.1 on first use (scheduler and workers as their own programs, so
        a script needs no ``__main__`` guard) and ends it at shutdown, at exit, or when this
        process dies. A cluster given by address is never shut down by valent.
    :param n_workers: worker processes of the cluster we start.
    :param threads_per_worker: threads per worker of the cluster we start.
    :param processes: workers as processes (True) or as threads in this process (False,
        a ``distributed.LocalCluster(processes=False)``).
    :param cancel_mode: ``"kill"`` (default): each task body runs in a warm child process on
        its worker, and cancel kills it (outcome ``killed``); ``"finish"``: native Dask, a
        running task finishes and keeps its output (outcome ``runs_to_completion``).
    :param grace: kill mode: seconds a task that checks ``valent.cancel_requested()`` gets
        between SIGTERM and SIGKILL.
    :param connect_timeout: seconds to wait for the scheduler when connecting.
    :param cancel_timeout: seconds a cancel waits for the workers to answer.
    :param batching: when many independent tasks wait at once (more than ``BATCH_DEPTH``
        per worker thread), send several as one Dask task that runs them in order (finish
        mode) or hands them all to the worker's pool (kill mode): less Dask work per task.
        Each task still has its own state, times, value and cancel outcome; a task of a
        batch that has not started when a cancel comes is ``dequeued`` and never runs.

    It chains (``Capabilities.chain``): a task whose arguments are earlier tasks' results
    gets their Dask futures, so values go worker to worker while they are fetched for the
    store in parallel, and a chain runs at Dask's own pace.
    """

    name = "dask"
    capabilities = Capabilities(
        cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0, chain=True
    )

    def __init__(
        self,
        scheduler_address: str | None = None,
        n_workers: Count = 2,
        threads_per_worker: Count = 1,
        processes: bool = True,
        cancel_mode: Literal["kill", "finish"] = "kill",
        grace: Seconds = 1.0,
        connect_timeout: PositiveSeconds = 30.0,
        cancel_timeout: PositiveSeconds = 10.0,
        batching: bool = True,
    ):
        if cancel_mode not in CANCEL_MODES:
            raise ExecutorError(
                f"DaskExecutor: cancel_mode must be one of {', '.join(map(repr, CANCEL_MODES))}, "
                f"got {cancel_mode!r}"
            )
        for key, count in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
            require("DaskExecutor", key, count, integer=True, ge=1, error=ExecutorError)
        require("DaskExecutor", "grace", grace, ge=0, le=MAX_SECONDS, error=ExecutorError)
        for key, secs in (("connect_timeout", connect_timeout), ("cancel_timeout", cancel_timeout)):
            require("DaskExecutor", key, secs, gt=0, le=MAX_SECONDS, error=ExecutorError)
        self.scheduler_address = scheduler_address
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        self.cancel_mode = cancel_mode
        self.grace = float(grace)
        self.connect_timeout = connect_timeout
        self.cancel_timeout = cancel_timeout
        if not isinstance(batching, bool):
            raise ExecutorError(f"DaskExecutor: batching must be True or False, got {batching!r}")
        self.batching = batching
        if cancel_mode == "kill":
            self.capabilities = Capabilities(True, True, True, self.grace, chain=True)
        else:
            self.capabilities = Capabilities(True, False, False, None, chain=True)
        self._init_state()
        _instances.add(self)

    def _init_state(self) -> None:
        self._lock = threading.RLock()
        self._submit_lock = threading.Lock()
        self._last_run = 0.0
        self._conn: Any = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._waiting: list[tuple[Handle, Blobs]] = []
        self._live: dict[str, Handle] = {}
        self._fns: collections.OrderedDict[int, tuple[Any, str, bytes]] = (
            collections.OrderedDict()
        )
        self._closed = False
        self._revoked: dict[str, set[str]] = {}
        """Batch task key -> keys of its tasks a cancel stopped before the batch started
        anywhere (or may have: see :meth:`_record`), until this executor sees the batch end."""
        self._revoked_alone: dict[str, float] = {}
        """Key of a task sent alone that a cancel answered dequeued -> when (monotonic):
        recorded as a batch of one, for ``ALONE_KEPT`` seconds."""
        self._record_lock = threading.Lock()
        self._record_names: list[str] = []
        """Names of the record plugins registered on the cluster, oldest first."""
        self._record_id = uuid.uuid4().hex[:12]
        self._record_gen = 0

    # ------------------------------------------------------------ pickling, repr

    def _settings_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.settings()}

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self._settings_dict()))

    def __repr__(self) -> str:
        where = self.scheduler_address or f"own cluster, n_workers={self.n_workers}"
        return f"DaskExecutor({where}, cancel_mode={self.cancel_mode!r})"

    # ------------------------------------------------------------ the contract

    def run(self, task: Task, wake: valent.Wake) -> Handle:
        """Submit ``task`` to the cluster (starting or connecting on first use); no blocking."""
        h = Handle(task, wake)
        try:
            blobs = self._blobs(task, h)
        except (PicklingError, ExecutorError) as exc:
            h.state = Failed(exc, "", ended_at=time.time())
            return h
        with self._lock:
            if self._closed:
                h.state = Failed(ExecutorError("this DaskExecutor is shutting down"), "")
                return h
            self._live[task.key] = h
            conn = self._conn
            now = time.monotonic()
            alone = not self._waiting and now - self._last_run > INLINE_GAP
            self._last_run = now
            if conn is None or not alone or not self._submit_lock.acquire(blocking=False):
                self._waiting.append((h, blobs))
                if conn is None:
                    self._start_async()
                else:
                    conn.kick()
                return h
        # a lone task (a chain, a trickle) goes out at once; bursts go out in batches
        try:
            self._send(conn, [(h, blobs)])
        finally:
            self._submit_lock.release()
        return h

    def poll(self, handle: Handle) -> TaskState:
        """The task's state; never waits on the network (values are fetched on the event loop)."""
        return handle.state

    def cancel(self, handle: Handle) -> CancelOutcome:
        """Dequeue it, kill it (kill mode) or let it finish (finish mode); see the class doc."""
        return self._cancel_many([handle])[0]

    def cancel_many(self, handles: list[Handle]) -> list[CancelOutcome]:
        """Cancel a batch with one broadcast to the workers (what a dispatch cancel sends)."""
        return self._cancel_many(list(handles))

    def shutdown(self) -> None:
        """Stop what still runs (kill mode), close the client and the cluster we started.

        A cluster given by ``scheduler_address`` stays up; only our idle warm pools on its
        workers are retired. Tasks submitted while this runs fail; a later ``run`` starts
        (or connects) afresh.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            starting = self._starting
        if starting is not None:
            starting.join(self.connect_timeout + 30)
        with self._lock:
            live = [h for h in self._live.values() if not h.state.final]
        outcomes = self._cancel_many(live) if live else []
        killed = [h for h, o in zip(live, outcomes, strict=True) if o is CancelOutcome.KILLED]
        deadline = time.monotonic() + self.grace + 5.0
        while killed and time.monotonic() < deadline:  # let the kills be confirmed
            killed = [h for h in killed if not h.state.final]
            time.sleep(0.01)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            # the batches still on the cluster are released with our client right after
            # (none starts then); a worker that joined in between would only have tombstones
            with self._record_lock:
                self._drop_records(conn, keep=0)
            conn.close()
        dropped = []
        with self._lock:
            for h in sorted(self._live.values(), key=lambda h: bool(h.ups)):  # heads first
                if not h.state.final:
                    msg = f"the DaskExecutor was shut down before {h.task.label} finished"
                    self._end_unsent(h, ExecutorError(msg))
                    dropped.append(h)
        with self._lock:
            self._closed = False  # released; a later run starts (or connects) afresh
        for h in dropped:
            h.wake()

    def _cancel_many(self, handles: list[Handle]) -> list[CancelOutcome]:
        """Cancel several tasks with one broadcast to the workers."""
        out: dict[int, CancelOutcome] = {}
        ask: list[tuple[int, Handle, Any]] = []
        woken: list[Handle] = []
        with self._submit_lock, self._lock:  # a handle is either waiting or submitted
            conn = self._conn
            for i, h in enumerate(handles):
                if h.state.final:
                    out[i] = final_outcome(h.state)
                elif h.outcome is not None:
                    out[i] = h.outcome
                elif h.future is None:  # not sent to Dask yet (starting, or queued to send)
                    self._waiting = [(w, b) for w, b in self._waiting if w is not h]
                    h.outcome = out[i] = CancelOutcome.DEQUEUED
                    self._finish(h, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
                    woken.append(h)
                elif h.future.done():
                    out[i] = CancelOutcome.TOO_LATE
                else:
                    ask.append((i, h, h.future))
        for h in woken:
            h.wake()
        if ask:
            keys = [h.task.key for _, h, _ in ask]
            # A batched task whose batch has not started anywhere can wait long on the
            # cluster after it is answered dequeued; the record, installed BEFORE the
            # broadcast, stops it wherever and whenever the batch starts (see
            # worker_side.run_killable_batch). Without it, only tombstones would. A task
            # sent alone and not seen running is recorded too: Dask's cancel is a message
            # the scheduler handles a little later, and a worker that joins meanwhile has
            # no tombstone (the record reaches it before any task does).
            revoke: dict[str, set[str]] = {}
            alone: list[str] = []
            for _, h, f in ask:
                if h.batch is not None:
                    revoke.setdefault(f.key, set()).add(h.task.key)
                elif not isinstance(h.state, Running):
                    alone.append(h.task.key)
            recorded = self._record(conn, revoke, alone) if revoke or alone else True
            recorded_alone = set(alone)
            try:
                answers = conn.broadcast(ws.cancel_keys, keys, timeout=self.cancel_timeout)
            except Exception:  # noqa: BLE001 - the dispatcher asks again
                answers = None
            dequeued = []
            for i, h, f in ask:
                outcome = cancel_outcome(answers, h.task.key)
                recorded_here = h.batch is not None or h.task.key in recorded_alone
                if recorded_here and outcome is CancelOutcome.DEQUEUED:
                    if not recorded and not _held(answers, h.task.key):
                        outcome = CancelOutcome.FAILED  # tombstones alone: not a promise
                elif h.batch is not None:
                    with self._lock:  # it ran or runs: the next record leaves it out
                        self._revoked.get(f.key, set()).discard(h.task.key)
                elif recorded_here:
                    with self._lock:
                        self._revoked_alone.pop(h.task.key, None)
                out[i] = self._commit(h, outcome)
                if out[i] is CancelOutcome.DEQUEUED and outcome is CancelOutcome.DEQUEUED:
                    dequeued.append((h, f))
            # a batch's Dask task is cancelled only once none of its tasks is still to come
            # back (its other tasks still run; a dequeued one is tombstoned on every worker)
            drop = {id(f): f for h, f in dequeued if h.batch is None}
            with self._lock:
                for h, f in dequeued:
                    if h.batch is not None and all(m.state.final for m in h.batch):
                        drop[id(f)] = f
            if drop:
                conn.client.cancel(list(drop.values()), force=True)
            for h, _ in dequeued:
                h.wake()
        return [out[i] for i in range(len(handles))]

    def _record(
        self, conn: Any, add: dict[str, set[str]], alone: list[str] | tuple = ()
    ) -> bool:
        """Add ``add`` (batch key -> task keys) and ``alone`` (keys of tasks sent alone) to
        the record of stopped tasks and install the whole record on the cluster (a new
        worker plugin, then the older one removed); True once the scheduler and every worker
        have it. Batches this executor has seen end are left out, and tasks sent alone
        after ``ALONE_KEPT`` seconds (their cancel reached the scheduler long before)."""
        from .reaper import Revoked

        with self._record_lock:  # one registration at a time: the newest is the last one
            now = time.monotonic()
            with self._lock:
                for bkey, keys in add.items():
                    self._revoked.setdefault(bkey, set()).update(keys)
                for key in alone:
                    self._revoked_alone[key] = now
                for key, t in list(self._revoked_alone.items()):
                    if now - t > ALONE_KEPT:
                        del self._revoked_alone[key]
                record = {b: frozenset(k) for b, k in self._revoked.items() if k}
                record.update((k, frozenset((k,))) for k in self._revoked_alone)
            self._record_gen += 1
            name = f"valent-revoked-{self._record_id}-{self._record_gen}"
            self._record_names.append(name)
            try:
                conn.client.register_plugin(Revoked(name, record), name=name)
            except Exception as exc:  # noqa: BLE001 - the cancel says FAILED for those
                log.warning("valent-dask: could not record stopped batched tasks: %r", exc)
                return False
            self._drop_records(conn, keep=1)
            return True

    def _drop_records(self, conn: Any, keep: int) -> None:
        """Remove the record plugins but the ``keep`` newest from the cluster (record lock
        held)."""
        drop = self._record_names[:len(self._record_names) - keep]
        for name in drop:
            try:
                conn.client.unregister_worker_plugin(name)
            except Exception as exc:  # noqa: BLE001 - a stale record stops nothing running
                log.debug("valent-dask: removing record %s failed: %r", name, exc)
            self._record_names.remove(name)

    def _commit(self, h: Handle, outcome: CancelOutcome) -> CancelOutcome:
        """Record what the cancel will do to ``h``; a task that ended meanwhile is too late."""
        if outcome in (CancelOutcome.FAILED, CancelOutcome.TOO_LATE):
            return outcome
        with self._lock:
            if h.state.final:  # it ended while the workers answered (a kill can be that fast)
                if outcome is CancelOutcome.RUNS_TO_COMPLETION and not isinstance(
                    h.state, Cancelled
                ):
                    return outcome  # the cancel found it running: it ran to its end
                return final_outcome(h.state)
            h.outcome = outcome
            if outcome is CancelOutcome.DEQUEUED:
                self._finish(h, Cancelled(outcome, ended_at=time.time()))
            elif outcome is CancelOutcome.RUNS_TO_COMPLETION and isinstance(h.state, Pending):
                h.state = Running()  # its body runs (a worker said so); its end says since when
            # a task being killed stays as it is until the kill is confirmed: its final state
            # says whether its body had started (the pool knows), never a made-up start time
        return outcome

    # ------------------------------------------------------------ internals

    def _blobs(self, task: Task, h: Handle) -> Blobs:
        fn = task.fn
        with self._lock:
            entry = self._fns.get(id(fn))
            if entry is not None and entry[0] is fn:
                self._fns.move_to_end(id(fn))
            else:
                entry = None
        if entry is None:
            try:
                blob = dumps(fn)  # keeps the file name for tracebacks
            except Exception as exc:
                msg = f"the function of {task.label} cannot be pickled: {exc}"
                raise PicklingError(msg) from exc
            entry = (fn, uuid.uuid4().hex, blob)
            with self._lock:
                self._fns[id(fn)] = entry
                while len(self._fns) > FN_CACHE:
                    self._fns.popitem(last=False)
        args, kwargs = task.args, task.kwargs
        if task.upstream:
            args, kwargs = self._mark_upstream(task, h)
        try:
            args_blob = cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as exc:
            raise PicklingError(f"the arguments of {task.label} cannot be pickled: {exc}") from exc
        return entry[1], entry[2], args_blob

    def _mark_upstream(self, task: Task, h: Handle) -> tuple[tuple, dict]:
        """Replace ``Upstream`` markers by ``Up(i)``; ``h.ups[i]`` is the upstream handle."""

        def mark(v: Any) -> Any:
            if not isinstance(v, Upstream):
                return v
            if not isinstance(v.handle, Handle):
                raise ExecutorError(
                    f"{task.label}: an Upstream marker must hold a handle this DaskExecutor "
                    f"returned, got {v.handle!r}"
                )
            h.ups.append(v.handle)
            return ws.Up(len(h.ups) - 1)

        args = tuple(mark(a) for a in task.args)
        return args, {k: mark(v) for k, v in task.kwargs.items()}

    def _pump(self, conn: Any) -> None:
        """Submitter thread: send every waiting task to Dask in one graph update."""
        with self._submit_lock:
            with self._lock:
                batch, self._waiting = self._waiting, []
            if batch:
                self._send(conn, batch)

    def _send(self, conn: Any, batch: list[tuple[Handle, Blobs]]) -> None:
        """Submit ``batch`` and follow its futures (submit lock held): the independent tasks
        as one graph update, then each chained one, in order (its upstream went first)."""
        plain = [item for item in batch if not item[0].ups]
        if plain:
            self._send_plain(conn, plain)
        chained = [item for item in batch if item[0].ups]
        if chained:
            self._send_chained(conn, chained)

    def _send_chained(self, conn: Any, batch: list[tuple[Handle, Blobs]]) -> None:
        """Submit each chained task with its upstream futures (or values, if already back)."""
        fn, tail = self._body()
        watch: list[tuple[Any, Handle]] = []
        dropped: list[Handle] = []
        for h, (token, fn_blob, args_blob) in batch:
            ups: list[Any] = []
            picks: list[int | None] = []
            with self._lock:
                if h.state.final:
                    continue
                for u in h.ups:
                    st = u.state
                    if isinstance(st, Completed):
                        pickled = st.pickled
                        if pickled is None:
                            pickled = cloudpickle.dumps(st.value, protocol=5)
                        ups.append((ws.OK, pickled))
                        picks.append(None)
                    elif u.will_not_complete() or u.future is None:
                        ups = []  # an upstream task did not or will not complete
                        break
                    else:
                        ups.append(u.future)  # a batch's future: its result list
                        picks.append(u.index)  # ... and where this upstream's tuple is in it
                if not ups:
                    self._finish(h, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
                    dropped.append(h)
                    continue
            head = (h.task.key, token, fn_blob, args_blob, *tail)
            try:
                extra = {"picks": tuple(picks)} if any(p is not None for p in picks) else {}
                future = conn.client.submit(
                    fn, *head, *ups, key=h.task.key, pure=False, **extra
                )
            except Exception as exc:  # noqa: BLE001 - the client is closed or broken
                with self._lock:
                    self._end_unsent(h, ExecutorError(f"Dask refused {h.task.label}: {exc}"))
                dropped.append(h)
                continue
            with self._lock:
                h.future = future
                h.up_futures = [u for u in ups if not isinstance(u, tuple)]
            watch.append((future, h))
        if watch:
            conn.watch(watch)
        for h in dropped:
            h.wake()

    def _sizes(self, conn: Any, n: int) -> list[int] | None:
        """How to split a burst of ``n`` independent tasks into batches; None: one Dask task
        each (the queue is shallow, so every task keeps its own worker thread)."""
        if self.batching is False or n < 2:
            return None
        threads = conn.threads
        with self._lock:
            depth = len(self._live)  # waiting or on the cluster, these ``n`` included
        if depth <= BATCH_DEPTH * threads:
            return None
        sizes = []
        left = n
        while left:
            k = max(1, min(BATCH_MAX, -(-left // (BATCH_SHARE * threads))))
            sizes.append(k)
            left -= k
        return None if len(sizes) == n else sizes

    def _send_plain(self, conn: Any, batch: list[tuple[Handle, Blobs]]) -> None:
        """Submit independent tasks as one graph update and follow their futures; a deep
        queue goes out in batches (see :meth:`_sizes`), each batch one Dask task."""
        sizes = self._sizes(conn, len(batch))
        if sizes is not None:
            self._send_batches(conn, batch, sizes)
            return
        keys = [h.task.key for h, _ in batch]
        cols = [list(c) for c in zip(*(b for _, b in batch), strict=True)]
        fn, tail = self._body()
        cols = [keys, *cols, *([t] * len(keys) for t in tail)]
        try:
            futures = conn.submit_many(fn, cols, keys)
        except Exception as exc:  # noqa: BLE001 - the client is closed or broken
            self._refused([h for h, _ in batch], exc)
            return
        with self._lock:
            for (h, _), f in zip(batch, futures, strict=True):
                h.future = f
        conn.watch([(f, h) for (h, _), f in zip(batch, futures, strict=True)])

    def _refused(self, handles: list[Handle], exc: BaseException) -> None:
        """End tasks Dask would not take (its client is closed or broken), and wake them."""
        with self._lock:
            for h in handles:
                self._end_unsent(h, ExecutorError(f"Dask refused {h.task.label}: {exc}"))
        for h in handles:
            h.wake()

    def _send_batches(
        self, conn: Any, batch: list[tuple[Handle, Blobs]], sizes: list[int]
    ) -> None:
        """Submit ``batch`` as one graph update of len(sizes) Dask tasks, each running the
        next ``sizes[i]`` tasks in order and returning their result tuples as a list."""
        groups: list[list[tuple[Handle, Blobs]]] = []
        at = 0
        for k in sizes:
            groups.append(batch[at:at + k])
            at += k
        bkeys = [f"valent-batch-{uuid.uuid4().hex}" for _ in groups]
        cols: list[list] = [bkeys, [], [], [], []]
        for g in groups:
            cols[1].append([h.task.key for h, _ in g])
            for c, j in ((2, 0), (3, 1), (4, 2)):
                cols[c].append([b[j] for _, b in g])
        if self.cancel_mode == "kill":
            fn, tail = ws.run_killable_batch, (self.grace,)
        else:
            fn, tail = ws.run_native_batch, ()
        cols += [[t] * len(groups) for t in tail]
        try:
            futures = conn.submit_many(fn, cols, bkeys)
        except Exception as exc:  # noqa: BLE001 - the client is closed or broken
            self._refused([h for h, _ in batch], exc)
            return
        watch: list[tuple[Any, Any]] = []
        with self._lock:
            for g, f in zip(groups, futures, strict=True):
                members = [h for h, _ in g]
                for i, h in enumerate(members):
                    h.future, h.batch, h.index = f, members, i
                watch.append((f, members))
        conn.watch(watch)

    def _body(self) -> tuple[Any, tuple]:
        """The worker-side task function of this mode, and its arguments after the blobs."""
        if self.cancel_mode == "kill":
            return ws.run_killable, (self.grace,)
        return ws.run_native, ()

    def _start_async(self) -> None:
        """Start (or connect to) the cluster in a thread; submit the waiting tasks then."""
        if self._starting is not None:
            return
        t = threading.Thread(target=self._start, name="valent-dask-start", daemon=True)
        self._starting = t
        t.start()

    def _start(self) -> None:
        from .cluster import Connection

        conn = None
        error: BaseException | None = None
        try:
            conn = Connection(
                scheduler_address=self.scheduler_address,
                n_workers=self.n_workers,
                threads_per_worker=self.threads_per_worker,
                processes=self.processes,
                connect_timeout=self.connect_timeout,
                settle=self._settle,
                pump=self._pump,
            )
        except Exception as exc:  # noqa: BLE001 - reported on every waiting task
            where = self.scheduler_address or "a new local cluster"
            error = ExecutorError(f"DaskExecutor could not start/connect to {where}: {exc}")
            error.__cause__ = exc
        failed: list[Handle] = []
        with self._lock:
            self._starting = None
            if conn is not None and self._closed:
                error = ExecutorError("this DaskExecutor was shut down while starting")
            elif conn is not None:
                self._conn = conn
                conn.kick()
                threading.Thread(
                    target=self._watch_starts, args=(conn,), name="valent-dask-starts", daemon=True
                ).start()
                return
            waiting, self._waiting = self._waiting, []
            for h, _ in sorted(waiting, key=lambda item: bool(item[0].ups)):  # heads first
                if not h.state.final:
                    self._end_unsent(h, error)
                    failed.append(h)
        if conn is not None:
            conn.close()
        for h in failed:
            h.wake()

    def _watch_starts(self, conn: Any) -> None:
        """Turn ``Pending`` into ``Running(started_at)`` for tasks whose body has started.

        Dask does not tell a client when a task starts; every ``RUNNING_CHECK`` seconds,
        while some task of ours is pending, the workers are asked (one small broadcast).
        """
        turns = 0
        while not conn.closed:
            time.sleep(RUNNING_CHECK)
            turns += 1
            if turns % 10 == 0:  # workers come and go: batch sizes follow the cluster's size
                conn.refresh_threads()
            with self._lock:
                if not any(isinstance(h.state, Pending) for h in self._live.values()):
                    continue
            try:
                answers = conn.broadcast(ws.running_keys, timeout=self.cancel_timeout)
            except Exception:  # noqa: BLE001 - closing, or a worker is gone: ask again later
                continue
            started: dict[str, Any] = {}
            for a in answers.values():
                if isinstance(a, dict):
                    started.update(a)
            here = socket.gethostname()
            woken = []
            with self._lock:
                for key, info in started.items():
                    h = self._live.get(key)
                    if h is not None and isinstance(h.state, Pending):
                        h.state = _running_state(info, here)
                        woken.append(h)
            for h in woken:
                h.wake()

    def _end_unsent(self, h: Handle, error: BaseException) -> None:
        """End a task Dask never ran because of ``error`` (lock held): ``Failed``, unless it is
        chained after a task that did not complete; then its body never would have run, and it
        is ``Cancelled(dequeued)``, so the dispatcher shows it CANCELLED "upstream"."""
        if h.ups and any(u.will_not_complete() for u in h.ups):
            self._finish(h, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
        else:
            self._finish(h, Failed(error, "", ended_at=time.time()))

    def _finish(self, h: Handle, state: TaskState) -> None:
        """Record a final state and drop the future, releasing its data (lock held)."""
        h.state = state
        h.future = None
        h.ups = []
        h.up_futures = []
        self._live.pop(h.task.key, None)

    def _settle(self, items: list[tuple[Any, Any]]) -> None:
        """Collector thread: turn finished futures into states, then wake the dispatcher."""
        woken = []
        with self._lock:
            for (future, tag), value in items:
                if isinstance(tag, list):  # a batch: a list of result tuples, one per task
                    self._revoked.pop(future.key, None)  # over: the next record drops it
                    many = isinstance(value, list) and len(value) == len(tag)
                    for i, h in enumerate(tag):
                        if h.state.final or h.future is not future:
                            continue
                        self._finish(h, to_state(h, future, value[i] if many else value))
                        woken.append(h)
                    continue
                h = tag
                if h.state.final or h.future is not future:
                    continue
                self._finish(h, to_state(h, future, value))
                woken.append(h)
        for h in woken:
            h.wake()


def _held(answers: dict | None, key: str) -> bool:
    """Did a worker answer that it holds ``key`` stopped (its batch runs there)?"""
    return answers is not None and any(
        isinstance(a, dict) and a.get(key) == ws.DEQUEUED for a in answers.values()
    )


def _running_state(info: Any, here: str) -> Running:
    """A worker's answer about a started task; output paths only when they are on this host
    (kill mode on a LocalCluster: ``valent logs`` can show the output so far)."""
    if not isinstance(info, tuple):  # a worker with an older valent: the start time only
        return Running(info)
    started, host, out, err = (*info, None, None, None)[:4]
    if host != here:
        return Running(started)
    return Running(started, out, err)


def _rebuild(cls: type[DaskExecutor], settings: dict[str, Any]) -> DaskExecutor:
    return cls(**settings)


_instances: weakref.WeakSet[DaskExecutor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child starts with empty executors: the client, the cluster and the tasks are
    the parent's (the child must never close or cancel them), and a lock another thread held
    at the fork would never be released. A task the child runs starts its own cluster."""
    for ex in list(_instances):
        ex._init_state()


os.register_at_fork(after_in_child=_after_fork_in_child)
