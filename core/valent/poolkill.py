"""How the pool stops workers: SIGTERM, grace, SIGKILL, confirm the group (and escapees) gone,
reap, report, replace. A mixin of :class:`valent.procpool.ProcessPool`, run on its I/O thread
(``_begin_kill`` also from ``cancel``), with its lock held where noted."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from . import proctree
from .errors import WorkerDiedError
from .pooljobs import Job, _Worker, tail
from .status import CancelOutcome
from .task import Cancelled, Failed, TaskState


class KillMixin:
    """Killing, confirming and retiring workers, for the pool."""

    def _begin_kill(self, worker: _Worker, grace: float | None = None) -> None:
        """SIGTERM the worker's group and its escaped descendants (lock held)."""
        worker.doomed = True
        if worker in self._idle:
            self._idle.remove(worker)
        self._dying.append(worker)
        worker.tree = proctree.snapshot_tree(worker.pid)
        proctree.signal_group(worker.pid, signal.SIGTERM)
        proctree.signal_escapees(worker.tree, worker.pid, signal.SIGTERM)
        g = self.grace if grace is None else grace
        worker.kill_deadline = time.monotonic() + g
        if not self._closed:
            self._respawn += 1  # the I/O thread starts a replacement (not the canceller)
        self._poke()

    def _on_eof(self, worker: _Worker) -> None:
        """The worker's socket closed: it died, by our kill or on its own."""
        with self._lock:
            if worker.dead_at is not None:
                return
            worker.dead_at = time.monotonic()
            if self._sel is not None:
                try:
                    self._sel.unregister(worker.sock)
                except (KeyError, ValueError):
                    pass
            if not worker.doomed:
                # died on its own (os._exit, segfault, OOM): nothing of its group may stay
                worker.doomed = True
                if worker in self._idle:
                    self._idle.remove(worker)
                self._dying.append(worker)
                worker.tree = proctree.snapshot_tree(worker.pid)
                worker.kill_deadline = time.monotonic()
                if not self._closed:
                    self._spawn()
                    self._drain_to_idle()

    def _tick(self) -> None:
        """Advance kills: SIGKILL at the deadline, confirm groups gone, reap, report; then
        start replacements (after reporting, so that confirming a stop never waits on them)."""
        now = time.monotonic()
        finished: list[Job] = []
        with self._lock:
            live = proctree.live_groups() if self._dying else set()
            for w in list(self._dying):
                if w.kill_deadline is not None and now >= w.kill_deadline:
                    proctree.signal_group(w.pid, signal.SIGKILL)
                    proctree.signal_escapees(w.tree, w.pid, signal.SIGKILL)
                    w.kill_deadline = None
                if w.dead_at is None and w.proc.poll() is None:
                    continue
                if w.pid in live or proctree.alive_escapees(w.tree, w.pid):
                    if w.kill_deadline is None:
                        proctree.signal_group(w.pid, signal.SIGKILL)
                    continue
                job = self._retire(w)
                if job is not None:
                    finished.append(job)
        for job in finished:
            self._notify(job)
        with self._lock:
            while self._respawn and not self._closed:
                self._respawn -= 1
                if len(self._workers) - len(self._dying) >= self.max_workers:
                    continue  # already replaced (a submit meanwhile brought it back to size)
                self._spawn()
                self._drain_to_idle()
            if self._closed and not self._dying:
                for w in list(self._workers.values()):
                    self._begin_kill(w, grace=0.0)
            self._shrink(now)
            if self._queue:
                self._maybe_grow()

    def _retire(self, w: _Worker) -> Job | None:
        """Forget a dead worker whose group is gone; settle its job (lock held)."""
        try:
            w.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return None
        self._dying.remove(w)
        self._workers.pop(w.key, None)
        if w.dead_at is None and self._sel is not None:
            # retired on its exit status before the selector saw EOF: unregister before the
            # close, or a new worker's socket reusing this fd cannot be registered
            try:
                self._sel.unregister(w.sock)
            except (KeyError, ValueError):
                pass
        w.sock.close()
        try:
            os.close(w.lifeline)
        except OSError:
            pass
        job, w.job = w.job, None
        out, err = tail(w.out_path), tail(w.err_path)
        for p in (w.out_path, w.err_path):
            try:
                os.unlink(p)
            except OSError:
                pass
        if job is None or job.state.final:
            return None
        started = getattr(job.state, "started_at", None)
        if job.kill_requested:
            state: TaskState = Cancelled(CancelOutcome.KILLED, started, time.time(), out, err)
        else:
            how = proctree.signal_name(w.proc.returncode)
            detail = err.strip().splitlines()[-12:]
            msg = f"the worker process running {job.label or 'the task'} died ({how})"
            if detail:
                msg += "; its last output:\n" + "\n".join(detail)
            state = Failed(WorkerDiedError(msg), "", started, time.time(), out, err)
        self._finish(job, state)
        return job

    def _shrink(self, now: float) -> None:
        live = len(self._workers) - len(self._dying)
        for w in list(self._idle):
            if live <= self.min_workers:
                break
            if now - w.idle_since > self.idle_timeout:
                self._begin_kill(w, grace=0.0)
                live -= 1
