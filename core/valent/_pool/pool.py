"""A warm pool of worker processes whose running tasks can be killed, subprocesses and all.

Each worker is a fresh interpreter (``subprocess``, so it also works inside a daemonic Dask
worker) started in its own session: a task and everything it spawns share one process group,
and the worker is a child subreaper, so even a ``setsid`` daemon stays in its tree. Workers are
reused across tasks; a worker whose task is cancelled is killed (SIGTERM; a single-threaded
worker whose task is not cooperative then exits by itself once it has no child left; after
the grace, the tree under the frozen worker is killed until nothing is left, the worker last)
and replaced once the kill is over (see ``SPAWN_HOLD``). The Local
executor uses it directly, the Dask executor's kill mode runs one inside each Dask worker, and
a third-party executor may reuse it.

    pool = ProcessPool(workers=4)
    job = pool.submit(fn, args, kwargs, on_change=callback)
    job.wait(); job.state            # Completed(pickled=...) | Failed(...) | Cancelled(...)
    pool.cancel(job)                 # CancelOutcome; the job then ends Cancelled(...)

Roles, as in CPython's ``concurrent.futures.process``:

- :class:`ProcessPool` is the public, locked face. Its methods only take the lock, put a job
  on the queue (or a kill request on the kill list), and wake the loop.
- :class:`_Loop` runs on the pool's one thread and alone holds and changes everything else:
  the selector, the workers, messages from them, kills, respawn, growth and shrinking. It
  publishes a read-only view (``stats``, pids) for the public face.
- the worker program is :mod:`valent._pool.worker`; :mod:`valent._pool.watch` is the watcher that
  kills every worker tree when the owning process dies.

What the pool reports (the truth invariants): a job is ``Running`` once its body started (the
worker says so right before calling it). A cancelled job whose body never started is
``Cancelled(DEQUEUED)``, wherever it waited; ``Cancelled(KILLED)`` means its body started and
its worker's whole tree is confirmed gone. What happened first decides: a job that failed
before the cancel was requested stays ``Failed``; one that failed after it (its own SIGTERM
handler, an error while stopping) is ``Cancelled(KILLED)``; one that completed is ``Completed``.
A job sent ahead that began in a worker just as it was stopped for the cancel of the job before
it (which completed as the stop was sent) is neither cancelled nor failed: it runs again in
another worker; cancelled later, it is ``Cancelled(KILLED)``, since its body did start.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from .. import pickling
from ..errors import PicklingError, WorkerDiedError
from ..status import CancelOutcome
from ..task import Cancelled, Completed, Failed, Pending, Running, TaskState
from . import proctree
from .worker import HEADER, pack_msg, send_msg

FN_CACHE_SIZE = 256
KILL_TICK = 0.005  # seconds between rounds of killing a tree
LOOK_FIRST, LOOK_FAST, LOOK_SLOW = 0.0002, 0.001, 0.02  # between looks at a stopping worker:
LOOK_FIRST_FOR, LOOK_FAST_FOR = 0.02, 0.1  # (s) the first, the next, then
# A worker neither stopped nor gone these many seconds after its SIGTERM is sent SIGURG (its
# handler does nothing): a SIGTERM that came between the interpreter's last look at signals
# and a blocking call (``time.sleep``) does not interrupt that call, so the worker's handler
# would run only when the call returns; the SIGURG interrupts it, and the handler runs then.
# (The benchmark's cancel, sent as soon as a task wrote its pids, hits that gap in ~1% of
# workers.) The second is for a SIGURG that came before the call began too.
NUDGES = (0.002, 0.05)
RUNNING_NOTE_DELAY = 0.001  # observers hear of a start this late: a quick job is told once
BOOT_FAILURES = 3  # workers in a row that die before they are up: stop trying, fail the queue
AHEAD = 2  # chained jobs sent to a worker ahead of its current one
# No worker is started (to replace a killed one, or to keep the minimum) while a kill begun
# less than SPAWN_HOLD seconds ago is still under way, nor, unless queued work has no idle
# worker to go to, within SPAWN_HOLD of a kill's start: starting one holds this thread, and
# the GIL, until the child has exec'd (vfork; on a busy machine, milliseconds, once 20 ms),
# and the new interpreter's boot (~0.1 s of CPU) takes the CPU that the processes being
# killed need to die and that the owner's threads need to see them gone.
SPAWN_HOLD = 0.05
# When the queue is deep (DEEP queued jobs per worker; a few queued ones are dequeued at once
# on cancel), busy workers are sent batches of the next jobs ahead, in one message each: only
# jobs of functions known to take less than QUICK (s), behind one that does too, at most
# MAX_AHEAD and about AHEAD_TIME (s) of them, and each worker its share of the queue.
DEEP = 4
QUICK = 0.005
MAX_AHEAD = 64
AHEAD_TIME = 0.004


_pid = [os.getpid()]  # this process's pid, kept at fork (getpid is a system call per task)
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


_PLAIN = frozenset((int, float, str, bytes, bool, type(None)))
"""Argument types the C pickler writes exactly as cloudpickle would."""


_PENDING = Pending()  # frozen: one for every job


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled back."""


_done_lock = threading.Lock()  # between callers that wait (one Event per job at most)


class _Done:
    """A job's "it is final" flag, kept in the job itself (two slots, no object of its own:
    a fan-out of thousands of queued jobs makes thousands fewer objects for the garbage
    collector to trace). The ``Event`` is made only for a caller that waits (it costs ~1.3 KB;
    a million queued jobs would hold 1.3 GB of them)."""

    __slots__ = ("_job",)

    def __init__(self, job: Job) -> None:
        self._job = job

    def set(self) -> None:
        self._job._set_final()

    def is_set(self) -> bool:
        return self._job._final

    def wait(self, timeout: float | None = None) -> bool:
        return self._job._wait_final(timeout)


class Job:
    """One task in the pool. ``state`` is a valent ``TaskState``; ``done`` is set when final.

    ``state`` and the cancel fields change under the pool's lock; ``worker`` is set when the
    loop claims the job for a worker (under the lock), after which a cancel kills.
    """

    __slots__ = (
        "id", "fn_entry", "args_blob", "on_change", "state", "worker", "_final", "_event",
        "kill_requested", "cancel_at", "started_at", "held", "label", "ups", "deps", "skip",
        "queued", "promised", "bare",
    )

    def __init__(self, jid: int, fn_entry, args_blob: bytes, on_change, label: str,
                 bare: bool = False):
        self.id = jid
        self.fn_entry = fn_entry
        self.args_blob = args_blob
        self.on_change = on_change
        self.bare = bare  # on_change takes no argument
        self.state: TaskState = _PENDING
        self.worker: _Worker | None = None
        self._final = False
        self._event: threading.Event | None = None
        self.kill_requested = False
        self.cancel_at: float | None = None  # time.time() of the cancel request
        self.started_at: float | None = None  # when the body started, as the worker said
        self.held: tuple[str, str] | None = None  # output of a task stopped by the cancel
        self.label = label
        # a chained job: where its Up(i) markers' values come from, an upstream Job of this
        # pool or ("v", pickled value); and the jobs chained on this one (loop only)
        self.ups: list[Any] | tuple = ()  # a list for a chained job
        self.deps: list[Job] | tuple = ()  # a list once a job is chained on this one
        self.skip: str | None = None  # asked back from its worker: "cancel" or "reclaim"
        self.queued = False  # in the pool's queue (a cancelled one stays there, skipped)
        self.promised = CancelOutcome.KILLED  # what cancel() answered, once it was asked

    @property
    def done(self) -> _Done:
        """Set once the job is final: ``is_set()``, ``wait(timeout)``."""
        return _Done(self)

    def wait(self, timeout: float | None = None) -> TaskState:
        """Block until the job is final (or ``timeout``); return its state."""
        self._wait_final(timeout)
        return self.state

    def _set_final(self) -> None:
        # no lock: the flag is written before the event is read, and a waiter makes its
        # event before it reads the flag, so one of the two sees the other (the GIL orders
        # them); waiters share ``_done_lock`` so that they make one event between them
        self._final = True
        event = self._event
        if event is not None:
            event.set()

    def _wait_final(self, timeout: float | None) -> bool:
        if self._final:
            return True
        with _done_lock:
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        if self._final:
            return True
        return event.wait(timeout)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.label} {type(self.state).__name__}>"


