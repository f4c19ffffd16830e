"""``SubprocessExecutor``: each task in a fresh Python process, in its own session."""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cloudpickle
import valent
from valent.plugin import (
    Cancelled,
    CancelOutcome,
    Capabilities,
    Completed,
    Executor,
    Failed,
    Pending,
    Running,
    Task,
    TaskState,
    Wake,
    alive_escapees,
    group_members,
    signal_escapees,
    signal_group,
    signal_name,
    snapshot_tree,
)

TAIL = 64 * 1024


class Job:
    """The handle ``run`` returns: one task, its process once started, its state."""

    def __init__(self, task: Task, wake: Wake, folder: Path):
        self.task = task
        self.wake = wake
        self.folder = folder
        self.state: TaskState = Pending()
        self.proc: subprocess.Popen | None = None
        self.cancelled = False
        self.tree: list[tuple[int, float]] = []
        self.timer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"<Job {self.task.label} {type(self.state).__name__}>"


class SubprocessExecutor(Executor):
    """Runs each task in a fresh ``python -m valent_subprocess.runner`` process.

    The task (function and arguments) is cloudpickled to a file; the child runs it in its own
    session and writes the result file atomically. At most ``max_parallel`` tasks run at
    once; the others wait in a queue. Cancel: a waiting task is dequeued; a running one gets
    SIGTERM on its process group (a task that checks ``valent.cancel_requested()`` has
    ``grace`` seconds to return), then SIGKILL, and it reports ``Cancelled(KILLED)`` only
    once no process of its group (nor a descendant that left it) is alive.

    :param max_parallel: tasks running at once (default: the CPU count).
    :param grace: seconds between SIGTERM and SIGKILL when a running task is cancelled.
    :param python: the interpreter that runs tasks (default: this one); it needs valent.
    """

    name = "subprocess"
    capabilities = Capabilities(cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0)

    def __init__(self, max_parallel: int | None = None, grace: float = 1.0,
                 python: str | None = None):
        if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel < 1):
            raise ValueError(f"max_parallel must be a whole number >= 1, got {max_parallel!r}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
        self.max_parallel = max_parallel or os.cpu_count() or 1
        self.grace = grace
        self.python = python or sys.executable
        self.capabilities = dataclasses.replace(type(self).capabilities, grace=grace)
        self._lock = threading.Lock()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._threads: list[threading.Thread] = []
        self._root: Path | None = None
        self._closed = False

    # ------------------------------------------------------------------ the protocol

    def run(self, task: Task, wake: Wake) -> Job:
        with self._lock:
            if self._closed:
                raise valent.ExecutorError("this SubprocessExecutor was shut down")
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="valent-subprocess-"))
            folder = Path(tempfile.mkdtemp(prefix=f"{task.name}-", dir=self._root))
        try:
            with open(folder / "task.pkl", "wb") as f:
                # sys.path first, so the child can import the modules the function lives in.
                cloudpickle.dump(sys.path, f)
                cloudpickle.dump((task.fn, task.args, task.kwargs), f)
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise valent.PicklingError(f"{task.label} cannot be pickled: {exc}") from exc
        job = Job(task, wake, folder)
        with self._lock:
            self._queue.append(job)
            self._start_queued()
        return job

    def poll(self, handle: Job) -> TaskState:
        return handle.state

    def cancel(self, handle: Job) -> CancelOutcome:
        with self._lock:
            if handle.state.final:
                return CancelOutcome.TOO_LATE
            if handle.proc is None:  # still queued: it will never start
                self._queue.remove(handle)
                self._settle(handle, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
                dequeued = True
            else:
                dequeued = False
                if not handle.cancelled:
                    handle.cancelled = True
                    self._signal(handle, signal.SIGTERM)
                    handle.timer = threading.Timer(self.grace, self._signal,
                                                   (handle, signal.SIGKILL))
                    handle.timer.daemon = True
                    handle.timer.start()
        if dequeued:
            handle.wake()
            return CancelOutcome.DEQUEUED
        return CancelOutcome.KILLED

    def shutdown(self) -> None:
        """Dequeue what waits, kill what runs (no grace), wait for it, remove the files."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            for job in queued:
                self._settle(job, Cancelled(CancelOutcome.DEQUEUED, ended_at=time.time()))
            for job in self._running:
                job.cancelled = True
                self._signal(job, signal.SIGKILL)
            threads = list(self._threads)
        for job in queued:
            job.wake()
        for t in threads:
            t.join(10)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"SubprocessExecutor(max_parallel={self.max_parallel}, grace={self.grace})"

    # ------------------------------------------------------------------ internals

    def _start_queued(self) -> None:
        """Start queued jobs while there are free slots (lock held)."""
        while self._queue and len(self._running) < self.max_parallel:
            job = self._queue.popleft()
            with open(job.folder / "stdout", "wb") as out, open(job.folder / "stderr", "wb") as err:
                job.proc = subprocess.Popen(
                    [self.python, "-m", "valent_subprocess.runner",
                     str(job.folder / "task.pkl"), str(job.folder / "result.pkl")],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True,  # its own process group: cancel kills the tree
                )
            job.state = Running(time.time())
            self._running.add(job)
            t = threading.Thread(target=self._watch, args=(job,), daemon=True,
                                 name=f"valent-subprocess-{job.proc.pid}")
            self._threads.append(t)
            t.start()
            job.wake()

    def _signal(self, job: Job, sig: int) -> None:
        """Signal the job's process group and any descendant that left it."""
        assert job.proc is not None
        job.tree = job.tree + snapshot_tree(job.proc.pid)
        signal_group(job.proc.pid, sig)
        signal_escapees(job.tree, job.proc.pid, sig)

    def _watch(self, job: Job) -> None:
        """Wait for the job's process, then settle its state and start the next job."""
        assert job.proc is not None
        code = job.proc.wait()
        if job.timer is not None:
            job.timer.cancel()
        if job.cancelled:
            # Confirm the stop: nothing of its group (or escaped from it) may still run.
            while group_members(job.proc.pid) or alive_escapees(
                job.tree, job.proc.pid
            ):
                self._signal(job, signal.SIGKILL)
                time.sleep(0.02)
        state = self._read_result(job, code)
        with self._lock:
            self._running.discard(job)
            self._settle(job, state)
            self._threads.remove(threading.current_thread())
            if not self._closed:
                self._start_queued()
        job.wake()

    def _read_result(self, job: Job, code: int) -> TaskState:
        started = job.state.started_at if isinstance(job.state, Running) else None
        out, err = _tail(job.folder / "stdout"), _tail(job.folder / "stderr")
        try:
            with open(job.folder / "result.pkl", "rb") as f:
                ok, blob, message, tb, started, ended, asked = cloudpickle.load(f)
        except FileNotFoundError:
            if job.cancelled:
                return Cancelled(CancelOutcome.KILLED, started, time.time(), out, err)
            why = signal_name(code)
            return Failed(valent.WorkerDiedError(
                f"the process running {job.task.label} ended ({why}) without a result"
            ), "", started, time.time(), out, err)
        if job.cancelled and asked:  # it saw the cancel and stopped cooperatively
            return Cancelled(CancelOutcome.KILLED, started, time.time(), out, err)
        if ok:  # finished before the cancel reached it (if there was one): that is the truth
            return Completed(pickled=blob, started_at=started, ended_at=ended,
                             stdout=out, stderr=err)
        error = cloudpickle.loads(blob) if blob is not None else message
        return Failed(error, tb, started, ended, out, err)

    def _settle(self, job: Job, state: TaskState) -> None:
        """Record the final state and delete the job's files (lock held)."""
        job.state = state
        shutil.rmtree(job.folder, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
