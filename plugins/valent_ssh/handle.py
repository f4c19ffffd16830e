"""The handle of one remote task, and how the agent's last word about it becomes a state."""

from __future__ import annotations

import base64
import enum
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from valent.plugin import Cancelled, CancelOutcome, Failed, Pending, Task, TaskState, Wake

from .errors import RemoteTaskLostError
from .payload import result_state
from .runner import RESULT_VALUE, UNSTARTED_RC

if TYPE_CHECKING:
    from .connection import Target
    from .host import HostWorker

logger = logging.getLogger("valent.ssh")


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting for a slot (or a connection)
    UPLOADING = "uploading"  # the host thread is sending it
    STARTING = "starting"  # the agent was told to start it
    RUNNING = "running"  # the agent started it (pid known)
    KILLING = "killing"  # a kill was sent; waiting for the group to be gone
    DONE = "done"


class RemoteTask:
    """The handle ``SSHExecutor.run`` returns: one task on one host."""

    def __init__(self, task: Task, wake: Wake, grace: float, host: HostWorker):
        self.task = task
        self.wake = wake
        self.grace = grace
        self.host = host
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task.key)[:60]
        self.rid = f"{safe}-{secrets.token_hex(5)}"
        self.token = secrets.token_hex(12)
        self.phase = Phase.QUEUED
        self.state: TaskState = Pending()
        self.cancel_requested = False
        self.promised: CancelOutcome | None = None
        self.dir: str | None = None
        self.pid: int | None = None
        self.started_at: float | None = None
        self.done = threading.Event()

    def wake_safely(self) -> None:
        """Call ``wake``; a failing callback must not stop the host's thread."""
        try:
            self.wake()
        except Exception:
            logger.exception("wake() of %r raised", self)

    def __repr__(self) -> str:
        return f"<RemoteTask {self.task.label} on {self.host.target.where} {self.phase.value}>"


def _completed(ev: dict[str, Any]) -> bool:
    """The task returned a value on its own, before a cancel reached it (not an error, and
    not a cooperative return after SIGTERM asked it to stop)."""
    if ev.get("stopped"):
        return False
    if "big" in ev:
        return ev.get("kind", "").encode("latin-1") == RESULT_VALUE
    try:
        return base64.b64decode(ev.get("result", ""))[:1] == RESULT_VALUE
    except ValueError:
        return False


def final_state(
    rt: RemoteTask, ev: dict[str, Any], t: Target, fetch_result: Callable[[], bytes]
) -> TaskState:
    """The final state of ``rt`` from the agent's ``exit``, ``gone`` or ``start_failed``."""
    out, err = ev.get("stdout", ""), ev.get("stderr", "")
    now = time.time()
    if rt.started_at is None and ev.get("body") is not None:
        rt.started_at = float(ev["body"])  # when the task's function was called
    if ev.get("rc") == UNSTARTED_RC and ev.get("body") is None:
        rt.started_at = None  # the runner took its start back: the function was never called
    if ev.get("ev") == "start_failed":
        error = RemoteTaskLostError(f"{ev.get('error')} on {t.where}", t.hostname, t.port)
        state: TaskState = Failed(error, "", ended_at=now)
    elif rt.cancel_requested and rt.started_at is None:
        # stopped before its function was called (while loading): it never started
        state = Cancelled(CancelOutcome.DEQUEUED, ended_at=now, stdout=out, stderr=err)
    elif rt.cancel_requested and not _completed(ev):
        # "gone" (the group is confirmed dead), or an "exit" that beat the kill
        state = Cancelled(
            CancelOutcome.KILLED, started_at=rt.started_at, ended_at=now, stdout=out, stderr=err
        )
    elif "result" in ev or "big" in ev:
        # a task that returned before the kill reached it completed: its output is kept
        if "result" in ev:
            payload = base64.b64decode(ev["result"])
        else:
            payload = fetch_result()
        state = result_state(payload, rt.started_at, now, out, err)
    else:
        rc = ev.get("rc")
        how = (
            "it was gone when the connection came back"
            if rc is None
            else (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        )
        error = RemoteTaskLostError(
            f"the remote runner of task {rt.task.label} on {t.where} ended ({how}) without "
            "writing a result: it was killed from outside, or ran out of memory",
            t.hostname,
            t.port,
        )
        state = Failed(error, err, started_at=rt.started_at, ended_at=now, stdout=out, stderr=err)
    return state