class _Worker:
    """One worker process, as the loop sees it (only the loop touches it)."""

    __slots__ = (
        "proc", "sock", "known", "job", "idle_since", "out_path", "err_path", "doomed",
        "kill_deadline", "reaping", "tree", "dead_at", "key", "ready", "cpu_mark", "rbuf",
        "settled", "died_at", "term_at", "next_scan", "more", "wbuf", "writing", "zombies",
        "nudged",
    )

    def __init__(self, proc, sock, out_path, err_path):
        self.proc: subprocess.Popen = proc
        self.sock: socket.socket = sock
        self.known: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.job: Job | None = None
        self.idle_since = time.monotonic()
        self.out_path = out_path
        self.err_path = err_path
        self.doomed = False  # being stopped: SIGTERM sent (or died on its own)
        self.kill_deadline: float | None = None  # when the grace ends
        self.reaping = False  # past the grace: its tree is being killed, then it
        self.tree: dict[int, int] = {}  # {pid: start} of its tree at the last look
        self.dead_at: float | None = None  # when its socket closed
        self.key = sock.fileno()
        self.ready = False
        self.cpu_mark: tuple[float, float] | None = None
        self.rbuf = bytearray()  # bytes received from the worker, not yet a whole message
        self.settled = False  # its task's result arrived after the kill began
        self.died_at: float | None = None  # time.time() it was seen dead on its own
        self.term_at = 0.0  # monotonic time of the SIGTERM
        self.next_scan = 0.0  # no /proc scan for it before this (monotonic)
        self.zombies: frozenset[int] | None = None  # zombies under it at the last walk
        self.more: collections.deque[Job] = collections.deque()  # sent after ``job``, in order
        self.wbuf = bytearray()  # bytes for the worker not sent yet (sends never block)
        self.writing = False  # registered with the selector for writing too
        self.nudged = 0  # SIGURGs sent while stopping (see NUDGES)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _look(since: float) -> float:
    """Seconds to the next look at a worker stopping for ``since`` seconds."""
    if since < LOOK_FIRST_FOR:
        return LOOK_FIRST
    return LOOK_FAST if since < LOOK_FAST_FOR else LOOK_SLOW


def cpu_mark(pid: int) -> tuple[float, float] | None:
    """(CPU seconds used, monotonic time) of a process, or None if it is gone."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return (t.user + t.system, time.monotonic())


def unpack_error(payload: tuple) -> BaseException:
    blob, text, _tb = payload
    if blob is not None:
        try:
            return cloudpickle.loads(blob)
        except Exception:
            pass
    return RemoteError(text)


def tail(path: str, limit: int = 1 << 16) -> str:
    """The last ``limit`` bytes of a text file, decoded; empty if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _unstarted_end(job: Job, now: float) -> Cancelled:
    """The end of a job cancelled before its body started (again): ``DEQUEUED``. A job whose
    body did start once, in a worker stopped for the cancel of the job before it, was put
    back to run again (see ``_Loop._retire``); for it the answer is ``KILLED``, with that
    start: the start was real, and its tree is gone."""
    if job.started_at is None:
        return Cancelled(CancelOutcome.DEQUEUED, ended_at=now)
    return Cancelled(CancelOutcome.KILLED, job.started_at, now)


def _notify(job: Job) -> None:
    cb = job.on_change
    if cb is not None:
        try:
            if job.bare:
                cb()
            else:
                cb(job)
        except Exception:  # an observer's bug must not kill the pool
            traceback.print_exc()


