"""One background thread per host: starts, watches and kills remote tasks over one connection.

The dispatcher's thread only queues work here (``submit``, ``cancel``) and reads states
(``RemoteTask.state``); everything that talks to the network happens on the host's thread,
which sleeps in ``select`` on the agent's channel and a wake-up pipe: no busy polling. Each
state change calls the task's ``wake()``. A dropped connection is retried with backoff; the
remote tasks keep running and are adopted again by the new agent.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Any

from valent.plugin import Cancelled, CancelOutcome, Failed, PicklingError, Running, TaskState

from .connection import Connection, ConnectionLost, Target, redact_error
from .errors import SSHError, SSHUnreachableError
from .handle import Phase, RemoteTask, final_state
from .payload import pickle_task
from .registry import remember_orphan, take_orphans

logger = logging.getLogger("valent.ssh")

PING_EVERY = 5.0  # seconds between pings to the agent while tasks run
SILENCE_LIMIT = 20.0  # no word from the agent for this long: the connection is dead


class HostWorker:
    """The thread and connection serving every task of one host (and one set of settings)."""

    def __init__(self, target: Target, max_parallel: int, reconnect_timeout: float):
        self.target = target
        self.max_parallel = max_parallel
        self.reconnect_timeout = reconnect_timeout
        self._lock = threading.Lock()
        self._queue: collections.deque[RemoteTask] = collections.deque()
        self._active: dict[str, RemoteTask] = {}
        self._kills: list[RemoteTask] = []
        self._cleanup: list[tuple[str, str]] = []
        self._conn: Connection | None = None
        self._pinned: dict[str, Any] = {}
        self._ever_connected = False
        self._lost_since: float | None = None
        self._lost_cause: BaseException | None = None
        self._attempts = 0
        self._next_attempt = 0.0
        self._last_heard = 0.0
        self._last_ping = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- called from the dispatcher's thread ----------------------------------------------

    def submit(self, rt: RemoteTask) -> None:
        with self._lock:
            self._queue.append(rt)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name=f"valent-ssh-{self.target.where}", daemon=True
                )
                self._thread.start()
        self._poke()

    def cancel(self, rt: RemoteTask) -> CancelOutcome:
        """Dequeue it, or have the host thread kill its remote group; never blocks."""
        with self._lock:
            if rt.promised is not None:
                return rt.promised
            if rt.phase is Phase.DONE:
                return CancelOutcome.TOO_LATE
            rt.cancel_requested = True
            if rt.phase is Phase.QUEUED:
                self._queue.remove(rt)
                rt.promised = CancelOutcome.DEQUEUED
                finished = self._finish_locked(rt, Cancelled(CancelOutcome.DEQUEUED))
            elif rt.phase is Phase.UPLOADING:  # the host thread will not start it
                rt.promised = CancelOutcome.DEQUEUED
                finished = False
            else:
                # its function not yet called (no "body" from the host): stopping it now means
                # it never starts; the final state says what happened on the host in the end
                rt.promised = (
                    CancelOutcome.KILLED if rt.started_at is not None else CancelOutcome.DEQUEUED
                )
                rt.phase = Phase.KILLING
                self._kills.append(rt)
                finished = False
        if finished:
            rt.wake_safely()
        self._poke()
        return rt.promised

    def active_count(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._active)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the connection (remote tasks are not touched)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._poke()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- helpers ---------------------------------------------------------------------------

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _finish_locked(self, rt: RemoteTask, state: TaskState) -> bool:
        if rt.phase is Phase.DONE:
            return False
        rt.phase = Phase.DONE
        rt.state = state
        rt.done.set()
        self._active.pop(rt.rid, None)
        return True

    def _finish(self, rt: RemoteTask, state: TaskState) -> None:
        with self._lock:
            done = self._finish_locked(rt, state)
        if done:
            rt.wake_safely()

    def _fail_all(self, error: BaseException) -> None:
        """The host cannot be reached (or refuses us): every task it holds ends.

        Tasks that were started are remembered as orphans: the next connection to the host
        kills what is left of them and removes their directories.
        """
        error = redact_error(error, self.target)  # it is stored: no key path in it
        with self._lock:
            tasks = list(self._queue) + list(self._active.values())
            for rt in self._active.values():
                if rt.dir is None:
                    continue
                remember_orphan(
                    self.target,
                    dict(
                        op="reap",
                        key=rt.rid,
                        dir=rt.dir,
                        token=rt.token,
                        pid=rt.pid,
                        grace=rt.grace,
                    ),
                )
            self._queue.clear()
            self._kills.clear()
            done = []
            for rt in tasks:
                if rt.cancel_requested and rt.phase in (Phase.KILLING,):
                    state: TaskState = Cancelled(CancelOutcome.FAILED, started_at=rt.started_at)
                elif rt.cancel_requested:
                    state = Cancelled(CancelOutcome.DEQUEUED)
                else:
                    state = Failed(error, "", started_at=rt.started_at, ended_at=time.time())
                if self._finish_locked(rt, state):
                    done.append(rt)
        for rt in done:
            rt.wake_safely()

    # -- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while True:
                with self._lock:
                    busy = bool(self._queue or self._active)
                    if self._closed:
                        break
                if self._conn is None:
                    if busy:
                        self._connect_step()
                    else:
                        self._sleep(None)
                    continue
                try:
                    self._start_queued()
                    self._send_kills_and_cleanups()
                    self._heartbeat(busy)
                    self._sleep(PING_EVERY if busy else 30.0)
                    for event in self._conn.events():
                        self._last_heard = time.monotonic()
                        self._on_event(event)
                except (ConnectionLost, OSError, EOFError) as exc:
                    self._lost(exc)
                except Exception as exc:  # paramiko.SSHException and kin: the session broke
                    if self._conn is not None and self._conn.alive():
                        self._internal_error(exc)
                    else:
                        self._lost(exc)
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _internal_error(self, exc: BaseException) -> None:
        """A bug, not a network problem: fail the host's tasks rather than hang them."""
        logger.error("valent SSH executor thread for %s failed", self.target.where, exc_info=exc)
        t = self.target
        self._lost(exc)
        self._lost_since = None
        self._fail_all(
            SSHError(
                f"internal error in the SSH executor's thread for {t.where}: {exc!r} "
                "(please report it)",
                t.hostname,
                t.port,
            )
        )

    def _sleep(self, timeout: float | None) -> None:
        fds: list[Any] = [self._wake_r]
        if self._conn is not None:
            fds.append(self._conn.fileno())
        if timeout is None and self._lost_since is not None:
            timeout = max(0.0, self._next_attempt - time.monotonic())
        poller = select.poll()  # not select(): the user's process may hold 1024+ descriptors
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(None if timeout is None else timeout * 1000)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _connect_step(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            self._sleep(self._next_attempt - now)
            return
        conn = Connection(self.target, self._pinned)
        try:
            conn.open()
        except SSHUnreachableError as exc:
            if not self._ever_connected:
                self._fail_all(exc)
                return
            if self._lost_since is None:
                self._lost_since = now
            if now - self._lost_since > self.reconnect_timeout:
                t = self.target
                self._lost_since = None
                self._fail_all(
                    SSHUnreachableError(
                        f"lost the connection to {t.where} ({self._lost_cause!r}) and could not "
                        f"reconnect within reconnect_timeout={self.reconnect_timeout}s: {exc}. "
                        "Tasks started there may still be running; check the host and its "
                        "network, or raise reconnect_timeout.",
                        t.hostname,
                        t.port,
                    )
                )
                return
            self._attempts += 1
            self._next_attempt = now + min(2.0, 0.05 * 2**self._attempts)
            return
        except SSHError as exc:  # wrong key, host key, remote python: retrying will not help
            self._lost_since = None
            self._fail_all(exc)
            return
        self._conn = conn
        self._ever_connected = True
        self._lost_since = None
        self._attempts = 0
        self._last_heard = time.monotonic()
        with self._lock:
            readopt = [rt for rt in self._active.values()]
            self._kills = [rt for rt in readopt if rt.phase is Phase.KILLING]
        for rt in readopt:  # the agent adopts tasks started before the drop
            conn.send(op="start", key=rt.rid, dir=rt.dir, token=rt.token, pid=rt.pid)
        orphans = take_orphans(self.target)
        for cmd in orphans:
            conn.send(**cmd)

    def _lost(self, exc: BaseException) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._lost_cause = exc
        with self._lock:
            busy = bool(self._queue or self._active)
        if busy and self._lost_since is None:
            self._lost_since = time.monotonic()
            self._attempts = 0
            self._next_attempt = 0.0

    def _heartbeat(self, busy: bool) -> None:
        now = time.monotonic()
        if not busy:
            return
        if now - self._last_heard > SILENCE_LIMIT:
            raise ConnectionLost(f"no word from the remote agent for {SILENCE_LIMIT}s")
        if now - self._last_ping > PING_EVERY:
            self._last_ping = now
            self._conn.send(op="ping", n=int(now))

    def _start_queued(self) -> None:
        conn = self._conn
        started = []
        while True:
            with self._lock:
                if not self._queue or len(self._active) >= self.max_parallel:
                    break
                rt = self._queue.popleft()
                rt.phase = Phase.UPLOADING
                dropped = rt.cancel_requested and self._finish_locked(
                    rt, Cancelled(CancelOutcome.DEQUEUED)
                )  # dequeued while its upload was cut off by a dropped connection
            if dropped:
                rt.wake_safely()
                continue
            try:
                blob = pickle_task(rt.task)
            except PicklingError as exc:
                self._finish(
                    rt,
                    Cancelled(CancelOutcome.DEQUEUED) if rt.cancel_requested else Failed(exc, ""),
                )
                continue
            rt.dir = f"{conn.workdir}/{rt.rid}"
            try:
                conn.upload_task(rt.dir, blob)
            except Exception as exc:
                if not conn.alive():
                    with self._lock:
                        rt.phase = Phase.QUEUED
                        self._queue.appendleft(rt)
                    raise ConnectionLost(repr(exc)) from exc
                t = self.target
                self._finish(
                    rt,
                    Failed(
                        SSHError(
                            f"cannot write the task to {rt.dir} on {t.where}: {exc!r}; check "
                            "remote_workdir's permissions and free space",
                            t.hostname,
                            t.port,
                        ),
                        "",
                    ),
                )
                continue
            with self._lock:
                if rt.cancel_requested:
                    self._cleanup.append((rt.rid, rt.dir))
                    dequeued = self._finish_locked(rt, Cancelled(CancelOutcome.DEQUEUED))
                else:
                    rt.phase = Phase.STARTING
                    self._active[rt.rid] = rt
                    dequeued = False
                    started.append(rt)
            if dequeued:
                rt.wake_safely()
        for rt in started:
            conn.send(op="start", key=rt.rid, dir=rt.dir, token=rt.token)

    def _send_kills_and_cleanups(self) -> None:
        with self._lock:
            kills, self._kills = self._kills, []
            cleanups, self._cleanup = self._cleanup, []
        for i, rt in enumerate(kills):
            try:
                self._conn.send(op="kill", key=rt.rid, grace=rt.grace)
            except ConnectionLost:
                with self._lock:
                    self._kills.extend(kills[i:])
                raise
        for rid, d in cleanups:
            self._conn.send(op="clean", key=rid, dir=d)

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        with self._lock:
            rt = self._active.get(ev.get("key", ""))
        if rt is None:
            return
        if kind in ("started", "body"):
            # "started": the runner process exists (it can be killed); "body": the task's
            # function was called. Only then is the task Running (and a cancel ``killed``).
            with self._lock:
                if kind == "started":
                    rt.pid = ev.get("pid")
                    if rt.phase is Phase.STARTING:
                        rt.phase = Phase.RUNNING
                body = ev.get("t") if kind == "body" else ev.get("body")
                changed = False
                if body is not None and rt.started_at is None:
                    rt.started_at = float(body)
                    changed = not isinstance(rt.state, Running) and rt.phase is not Phase.DONE
                    if changed:
                        rt.state = Running(started_at=rt.started_at)
            if changed:
                rt.wake_safely()
            return
        fetch = self._conn.fetch  # a result too big to travel inline
        state = final_state(rt, ev, self.target, lambda: fetch(f"{rt.dir}/result"))
        if rt.dir:
            self._conn.send(op="clean", key=rt.rid, dir=rt.dir)
        self._finish(rt, state)
