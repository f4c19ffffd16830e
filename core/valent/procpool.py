"""A warm pool of worker processes whose running tasks can be killed, subprocesses and all.

Each worker is a fresh interpreter (``subprocess``, so it also works inside a daemonic Dask
worker) started in its own session: a task and everything it spawns share one process group.
Workers are reused across tasks; a worker whose task is cancelled is killed (SIGTERM, grace,
SIGKILL, group and escaped descendants) and replaced off the critical path. The Local executor
uses it directly, the Dask executor's kill mode runs one inside each Dask worker, and a
third-party executor may reuse it.

    pool = ProcessPool(workers=4)
    job = pool.submit(fn, args, kwargs, on_change=callback)
    job.wait(); job.state            # Completed(pickled=...) | Failed(...) | Cancelled(...)
    pool.cancel(job)                 # CancelOutcome; the job then ends Cancelled(KILLED)
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import pickling
from .errors import PicklingError
from .pooljobs import Job, RemoteError, _Worker, cpu_mark, unpack_error
from .poolkill import KillMixin
from .poolworker import HEADER, send_msg
from .status import CancelOutcome
from .task import Cancelled, Completed, Failed, Pending, Running, TaskState

FN_CACHE_SIZE = 256


class ProcessPool(KillMixin):
    """Warm, reusable, killable worker processes.

    :param workers: a fixed number of workers; or None for an elastic pool of
        ``min_workers`` .. ``max_workers`` that grows when queued work waits behind busy
        workers for ``grow_after`` seconds (tasks that sleep or wait), and shrinks back when
        workers stay idle for ``idle_timeout`` seconds.
    :param grace: seconds a cancelled task that uses ``cancel_requested()`` gets between
        SIGTERM and SIGKILL (a task that never asked stops at SIGTERM).
    :param capture: capture each task's stdout and stderr (fds 1 and 2, subprocesses too).
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
        self._lock = threading.RLock()
        self._queue: collections.deque[Job] = collections.deque()
        self._workers: dict[int, _Worker] = {}  # by socket fileno
        self._idle: list[_Worker] = []
        self._dying: list[_Worker] = []
        self._ids = itertools.count(1)
        self._fn_keys = itertools.count(1)
        self._fn_cache: collections.OrderedDict[int, tuple[Any, int, bytes]] = (
            collections.OrderedDict()
        )
        self._last_start = time.monotonic()
        self._started = False
        self._closed = False
        self._tmpdir: str | None = None
        self._sel: selectors.DefaultSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._worker_index = itertools.count()
        self._rbuf = bytearray(1 << 18)  # the I/O thread's receive buffer
        self._rview = memoryview(self._rbuf)
        self._spawning = 0
        self._respawn = 0

    # ---------------------------------------------------------------- public API

    def start(self) -> None:
        """Start the minimum number of workers (done on first submit otherwise)."""
        with self._lock:
            if self._started:
                return
            if self._closed:
                raise RuntimeError("this ProcessPool was shut down")
            self._tmpdir = tempfile.mkdtemp(prefix=f"{self.name}-pool-")
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._sel.register(self._wake_r, selectors.EVENT_READ, None)
            self._started = True
            for _ in range(self.min_workers):
                self._spawn()
            self._thread = threading.Thread(
                target=self._loop, name=f"{self.name}-pool-io", daemon=True
            )
            self._thread.start()

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        on_change: Callable[[Job], None] | None = None,
        label: str = "",
    ) -> Job:
        """Queue ``fn(*args, **kwargs)``; ``on_change(job)`` is called when it starts and ends.

        Raises ``valent.PicklingError`` when the function or its arguments cannot be pickled.
        """
        entry = self._fn_entry(fn, label)
        try:
            args_blob = cloudpickle.dumps((args, kwargs or {}), protocol=5)
        except Exception as exc:
            raise PicklingError(
                f"the arguments of {label or fn!r} cannot be pickled: {exc}"
            ) from exc
        job = Job(next(self._ids), entry, args_blob, on_change, label)
        if not self._started:
            self.start()
        with self._lock:
            if self._closed:
                raise RuntimeError("this ProcessPool was shut down")
            worker = self._take_idle()
            if worker is None:
                self._queue.append(job)
                self._maybe_grow()
            else:
                self._assign(worker, job)
        if worker is not None:
            self._send(worker, job)
        return job

    def cancel(self, job: Job) -> CancelOutcome:
        """Cancel ``job`` without blocking; its state turns ``Cancelled`` when confirmed."""
        with self._lock:
            if isinstance(job.state, Cancelled):
                return job.state.outcome  # cancelled before: the same answer again
            if job.state.final:
                return CancelOutcome.TOO_LATE
            if job.worker is None:
                try:
                    self._queue.remove(job)
                except ValueError:
                    return CancelOutcome.TOO_LATE
                self._finish(job, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
                notify = True
            else:
                notify = False
                if not job.kill_requested:
                    job.kill_requested = True
                    self._begin_kill(job.worker)
        if notify:
            self._notify(job)
        return CancelOutcome.DEQUEUED if notify else CancelOutcome.KILLED

    def stats(self) -> dict[str, int]:
        """Counts of workers (all, idle, being killed) and queued jobs."""
        with self._lock:
            return {
                "workers": len(self._workers),
                "idle": len(self._idle),
                "dying": len(self._dying),
                "queued": len(self._queue),
            }

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (each one a process-group leader)."""
        with self._lock:
            return [w.pid for w in self._workers.values()]

    def busy_pids(self) -> list[int]:
        """PIDs of the workers running a task now."""
        with self._lock:
            return [w.pid for w in self._workers.values() if w.job is not None]

    def shutdown(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Cancel what is queued, kill what runs, stop every worker; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._started:
                return
            queued, self._queue = list(self._queue), collections.deque()
            for job in queued:
                self._finish(job, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
            for w in list(self._workers.values()):
                if w.job is not None and not w.job.kill_requested:
                    w.job.kill_requested = True
                if not w.doomed:
                    self._begin_kill(w, grace=0.0 if w.job is None else None)
        for job in queued:
            self._notify(job)
        self._poke()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> ProcessPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- internals

    def _fn_entry(self, fn, label) -> tuple[Any, int, bytes]:
        key = id(fn)
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

    def _busy_cpu_rate(self) -> float:
        """Mean CPU use (0..1) of busy, booted workers since their task started (lock held).

        Near 1 means the tasks compute (more workers would only oversubscribe the CPUs);
        near 0 means they wait (sleep, I/O), so queued work may start beside them.
        """
        rates = []
        for w in self._workers.values():
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

    def _spawn(self) -> None:
        """Start one worker (lock held)."""
        assert self._tmpdir is not None and self._sel is not None
        index = next(self._worker_index)
        parent_sock, child_sock = socket.socketpair()
        life_r, life_w = os.pipe()
        out_path = os.path.join(self._tmpdir, f"w{index}.out")
        err_path = os.path.join(self._tmpdir, f"w{index}.err")
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "valent.poolworker", str(child_sock.fileno()), str(life_r),
                 out_path, err_path],
                pass_fds=(child_sock.fileno(), life_r),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._child_env(),
            )
        finally:
            child_sock.close()
            os.close(life_r)
        os.set_inheritable(life_w, False)
        worker = _Worker(proc, parent_sock, life_w, out_path, err_path, index)
        send_msg(parent_sock, {"sys_path": list(sys.path)})
        self._workers[worker.key] = worker
        self._sel.register(parent_sock, selectors.EVENT_READ, worker)
        self._idle.append(worker)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _maybe_grow(self) -> None:
        """Grow an elastic pool when work waits (lock held)."""
        total = len(self._workers) - len(self._dying)
        if total < self.min_workers:
            for _ in range(self.min_workers - total):
                self._spawn()
            self._drain_to_idle()
            return
        if total >= self.max_workers or not self._queue:
            return
        booting = sum(1 for w in self._workers.values() if not w.ready and not w.doomed)
        want = len(self._queue) - booting
        if want <= 0 or time.monotonic() - self._last_start < self.grow_after:
            return
        if self._busy_cpu_rate() < 0.5:
            n = min(want, max(1, total), self.max_workers - total)
            for _ in range(n):
                self._spawn()
            self._last_start = time.monotonic()
            self._drain_to_idle()

    def _drain_to_idle(self) -> None:
        pairs = []
        while self._idle and self._queue:
            w, j = self._take_idle(), self._queue.popleft()
            self._assign(w, j)
            pairs.append((w, j))
        if pairs:
            threading.Thread(target=self._send_many, args=(pairs,), daemon=True).start()

    def _send_many(self, pairs) -> None:
        for w, j in pairs:
            self._send(w, j)

    def _take_idle(self) -> _Worker | None:
        """An idle worker, preferring one whose interpreter is up (lock held)."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i].ready:
                return self._idle.pop(i)
        return self._idle.pop() if self._idle else None

    def _assign(self, worker: _Worker, job: Job) -> None:
        """Bind ``job`` to an idle ``worker`` (lock held); the send happens outside the lock."""
        worker.job = job
        job.worker = worker
        if worker.ready:  # else it starts (and is reported Running) once the worker is up
            job.state = Running(time.time(), worker.out_path, worker.err_path)
        self._last_start = time.monotonic()
        worker.cpu_mark = None

    def _send(self, worker: _Worker, job: Job) -> None:
        fn, key, blob = job.fn_entry
        forget: list[int] = []
        with self._lock:
            if key in worker.known:
                worker.known.move_to_end(key)
                send_blob = None
            else:
                send_blob = blob
                worker.known[key] = None
                while len(worker.known) > FN_CACHE_SIZE:
                    forget.append(worker.known.popitem(last=False)[0])
        try:
            send_msg(worker.sock, (job.id, key, send_blob, forget), job.args_blob)
        except OSError:
            pass  # the worker died; the I/O thread sees EOF and handles the job
        job.args_blob = b""
        self._notify(job)

    def _notify(self, job: Job) -> None:
        cb = job.on_change
        if cb is not None:
            try:
                cb(job)
            except Exception:  # an observer's bug must not kill the pool
                import traceback

                traceback.print_exc()

    def _finish(self, job: Job, state: TaskState) -> None:
        job.state = state
        job.done.set()

    def _poke(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def _loop(self) -> None:
        assert self._sel is not None
        while True:
            timeout = self._next_timeout()
            events = self._sel.select(timeout)
            for key, _ in events:
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)  # type: ignore[union-attr]
                    except OSError:
                        pass
                    continue
                self._on_readable(key.data)
            self._tick()
            with self._lock:
                if self._closed and not self._workers:
                    break
        self._cleanup()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        t = 1.0
        with self._lock:
            for w in self._dying:
                if w.dead_at is not None:
                    t = min(t, 0.005)
                elif w.kill_deadline is not None:
                    t = min(t, max(0.0, w.kill_deadline - now) + 0.001)
            if self._queue and len(self._workers) < self.max_workers:
                t = min(t, self.grow_after)
        return t

    def _on_readable(self, worker: _Worker) -> None:
        """Read what the worker sent (one recv, however many messages) and handle each."""
        try:
            n = worker.sock.recv_into(self._rbuf)
        except OSError:
            n = 0
        if n == 0:
            self._on_eof(worker)
            return
        buf = worker.rbuf
        buf += self._rview[:n]
        while len(buf) >= HEADER.size:
            meta_len, blob_len = HEADER.unpack_from(buf)
            start = HEADER.size + meta_len
            end = start + max(blob_len - 1, 0)
            if len(buf) < end:
                break
            try:
                msg = pickle.loads(buf[HEADER.size:start])
            except (pickle.UnpicklingError, EOFError, ValueError):
                self._on_eof(worker)
                return
            blob = bytes(buf[start:end]) if blob_len else None
            del buf[:end]
            self._on_message(worker, msg, blob)

    def _on_message(self, worker: _Worker, msg: Any, blob: bytes | None) -> None:
        if len(msg) == 1:  # ("ready",): the interpreter is up; its job (if any) starts now
            with self._lock:
                worker.ready = True
                job = worker.job
                if job is not None and isinstance(job.state, Pending):
                    job.state = Running(time.time(), worker.out_path, worker.err_path)
                else:
                    job = None
            if job is not None:
                self._notify(job)
            return
        job_id, ok, payload, started, ended, out, err, asked_to_stop = msg
        with self._lock:
            job = worker.job
            if job is None or job.id != job_id:
                return
            if job.kill_requested:
                worker.kill_deadline = time.monotonic()  # no need to wait out the grace
                if asked_to_stop:
                    # it stopped cooperatively: Cancelled(KILLED) once its group is gone
                    return
                # it finished before the cancel reached it: that is the truth to report
            worker.job = None
            if ok:
                state: TaskState = Completed(
                    pickled=blob, started_at=started, ended_at=ended, stdout=out, stderr=err
                )
            else:
                state = Failed(unpack_error(payload), payload[2], started, ended, out, err)
            self._finish(job, state)
            nxt = None
            if not worker.doomed:
                if self._queue:
                    nxt = self._queue.popleft()
                    self._assign(worker, nxt)
                else:
                    worker.idle_since = time.monotonic()
                    self._idle.append(worker)
        if nxt is not None:
            self._send(worker, nxt)
        self._notify(job)

    def _cleanup(self) -> None:
        if self._sel is not None:
            self._sel.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


__all__ = ["ProcessPool", "Job", "RemoteError", "HEADER"]