class ProcessPool:
    """Warm, reusable, killable worker processes.

    :param workers: a fixed number of workers; or None for an elastic pool of
        ``min_workers`` .. ``max_workers`` that grows when queued work waits behind busy
        workers for ``grow_after`` seconds (tasks that sleep or wait), and shrinks back when
        workers stay idle for ``idle_timeout`` seconds.
    :param grace: seconds a cancelled task that uses ``cancel_requested()`` gets between
        SIGTERM and SIGKILL (a task that never asked stops at SIGTERM).
    :param capture: capture each task's stdout and stderr (fds 1 and 2, subprocesses too).
    :param python: the interpreter the workers run (default: this one; 3.11+, started with
        ``-P`` so that nothing in the working directory is importable at their start).

    When the process that made the pool dies, however it dies, its workers and everything
    their tasks started die too (see :mod:`valent._pool.watch`).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        min_workers: int | None = None,
        max_workers: int | None = None,
        grace: float = 1.0,
        grow_after: float = 0.05,
        idle_timeout: float = 60.0,
        capture: bool = True,
        python: str | None = None,
        name: str = "valent",
    ):
        cpus = os.cpu_count() or 1
        if workers is not None:
            if workers < 1:
                raise ValueError(f"workers must be >= 1, got {workers}")
            min_workers = max_workers = workers
        self.min_workers = min_workers if min_workers is not None else cpus
        self.max_workers = max_workers if max_workers is not None else max(32, 4 * cpus)
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 1 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}"
            )
        self.grace = grace
        self.grow_after = grow_after
        self.idle_timeout = idle_timeout
        self.capture = capture
        self.python = python or sys.executable
        self.name = name
        # shared with the loop, under the lock: the queue, the kill list, the closed flag
        self._lock = threading.RLock()
        self._queue: collections.deque[Job] = collections.deque()
        self._kills: list[Job] = []
        self._chained: list[Job] = []  # new chained jobs, for the loop to place
        self._ended: list[Job] = []  # jobs made final here (dequeued): the loop releases deps
        self._dead_queued = 0  # cancelled jobs still in the queue (skipped when handed out)
        self._closed = False
        self._ids = itertools.count(1)
        self._fn_keys = itertools.count(1)
        self._fn_cache: collections.OrderedDict[int, tuple[Any, int, bytes]] = (
            collections.OrderedDict()
        )
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the pool's thread and its minimum number of workers (done on first submit
        otherwise); returns once the workers' processes exist."""
        with self._lock:
            self._check_usable()
            if self._loop is not None:
                return
            self._loop = _Loop(self)
            self._thread = threading.Thread(
                target=self._loop.run, name=f"{self.name}-pool-io", daemon=True
            )
            self._thread.start()
        self._loop.booted.wait(30)

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        on_change: Callable[[Job], None] | None = None,
        label: str = "",
        ups: list[Job] | None = None,
        notify: Callable[[], None] | None = None,
    ) -> Job:
        """Queue ``fn(*args, **kwargs)``; ``on_change(job)`` is called, on the pool's thread,
        when it starts and when it ends (once, with the final state, when the pool sees both
        within a millisecond); read ``job.state`` there.

        ``ups``: a chained job. Its arguments hold ``Up(i)`` markers
        (:class:`valent._pool.worker.Up`) where the value of job ``ups[i]`` (of this pool) goes.
        It runs once they completed: right after its upstream in the same worker when it has
        one upstream job, the value passed there; if one does not complete it never runs
        (``Cancelled(DEQUEUED)``).

        ``notify``: instead of ``on_change``, a callable that takes no argument (a wake-up).

        Raises ``valent.PicklingError`` when the function or its arguments cannot be pickled.
        """
        if notify is not None and on_change is not None:
            raise ValueError("pass on_change or notify, not both")
        entry = self._fn_entry(fn, label)
        try:
            if not kwargs and (
                    (len(args) == 1 and type(args[0]) in _PLAIN)
                    or all(type(a) in _PLAIN for a in args)):
                args_blob = pickle.dumps((args, {}), protocol=5)  # the C pickler: 10x faster
            else:
                args_blob = cloudpickle.dumps((args, kwargs or {}), protocol=5)
        except Exception as exc:
            raise PicklingError(
                f"the arguments of {label or fn!r} cannot be pickled: {exc}"
            ) from exc
        if notify is not None:
            job = Job(next(self._ids), entry, args_blob, notify, label, True)
        else:
            job = Job(next(self._ids), entry, args_blob, on_change, label)
        if self._loop is None:
            self.start()
        with self._lock:
            self._check_usable()
            if ups:
                job.ups = list(ups)
                self._chained.append(job)
            else:
                job.queued = True
                self._queue.append(job)
        self._wake()
        return job

    def cancel(self, job: Job) -> CancelOutcome:
        """Cancel ``job`` without blocking; its state turns ``Cancelled`` when confirmed.

        A queued job is dequeued at once. A job handed to a worker is stopped by the loop; the
        answer then is what will be done as far as the pool knows: KILLED for the job its
        worker runs (or is about to), DEQUEUED for one sent ahead behind it (in a batch). The final
        state says what happened: ``Cancelled(DEQUEUED)`` if its body had not started,
        ``Cancelled(KILLED)`` once its tree is gone, or ``Completed``/``Failed`` if it ended
        before the cancel was asked for (the answer differs only when the body started, or
        ended, while the worker's word of it was on its way).
        """
        return self.cancel_many([job])[0]

    def cancel_many(self, jobs: list[Job]) -> list[CancelOutcome]:
        """:meth:`cancel` each job, in one pass of the pool's thread: their workers are all
        stopped at once. One outcome per job, in order."""
        outcomes: list[CancelOutcome] = []
        dequeued: list[Job] = []
        now = time.time()
        with self._lock:
            for job in jobs:
                if isinstance(job.state, Cancelled):
                    outcomes.append(job.state.outcome)  # cancelled before: the same answer
                elif job.state.final:
                    outcomes.append(CancelOutcome.TOO_LATE)
                elif job.kill_requested:
                    outcomes.append(job.promised)  # asked before: the same answer again
                elif job.worker is None:
                    # queued, or chained and waiting: it never starts (a queued one is left in
                    # the queue and skipped there: removing it would cost the queue's length)
                    if job.queued:
                        self._dead_queued += 1
                    job.state = _unstarted_end(job, now)
                    job._set_final()
                    self._ended.append(job)
                    dequeued.append(job)
                    outcomes.append(job.state.outcome)
                else:
                    # handed to a worker: its current job is killed (its body runs, or is
                    # about to); one sent ahead behind it is asked back, never started
                    w = job.worker
                    ahead = job.started_at is None and w is not None and w.job is not job
                    job.promised = CancelOutcome.DEQUEUED if ahead else CancelOutcome.KILLED
                    job.kill_requested = True
                    job.cancel_at = now
                    self._kills.append(job)
                    outcomes.append(job.promised)
        for job in dequeued:
            _notify(job)
        self._wake()  # the loop kills, asks back, or releases what was chained on them
        return outcomes

    def stats(self) -> dict[str, int]:
        """Counts of workers (all, idle, being killed) and queued jobs."""
        view = self._loop.view if self._loop is not None else _Loop.EMPTY_VIEW
        with self._lock:
            queued = len(self._queue) - self._dead_queued
        return {"workers": len(view[0]), "idle": view[2], "dying": view[3], "queued": queued}

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (each one a process-group leader)."""
        return list(self._loop.view[0]) if self._loop is not None else []

    def own_pids(self) -> list[int]:
        """PIDs of every process the pool started and holds: its workers and its watcher."""
        if self._loop is None:
            return []
        view = self._loop.view
        return list(view[0]) + ([view[4]] if view[4] else [])

    def busy_pids(self) -> list[int]:
        """PIDs of the workers running a task now."""
        return list(self._loop.view[1]) if self._loop is not None else []

    def shutdown(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Cancel what is queued, kill what runs, stop every worker; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued = [j for j in self._queue if not j.state.final] + [
                j for j in self._chained if not j.state.final]
            self._queue, self._chained, self._dead_queued = collections.deque(), [], 0
            for job in queued:
                job.queued = False
                job.state = _unstarted_end(job, time.time())
                job._set_final()
            self._ended.extend(queued)
        for job in queued:
            _notify(job)
        if self._loop is None:
            return
        self._wake()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> ProcessPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- the caller's side

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this ProcessPool was shut down")
        if _pid[0] != self._pid:
            raise RuntimeError(
                "this ProcessPool belongs to the process this one was forked from; its "
                "workers and thread are not here. Make a new ProcessPool in this process."
            )

    def owned_here(self) -> bool:
        """True in the process that made the pool (not in a forked child of it)."""
        return self._pid == _pid[0]

    def usable(self) -> bool:
        """True while the pool takes work: made here, not shut down, and its thread did not
        stop on an internal error (then every job it had failed, and an owner of the pool
        should start a new one)."""
        return not self._closed and self._pid == _pid[0]

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.wake()

    def _fn_entry(self, fn, label) -> tuple[Any, int, bytes]:
        """``(fn, key, pickled fn)``: pickled once per function (the cache holds ``fn``, so
        its id is not reused by another function while its entry is there)."""
        key = id(fn)
        cache = self._fn_cache
        entry = cache.get(key)  # C calls of an OrderedDict are atomic under the GIL
        if entry is not None and entry[0] is fn:
            try:
                cache.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread: the entry is still good
                pass
            return entry
        with self._lock:
            entry = self._fn_cache.get(key)
            if entry is not None and entry[0] is fn:
                self._fn_cache.move_to_end(key)
                return entry
        try:
            blob = pickling.dumps(fn)  # keeps the file name for tracebacks
        except Exception as exc:
            raise PicklingError(f"the function {label or fn!r} cannot be pickled: {exc}") from exc
        entry = (fn, next(self._fn_keys), blob)
        with self._lock:
            self._fn_cache[key] = entry
            while len(self._fn_cache) > FN_CACHE_SIZE:
                self._fn_cache.popitem(last=False)
        return entry


class _Loop:
    """The pool's one thread: owns the selector, the workers, the watcher, every kill and
    every resize. Reads the pool's queue and kill list under the pool's lock; sets job states
    under that lock; calls ``on_change`` callbacks without it."""

    EMPTY_VIEW: tuple[tuple[int, ...], tuple[int, ...], int, int, int] = ((), (), 0, 0, 0)

    def __init__(self, pool: ProcessPool):
        self.pool = pool
        self.lock = pool._lock
        self.booted = threading.Event()
        # (pids, busy pids, idle, dying, watcher pid): replaced, never mutated
        self.view = self.EMPTY_VIEW
        self.view_key: tuple = ()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.workers: dict[int, _Worker] = {}  # by socket fileno
        self.idle: list[_Worker] = []
        self.dying: list[_Worker] = []
        self.watcher: subprocess.Popen | None = None
        self.watcher_restarts = 0
        self.housekeeping = 0.0  # monotonic time of the next watcher check and shrink
        self.index = itertools.count()
        self.rbuf = bytearray(1 << 18)  # one receive buffer for every worker
        self.rview = memoryview(self.rbuf)
        self.last_start = time.monotonic()
        self.respawn = 0
        self.last_kill = -SPAWN_HOLD  # monotonic time the last kill began
        self.boot_failures = 0
        self.closing = False
        self.woken = False
        self.fn_time: dict[int, float] = {}  # function key -> its recent run time (s)
        self.notes: list[Job] = []  # jobs whose observers are told at the end of this turn
        # (when, job) of started jobs whose observers are told then, unless they ended
        self.started: collections.deque[tuple[float, Job]] = collections.deque()
        self.out: dict[_Worker, None] = {}  # workers with bytes to send at the end of the turn
        # The workers' output folder, made once the watcher is up and named to it at once,
        # so that the watcher removes it if this process dies (an owner killed between the
        # two used to leave it behind: nobody knew it). A folder that cannot be made fails
        # the pool's start here, in the caller.
        self._start_watcher()
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=f"{pool.name}-pool-")
        except BaseException:
            self._stop_watcher()
            raise
        self._tell_watcher(f"dir {self.tmpdir}")

    # ------------------------------------------------------------ the loop

    def wake(self) -> None:
        """From any thread: make the loop look at the queue and the kill list now."""
        if self.woken:
            return
        self.woken = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        try:
            for _ in range(self.pool.min_workers):
                self._spawn()
            self._publish()
            self.booted.set()
            while True:
                events = self.sel.select(self._timeout())
                for key, mask in events:
                    if key.data is None:
                        try:
                            while self.wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                        # after the reads: a wake() from now on sends again (cleared before
                        # them, a wake() in between would be read here and then suppressed)
                        self.woken = False
                    else:
                        if mask & selectors.EVENT_WRITE:
                            self._flush(key.data)
                        if mask & selectors.EVENT_READ:
                            self._on_readable(key.data)
                self._turn()
                if self.closing and not self.workers:
                    break
        except BaseException:  # a bug here must not leave frozen workers or waiting jobs
            traceback.print_exc()
            self._abandon()
        finally:
            self.booted.set()
            self._cleanup()

    def _turn(self) -> None:
        """One pass: take cancels and shutdown, advance kills, resize, hand out work."""
        with self.lock:
            kills, self.pool._kills = self.pool._kills, []
            chained, self.pool._chained = self.pool._chained, []
            ended, self.pool._ended = self.pool._ended, []
            closing = self.pool._closed
        for job in ended:
            self._release(job)
        stop: dict[_Worker, None] = {}
        for job in kills:
            w = job.worker
            if w is None or job.state.final or w.doomed:
                continue
            if w.job is job:
                stop[w] = None
            elif job.skip is None:  # sent ahead, not started: ask for it back
                self._ask_back(w, job, "cancel")
            else:
                job.skip = "cancel"
        if stop:
            self._begin_kills(list(stop))
        for job in chained:
            self._place(job)
        if closing and not self.closing:
            self.closing = True
            for w in list(self.workers.values()):
                if not w.doomed:
                    for job in w.more:  # never started: they go when their worker goes
                        with self.lock:
                            job.kill_requested = True
                            job.cancel_at = job.cancel_at or time.time()
                    if w.job is not None:
                        with self.lock:
                            if not w.job.kill_requested:
                                w.job.kill_requested = True
                                w.job.cancel_at = time.time()
                    self._begin_kill(w, grace=0.0 if w.job is None else None)
        if self.dying:
            self._advance_kills()
        if not self.closing:
            now = time.monotonic()
            if now >= self.housekeeping:  # a few times a second, not on every message
                self.housekeeping = now + 0.25
                self._check_watcher()
                self._shrink()
            if not self._spawn_held(now):
                while self.respawn:
                    self.respawn -= 1
                    live = len(self.workers) - len(self.dying)
                    if live < self.pool.max_workers and not self._broken():
                        self._spawn()
                self._maybe_grow()
            self._hand_out()
        for w in self.out:
            self._flush(w)
        self.out.clear()
        self._publish()
        if self.started:
            now = time.monotonic()
            while self.started and self.started[0][0] <= now:
                job = self.started.popleft()[1]
                if not job.state.final:  # else its end is the one thing to tell
                    self.notes.append(job)
        notes, self.notes = self.notes, []
        for job in dict.fromkeys(notes):  # once each: started and ended in one turn, one call
            _notify(job)

    def _timeout(self) -> float:
        t = 1.0
        now = time.monotonic()
        if self.started:
            t = max(0.0, self.started[0][0] - now)
        for w in self.dying:
            if w.reaping:
                return KILL_TICK
            # it stops itself at SIGTERM (or returns, cooperatively): look soon, then less often
            t = min(t, max(0.0, w.next_scan - now),
                    max(0.0, (w.kill_deadline or now) - now) + 0.001)
        with self.lock:
            waiting = len(self.pool._queue) > self.pool._dead_queued
        if waiting and len(self.workers) < self.pool.max_workers:
            t = min(t, self.pool.grow_after)
        held = self._spawn_held(now)
        if held:
            t = min(t, held)
        return t

    def _spawn_held(self, now: float) -> float:
        """Seconds until workers may be started again (0: now), see ``SPAWN_HOLD``."""
        hold = 0.0
        for w in self.dying:
            if w.term_at:
                hold = max(hold, w.term_at + SPAWN_HOLD - now)
        if hold or now >= self.last_kill + SPAWN_HOLD:
            return hold
        if not any(w.ready for w in self.idle):
            with self.lock:
                if len(self.pool._queue) > self.pool._dead_queued:
                    return 0.0  # work waits and no worker is free to take it: start now
        return self.last_kill + SPAWN_HOLD - now

    def _publish(self) -> None:
        """Replace the read-only view the pool's public methods read (when it changed)."""
        ws = self.workers.values()
        busy = sum(1 for w in ws if w.job is not None)
        key = (len(self.workers), busy, len(self.idle), len(self.dying), self.watcher)
        if key == self.view_key and busy in (0, len(self.workers)):
            return  # same counts, and no choice of which workers are busy
        self.view_key = key
        self.view = (
            tuple(w.pid for w in ws),
            tuple(w.pid for w in ws if w.job is not None),
            len(self.idle),
            len(self.dying),
            self.watcher.pid if self.watcher is not None else 0,
        )

    def _finish(self, job: Job, state: TaskState) -> None:
        """Make ``job`` final (observers are told at the end of the turn)."""
        with self.lock:
            job.state = state
        job._set_final()
        job.args_blob = b""  # kept until now: a job stopped with another's worker runs again
        self.notes.append(job)
        self._release(job)

    # ------------------------------------------------------------ chained jobs

    def _release(self, job: Job) -> None:
        """``job`` is final: place the jobs chained on it that it still holds."""
        deps = job.deps
        if not deps:
            return
        job.deps = ()
        for d in deps:
            if not d.state.final and d.worker is None:
                self._place(d)

    def _place(self, job: Job) -> None:
        """Put a chained job where it runs: right after its one upstream job in the same
        worker (sent now if that one is on a worker, else when it is); once every upstream is
        final, with their values (or never, ``Cancelled(DEQUEUED)``, if one did not complete)."""
        if job.state.final:
            return
        pending: list[Job] = []
        for i, u in enumerate(job.ups):
            if not isinstance(u, Job):
                continue
            if not u.state.final:
                pending.append(u)
            elif isinstance(u.state, Completed):
                job.ups[i] = ("v", u.state.pickled)
            else:
                self._finish(job, _unstarted_end(job, time.time()))
                return
        ups = list(dict.fromkeys(pending))
        if not ups:
            with self.lock:
                if job.state.final:
                    return
                job.queued = True
                self.pool._queue.appendleft(job)  # a chain goes on before new work
            return
        u = ups[-1]  # held by the last: placed again when each of the others is final
        w = u.worker
        if len(ups) == 1 and w is not None and not w.doomed and len(w.more) < AHEAD:
            # bounded: the io thread must never block on a full socket while the worker
            # blocks sending results back (a 1,000-long chain sent at once deadlocked)
            self._send_after(w, job)
        elif u.deps:
            u.deps.append(job)
        else:
            u.deps = [job]

    def _send_after(self, w: _Worker, job: Job) -> None:
        """Send ``job`` to ``w`` after what it has; then the jobs chained on it."""
        with self.lock:
            if job.state.final:
                return
            job.worker = w  # claimed: from now on a cancel asks it back or kills
        if w.job is None:
            w.job = job
            if w in self.idle:
                self.idle.remove(w)
            w.cpu_mark = None
        else:
            w.more.append(job)
        self._send(w, job)
        self._send_chain(w, job)

    def _send_chain(self, w: _Worker, job: Job) -> None:
        """``job`` went to ``w``: its chained jobs with one upstream go right after it."""
        if not job.deps:
            return
        keep = []
        for d in job.deps:
            if len(w.more) < AHEAD and not d.state.final and d.worker is None and len({
                    id(u) for u in d.ups if isinstance(u, Job) and not u.state.final}) == 1:
                self._send_after(w, d)
            else:
                keep.append(d)
        job.deps = keep or ()

    def _ask_back(self, w: _Worker, job: Job, why: str) -> None:
        """Ask ``w`` for a job sent ahead that it has not started (it answers ``skipped``,
        or ``started`` if it began first)."""
        self._queue_bytes(w, pack_msg(("skip", job.id)))
        job.skip = why  # after: once it is set, the request is on its way

    def _requeue(self, job: Job) -> None:
        """A job that never started goes back to the front of the queue (or is placed
        again, if chained)."""
        with self.lock:
            if job.state.final:
                return
            job.worker = None
            job.skip = None
            job.kill_requested = False
        if any(isinstance(u, Job) for u in job.ups):
            self._place(job)
            return
        with self.lock:
            job.queued = True
            self.pool._queue.appendleft(job)

    def _next_job(self, w: _Worker) -> None:
        """``w``'s current job is done with: the next one it was sent, or it is idle."""
        w.job = w.more.popleft() if w.more else None
        w.cpu_mark = None
        if w.job is None and not w.doomed:
            w.idle_since = time.monotonic()
            self.idle.append(w)

    # ------------------------------------------------------------ workers and work

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = _VALENT_ROOT + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _spawn(self) -> None:
        """Start one worker. Only ever on this thread: a worker is frozen by the kernel when
        the thread that started it ends (``PR_SET_PDEATHSIG``), so that thread must be the
        one that lives as long as the pool."""
        index = next(self.index)
        parent_sock, child_sock = socket.socketpair()
        out_path = os.path.join(self.tmpdir, f"w{index}.out")
        err_path = os.path.join(self.tmpdir, f"w{index}.err")
        try:
            # -P: the current directory is not on the worker's sys.path while it starts, so a
            # valent/ planted there cannot run (not -I: that would drop PYTHONPATH)
            proc = subprocess.Popen(
                [self.pool.python, "-P", "-m", "valent._pool.worker", str(child_sock.fileno()),
                 str(os.getpid()), out_path, err_path],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._child_env(),
            )
        finally:
            child_sock.close()
        worker = _Worker(proc, parent_sock, out_path, err_path)
        self._tell_watcher(f"+ {proc.pid}")
        try:
            send_msg(parent_sock, {"sys_path": list(sys.path)})
        except OSError:
            pass  # it died at once: its EOF is seen like any other death
        self.workers[worker.key] = worker
        self.sel.register(parent_sock, selectors.EVENT_READ, worker)
        self.idle.append(worker)
        self._publish()

    def _pop_queued(self) -> Job | None:
        """The next live job of the queue (lock held)."""
        q = self.pool._queue
        while q:
            job = q.popleft()
            job.queued = False
            if not job.state.final:
                return job
            self.pool._dead_queued -= 1
        return None

    def _hand_out(self) -> None:
        """Give queued jobs to idle workers (booted ones first); when more wait than there
        are workers, send busy workers the next ones ahead (no round trip between tasks)."""
        while any(w.ready for w in self.idle):  # a booting one gets work once it is up
            with self.lock:
                job = self._pop_queued()
                if job is None:
                    return
                w = self._take_idle()
                job.worker = w  # claimed: from now on a cancel kills
            w.job = job
            w.cpu_mark = None
            self.last_start = time.monotonic()
            self._send(w, job)
            self._send_chain(w, job)
        busy = [w for w in self.workers.values() if w.job is not None and w.ready
                and not w.doomed and len(w.more) < MAX_AHEAD and self._quick(w.job)]
        if not busy:
            return
        with self.lock:
            live = len(self.pool._queue) - self.pool._dead_queued
        if live < DEEP * len(self.workers):
            return
        share = -(-live // len(busy))  # each worker its share: none takes all of a burst
        for w in busy:
            batch: list[Job] = []
            fn_key, limit, more = None, 0, len(w.more)
            with self.lock:
                q = self.pool._queue
                while q and len(batch) < share:
                    head = q[0]
                    if head.state.final:  # cancelled while queued: dropped here
                        q.popleft()
                        head.queued = False
                        self.pool._dead_queued -= 1
                        continue
                    key = head.fn_entry[1]
                    if key != fn_key:  # (a fan-out's jobs share one function: once)
                        t = self.fn_time.get(key)
                        if t is None or t >= QUICK:
                            break  # a job that may run long waits for a free worker
                        limit = min(MAX_AHEAD, max(AHEAD, int(AHEAD_TIME / max(t, 1e-6))))
                        fn_key = key
                    if more + len(batch) >= limit or (
                            not batch and limit > 2 * AHEAD and 2 * more > limit):
                        break  # full; or more than half full: topped up later, in one go
                    q.popleft()
                    head.queued = False
                    head.worker = w  # claimed: from now on a cancel asks it back or kills
                    batch.append(head)
            for job in batch:
                w.more.append(job)
                self._send(w, job)
                self._send_chain(w, job)

    def _quick(self, job: Job) -> bool:
        """Is ``job``'s function known to run quickly? Only such jobs are sent ahead, behind
        such a job: a worker cannot hand back a job sent ahead while its task runs, so a job
        sent behind a long task would wait for it while other workers are free."""
        t = self.fn_time.get(job.fn_entry[1])
        return t is not None and t < QUICK

    def _take_idle(self) -> _Worker:
        for i in range(len(self.idle) - 1, -1, -1):
            if self.idle[i].ready:
                return self.idle.pop(i)
        return self.idle.pop()

    def _send(self, w: _Worker, job: Job) -> None:
        fn, key, blob = job.fn_entry
        forget: list[int] = []
        if key in w.known:
            w.known.move_to_end(key)
            send_blob = None
        else:
            send_blob = blob
            w.known[key] = None
            while len(w.known) > FN_CACHE_SIZE:
                forget.append(w.known.popitem(last=False)[0])
        ups = [("j", u.id) if isinstance(u, Job) else u for u in job.ups] if job.ups else ()
        self._queue_bytes(w, pack_msg((job.id, key, send_blob, forget, ups), job.args_blob),
                          job.args_blob)

    def _queue_bytes(self, w: _Worker, data: bytes, blob: bytes | None = None) -> None:
        """Queue a message for ``w``: sent at the end of the turn, every job handed to it in
        the turn in one system call, and never blocking (what the socket does not take now
        goes when the selector says it can: two sides sending big batches cannot deadlock)."""
        if w.dead_at is not None:
            return  # it died: its jobs are settled when it is retired
        w.wbuf += data
        if blob is not None:
            w.wbuf += blob
        self.out[w] = None

    def _flush(self, w: _Worker) -> None:
        """Send what the socket takes now of ``w``'s queued bytes; wait for the rest."""
        if w.wbuf and w.dead_at is None:
            try:
                n = w.sock.send(w.wbuf, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:  # it died: its EOF is seen and its jobs settled
                n = len(w.wbuf)
            del w.wbuf[:n]
        elif w.dead_at is not None:
            w.wbuf.clear()
        want = bool(w.wbuf)
        if want != w.writing and w.dead_at is None:
            try:
                self.sel.modify(w.sock, selectors.EVENT_READ | (
                    selectors.EVENT_WRITE if want else 0), w)
                w.writing = want
            except (KeyError, ValueError, OSError):
                pass

    def _busy_cpu_rate(self) -> float:
        """Mean CPU use (0..1) of busy, booted workers since their task started.

        Near 1 means the tasks compute (more workers would only oversubscribe the CPUs);
        near 0 means they wait (sleep, I/O), so queued work may start beside them.
        """
        rates = []
        for w in self.workers.values():
            if w.job is None or w.doomed or not w.ready:
                continue
            now = cpu_mark(w.pid)
            if now is None:
                continue
            if w.cpu_mark is None or now[1] - w.cpu_mark[1] < 0.02:
                w.cpu_mark = w.cpu_mark or now  # first look at this task: measure from here
                continue
            rates.append((now[0] - w.cpu_mark[0]) / (now[1] - w.cpu_mark[1]))
        return sum(rates) / len(rates) if rates else 0.0

    def _maybe_grow(self) -> None:
        """Keep the minimum; grow an elastic pool when work waits behind waiting tasks."""
        total = len(self.workers) - len(self.dying)
        if total >= self.pool.max_workers:
            return  # a full (or fixed-size) pool: nothing to decide
        with self.lock:
            queued = len(self.pool._queue) - self.pool._dead_queued
        queued += sum(len(w.more) for w in self.workers.values())  # they wait too
        if total < self.pool.min_workers and (queued or not self._broken()):
            for _ in range(self.pool.min_workers - total):
                self._spawn()
            return
        if total >= self.pool.max_workers or not queued or self.idle:
            return
        booting = sum(1 for w in self.workers.values() if not w.ready and not w.doomed)
        want = queued - booting
        if want <= 0 or time.monotonic() - self.last_start < self.pool.grow_after:
            return
        if self._busy_cpu_rate() < 0.5:
            for _ in range(min(want, max(1, total), self.pool.max_workers - total)):
                self._spawn()
            self.last_start = time.monotonic()

    def _shrink(self) -> None:
        now = time.monotonic()
        live = len(self.workers) - len(self.dying)
        for w in list(self.idle):
            if live <= self.pool.min_workers:
                break
            if now - w.idle_since > self.pool.idle_timeout:
                self._begin_kill(w, grace=0.0)
                live -= 1

    # ------------------------------------------------------------ messages from workers

    def _on_readable(self, w: _Worker) -> bool:
        """Read what the worker sent (one recv, however many messages) and handle each;
        False at EOF (or when nothing was there)."""
        try:
            n = w.sock.recv_into(self.rbuf)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if n == 0:
            self._on_eof(w)
            return False
        buf = w.rbuf
        buf += self.rview[:n]
        msgs: list[tuple[Any, bytes | None]] = []
        pos, size, broken = 0, len(buf), False
        with memoryview(buf) as view:  # read in place (released before the cut below)
            while size - pos >= HEADER.size:
                meta_len, blob_len = HEADER.unpack_from(view, pos)
                start = pos + HEADER.size + meta_len
                end = start + max(blob_len - 1, 0)
                if size < end:
                    break
                try:
                    msg = pickle.loads(view[pos + HEADER.size:start])
                except (pickle.UnpicklingError, EOFError, ValueError):
                    broken = True
                    break
                msgs.append((msg, bytes(view[start:end]) if blob_len else None))
                pos = end
        del buf[:pos]  # once, not per message
        for i, (msg, blob) in enumerate(msgs):
            if len(msg) == 3 and i + 1 < len(msgs):  # a start, and what came right after it
                nxt = msgs[i + 1][0]
                if len(nxt) == 8 and nxt[0] == msg[1]:
                    self._on_message(w, msg, blob, ends_next=True)
                    continue
            self._on_message(w, msg, blob)
        if broken:
            self._on_eof(w)
            return False
        return True

    def _drain(self, w: _Worker) -> None:
        """Read whatever a dead or frozen worker left in its socket (a "started", a result)."""
        if w.dead_at is not None:
            return
        w.sock.setblocking(False)
        try:
            while self._on_readable(w):
                pass
        finally:
            if w.dead_at is None:
                try:
                    w.sock.setblocking(True)
                except OSError:
                    pass

    def _on_message(self, w: _Worker, msg: Any, blob: bytes | None,
                    ends_next: bool = False) -> None:
        """Handle one message; ``ends_next``: a start whose job's result came with it (the
        job ran and ended: only its start time is kept, no ``Running`` in between)."""
        if len(msg) == 1:  # ("ready",): the interpreter is up
            w.ready = True
            self.boot_failures = 0
            return
        job = w.job
        if len(msg) == 2:  # ("skipped" | "need" | "unstarted", job_id): its body did not run
            if job is None or job.id != msg[1]:
                return
            if msg[0] == "unstarted":
                # the cancel came as the worker said "started", before it called the body: it
                # takes the start back and ends; its retirement settles the job (a start the
                # job made in an earlier worker, see _unstarted_end, stays)
                with self.lock:
                    if isinstance(job.state, Running) and job.state.started_at == job.started_at:
                        job.started_at = None
                    job.state = _PENDING
                return
            self._next_job(w)
            if job.state.final:
                return
            with self.lock:
                cancel_at = job.cancel_at
            upstream_lost = any(
                isinstance(u, Job) and u.state.final and not isinstance(u.state, Completed)
                for u in job.ups)
            if cancel_at is not None or (msg[0] == "skipped" and upstream_lost):
                self._finish(job, _unstarted_end(job, time.time()))
            else:  # asked back to run elsewhere, or sent again with its upstream's value
                self._requeue(job)
            return
        if len(msg) == 3:  # ("started", job_id, time): its body is being called now
            if job is not None and job.id == msg[1] and not job.state.final:
                if ends_next:
                    with self.lock:
                        job.started_at = job.started_at or msg[2]
                    job.skip = None
                    return
                with self.lock:
                    job.started_at = job.started_at or msg[2]  # its first start, if it ran again
                    job.state = Running(msg[2], w.out_path, w.err_path)
                    cancelled = job.kill_requested
                job.skip = None
                self.started.append((time.monotonic() + RUNNING_NOTE_DELAY, job))
                if cancelled and not w.doomed:  # asked back too late: it is cancelled now
                    self._begin_kill(w)
            return
        job_id, ok, payload, started, ended, out, err, asked_to_stop = msg
        if job is None or job.id != job_id or job.state.final:
            return
        if job.started_at is None:
            job.started_at = started
        with self.lock:
            cancel_at = job.cancel_at
        if cancel_at is not None and (asked_to_stop or (not ok and ended >= cancel_at)):
            # it ended because of the cancel, or after it was requested (its own SIGTERM
            # handler, an error while stopping): Cancelled(KILLED) once its tree is gone
            job.held = (out, err)
            w.settled = True
            if not w.doomed:
                self._begin_kill(w)
            return
        # it ended before the cancel was requested (or before it reached the task): the truth
        key = job.fn_entry[1]
        took = max(0.0, ended - started)
        last = self.fn_time.get(key)
        if last is None and len(self.fn_time) >= 4 * FN_CACHE_SIZE:
            self.fn_time.clear()
        self.fn_time[key] = took if last is None or took > 4 * last else 0.8 * last + 0.2 * took
        if ok:
            state: TaskState = Completed(
                pickled=blob, started_at=started, ended_at=ended, stdout=out, stderr=err
            )
        else:
            state = Failed(unpack_error(payload), payload[2], started, ended, out, err)
        # the next job sent ahead becomes the current one even in a worker being stopped: it
        # may have started before the stop reached the worker (its "started" is on its way,
        # and is matched against the current job), so it is settled as killed or dequeued
        # by what the worker says, never assumed unstarted
        self._next_job(w)
        if w.doomed and w.job is None:
            w.settled = True  # nothing more runs in it: no need to wait out the grace
        self._finish(job, state)

    def _on_eof(self, w: _Worker) -> None:
        """The worker's socket closed: it died, by our kill or on its own."""
        if w.dead_at is not None:
            return
        w.dead_at = time.monotonic()
        w.wbuf.clear()
        try:
            self.sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        if w.doomed:
            w.next_scan = 0.0  # being stopped, it exited: look at what is left now
        else:
            # died on its own (os._exit, segfault, OOM): nothing of its tree may stay
            w.died_at = time.time()
            w.doomed = w.reaping = True
            if w in self.idle:
                self.idle.remove(w)
            self.dying.append(w)
            if not w.ready:
                self.boot_failures += 1
            if not self.closing:
                self.respawn += 1

    # ------------------------------------------------------------ stopping workers

    def _begin_kill(self, w: _Worker, grace: float | None = None) -> None:
        """SIGTERM the worker's group and every descendant; after the grace (or sooner, once
        it stopped and its tree is gone), :meth:`_advance_kills` kills the rest."""
        self._begin_kills([w], grace)

    def _begin_kills(self, ws: list[_Worker], grace: float | None = None) -> None:
        """:meth:`_begin_kill` for several workers at once: every group is signalled first,
        then one scan of the processes finds what left each group (``setsid``)."""
        g = self.pool.grace if grace is None else grace
        now = self.last_kill = time.monotonic()
        for w in ws:
            w.doomed = True
            if w in self.idle:
                self.idle.remove(w)
            self.dying.append(w)
            w.term_at = now
            w.next_scan = now + LOOK_FIRST
            w.kill_deadline = now + g
            if g <= 0:
                w.reaping = True
            else:
                proctree.signal_group(w.pid, signal.SIGTERM)
            if not self.closing:
                self.respawn += 1
        if g > 0:
            scan: proctree.Scan | None = None
            for w in ws:
                got = proctree.walk(w.pid)
                if got is not None:  # its tree only (it lives: every descendant is under it)
                    w.tree = {p: t for p, (t, _) in got[0].items()}
                    outside = [p for p, (_, grp) in got[0].items() if grp != w.pid]
                else:
                    scan = scan or proctree.Scan()
                    w.tree = scan.tree(w.pid)
                    group = set(scan.groups.get(w.pid, ()))
                    outside = [p for p in w.tree if p not in group]
                proctree.signal_pids(outside, signal.SIGTERM)

    def _rest(self, w: _Worker, scans: list[proctree.Scan]) -> dict[int, int]:
        """What is left alive of the worker's tree. While the worker lives (unreaped, so its
        pid is its own) that is its descendants and group now, every orphan included (it is
        their subreaper): walked down from it; once it is dead, what was seen last, and its
        group: each process seen last looked at, and the group from the kernel's word that it
        is empty, or else from a scan of every process (``scans``: one shared, made when
        first needed)."""
        if w.proc.returncode is None:
            for _ in range(3):
                got = proctree.walk(w.pid)
                if got is None:
                    break
                live, zombies = got
                settled = zombies == w.zombies
                w.zombies = zombies
                if live or settled:
                    w.tree = {p: t for p, (t, _) in live.items()}
                    return w.tree
                # empty, but a process just exited: its children may be on their way up
            if not scans:
                scans.append(proctree.Scan())
            w.tree = scans[0].tree(w.pid)
            return w.tree
        if proctree.group_empty(w.pid):  # (a scan of every process takes ~0.5 ms of the GIL)
            return proctree.still_alive(w.tree)
        if not scans:
            scans.append(proctree.Scan())
        scan = scans[0]
        rest = scan.alive(w.tree)
        rest.update((p, scan.start[p]) for p in scan.groups.get(w.pid, ()))
        return rest

    def _advance_kills(self) -> None:
        """Move the dying workers on: wait out the grace (or until the worker stopped itself
        and its tree is gone); then freeze each, kill its tree until a scan finds nothing,
        kill it, reap it, settle its job."""
        now = time.monotonic()
        ready: list[_Worker] = []
        for w in list(self.dying):
            if w.reaping:
                continue
            exited = w.proc.poll() is not None
            if now >= (w.kill_deadline or 0):
                w.reaping = True
            elif now >= w.next_scan:
                w.next_scan = now + _look(now - w.term_at)
                if exited or w.settled or proctree.state(w.pid) in ("T", "t"):
                    # it stopped (frozen, idle, or dead): once nothing of its tree is left, it
                    # can go now, without waiting out the grace
                    if not self._rest(w, []):
                        ready.append(w)
                elif (w.term_at and w.nudged < len(NUDGES)
                      and now - w.term_at >= NUDGES[w.nudged]):
                    w.nudged += 1  # see NUDGES (not reaped: the pid is still its own)
                    proctree.signal_pids([w.pid], signal.SIGURG)
        self._end_all(ready)
        todo = [w for w in self.dying if w.reaping]
        for w in todo:
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGSTOP)  # it keeps its orphans while we kill
                except OSError:
                    pass
        for _ in range(10):  # what is still not gone (uninterruptible sleep): next turn
            if not todo:
                return
            scans: list[proctree.Scan] = []
            left = []
            ready = []
            for w in todo:
                rest = self._rest(w, scans)
                if rest:
                    proctree.signal_pids(rest, signal.SIGKILL)
                    left.append(w)
                    continue
                ready.append(w)
            self._end_all(ready)
            todo = left
            if todo:
                time.sleep(0.001)

    def _end_all(self, ws: list[_Worker]) -> None:
        """:meth:`_end` several workers: all are killed first, then each is awaited."""
        if len(ws) > 1:
            for w in ws:
                if w.proc.poll() is None:
                    try:
                        w.proc.kill()
                    except OSError:
                        pass
        for w in ws:
            self._end(w)

    def _end(self, w: _Worker) -> None:
        """Nothing of its tree is left: kill the worker, reap it, retire it."""
        if w.proc.poll() is None:
            try:
                w.proc.kill()
                _wait_exit(w.proc, 1.0)
                w.proc.wait(timeout=0)
            except (OSError, subprocess.TimeoutExpired):
                w.reaping = True  # the next turn tries again
                return
        self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """Forget a dead worker whose tree is gone; settle its job."""
        self._drain(w)  # a "started" or a result may still be in its socket
        w.wbuf.clear()
        self.out.pop(w, None)
        self.dying.remove(w)
        self.workers.pop(w.key, None)
        self._publish()
        if w.dead_at is None:
            # retired before the selector saw EOF: unregister before the close, or a new
            # worker's socket reusing this fd cannot be registered
            try:
                self.sel.unregister(w.sock)
            except (KeyError, ValueError):
                pass
        w.sock.close()
        self._tell_watcher(f"- {w.pid}")
        job, w.job = w.job, None
        ahead, w.more = list(w.more), collections.deque()
        for j in ahead:  # sent ahead, never started: cancelled if asked, else elsewhere
            if j.state.final:
                continue
            with self.lock:
                asked = j.cancel_at is not None
            if asked or self.closing:
                self._finish(j, _unstarted_end(j, time.time()))
            else:
                self._requeue(j)
        out, err = tail(w.out_path), tail(w.err_path)
        if self._broken() and not self.closing:
            how = proctree.signal_name(w.proc.returncode)
            last = " ".join(err.strip().splitlines()[-3:])
            self._fail_queue(f"the last {self.boot_failures} exited with {how}: {last}")
        for p in (w.out_path, w.err_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        if job is None or job.state.final:
            return
        if job.held is not None:
            out, err = job.held
        with self.lock:
            cancel_at = job.cancel_at
        if cancel_at is None and w.died_at is None and not self.closing:
            # stopped for the cancel of the job before it, whose result came just before the
            # stop reached the worker: this one, sent ahead, began (or was about to) and was
            # stopped with it. Neither cancelled nor failed: it runs again (a start it made
            # stays in started_at, see _unstarted_end)
            self._requeue(job)
            return
        # what happened first decides: a worker seen dead on its own before the cancel
        # request failed its job; one that died after it was stopped by it
        if cancel_at is not None and (w.died_at is None or w.died_at >= cancel_at):
            if job.started_at is None:  # its body never ran
                state: TaskState = _unstarted_end(job, time.time())
            else:
                state = Cancelled(CancelOutcome.KILLED, job.started_at, time.time(), out, err)
        else:
            how = proctree.signal_name(w.proc.returncode)
            detail = err.strip().splitlines()[-12:]
            msg = f"the worker process running {job.label or 'the task'} died ({how})"
            if detail:
                msg += "; its last output:\n" + "\n".join(detail)
            state = Failed(WorkerDiedError(msg), "", job.started_at, time.time(), out, err)
        self._finish(job, state)

    def _broken(self) -> bool:
        """Workers keep dying before they are up (a broken interpreter)."""
        return self.boot_failures >= BOOT_FAILURES

    def _fail_queue(self, why: str) -> None:
        """Workers keep dying before they are up: fail what waits instead of starting more
        forever. A later submit tries again."""
        with self.lock:
            queued = [j for j in self.pool._queue if not j.state.final]
            self.pool._queue, self.pool._dead_queued = collections.deque(), 0
        for job in queued:
            job.queued = False
            self._finish(job, Failed(WorkerDiedError(
                f"{job.label or 'the task'} could not start: worker processes die while "
                f"starting ({why})"), "", None, time.time()))
        self.respawn = 0

    # ------------------------------------------------------------ the watcher

    def _start_watcher(self) -> None:
        """Start the process that kills every worker tree if this process dies."""
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "watch.py")
        try:
            self.watcher = subprocess.Popen(
                [self.pool.python, "-P", path, str(os.getpid())],
                stdin=subprocess.PIPE, start_new_session=True,
            )
        except OSError:
            self.watcher = None

    def _check_watcher(self) -> None:
        if self.watcher is not None and self.watcher.poll() is not None:
            self.watcher = None
            self.watcher_restarts += 1
            if self.watcher_restarts > 3:
                print(f"valent: the {self.pool.name} pool's watcher keeps exiting; if this "
                      "process dies, its workers are frozen but nothing kills them",
                      file=sys.stderr)
                return
            self._start_watcher()  # someone killed it: a new one, told every worker
            self._tell_watcher(f"dir {self.tmpdir}")
            for w in self.workers.values():
                self._tell_watcher(f"+ {w.pid}")

    def _tell_watcher(self, line: str) -> None:
        if self.watcher is None or self.watcher.stdin is None:
            return
        try:
            self.watcher.stdin.write(line.encode() + b"\n")
            self.watcher.stdin.flush()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------ the end

    def _abandon(self) -> None:
        """After a bug in the loop: kill every worker tree, fail every job."""
        from .watch import kill_trees

        try:
            kill_trees({w.pid: _start_ticks(w.pid) for w in self.workers.values()})
        except Exception:
            traceback.print_exc()
        with self.lock:
            self.pool._closed = True
            jobs = list(self.pool._queue) + [w.job for w in self.workers.values() if w.job]
            jobs += [j for w in self.workers.values() for j in w.more] + self.pool._chained
            self.pool._queue.clear()
            self.pool._chained = []
            self.pool._dead_queued = 0
        for w in self.workers.values():
            try:
                w.proc.wait(timeout=1)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.workers.clear()
        for job in jobs:
            if not job.state.final:
                self._finish(job, Failed(WorkerDiedError(
                    "the process pool stopped on an internal error (traceback on stderr)"),
                    "", job.started_at, time.time()))
        for job in self.notes:
            _notify(job)
        self.notes = []

    def _cleanup(self) -> None:
        self._stop_watcher()
        self._publish()
        self.sel.close()
        for s in (self.wake_r, self.wake_w):
            s.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _stop_watcher(self) -> None:
        """The pool ends (or never started): tell the watcher to exit without killing."""
        if self.watcher is not None:
            self._tell_watcher("exit")
            try:
                if self.watcher.stdin is not None:
                    self.watcher.stdin.close()
            except OSError:
                pass
            try:
                self.watcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
                self.watcher.wait()
        self.watcher = None


def _wait_exit(proc: subprocess.Popen, timeout: float) -> None:
    """Wait until the (killed) child exits, woken at once by a pidfd where there is one
    (``Popen.wait(timeout)`` polls with sleeps that double from 0.5 ms)."""
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        proc.wait(timeout=timeout)
        return
    try:
        poller = select.poll()  # not select(): it refuses a descriptor numbered 1024 or more
        poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)
    finally:
        os.close(fd)


_VALENT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The folder that holds the ``valent`` package (put first on the workers' PYTHONPATH so they
import this valent; never the package's own folder, whose modules would shadow the user's
``config``, ``graph``, ``task`` ... in every task and every program a task starts)."""


def _start_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


__all__ = ["ProcessPool", "Job", "RemoteError", "HEADER", "tail"]
