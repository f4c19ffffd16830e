"""``SSHExecutor``: run electrons on a remote host over SSH, and stop them for real."""

from __future__ import annotations

import time
import weakref
from typing import Annotated, Any, ClassVar

from valent.plugin import (
    MAX_SECONDS,
    CancelOutcome,
    Capabilities,
    ConfigError,
    Count,
    Executor,
    Ge,
    Le,
    PositiveSeconds,
    Seconds,
    Task,
    TaskState,
    Wake,
    require,
)

from .connection import Target
from .handle import Phase, RemoteTask
from .registry import close_idle, get_worker


class SSHExecutor(Executor):
    """Runs each task in a fresh Python process on ``hostname``, reached over SSH.

    The task is cloudpickled and copied over SFTP into a directory of its own under
    ``remote_workdir``; a small runner starts it detached in its own session, so it survives
    a dropped connection, and cancel kills its whole process group (SIGTERM, ``grace``
    seconds, SIGKILL). One connection per host is kept open and shared by every executor with
    the same settings; it is opened on first use, never here.

    :param hostname: the host to run on.
    :param username: the login name (default: the local user's).
    :param ssh_key_file: the private key to log in with (default: ssh-agent and ~/.ssh keys).
    :param port: the SSH port.
    :param python_path: the remote Python; same minor version as here, with cloudpickle.
    :param remote_workdir: where task directories go on the host (``~`` is the home dir).
    :param known_hosts: the known_hosts file the host key is checked against.
    :param accept_unknown_host_key: trust a host key seen for the first time (and append it
        to ``known_hosts``); a changed key is always an error.
    :param grace: seconds between SIGTERM and SIGKILL when a running task is cancelled.
    :param max_parallel: tasks running at once on this host; more wait, ``Pending``.
    :param connect_timeout: seconds allowed to connect and log in.
    :param reconnect_timeout: after a dropped connection, seconds to keep trying before the
        host's tasks fail as unreachable.
    """

    name: ClassVar[str] = "ssh"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0
    )
    poll_interval: ClassVar[float | None] = 5.0

    def __init__(
        self,
        hostname: str,
        username: str | None = None,
        ssh_key_file: str | None = None,
        port: Annotated[int, Ge(1), Le(65535)] = 22,
        python_path: str = "python3",
        remote_workdir: str = "~/.valent/work",
        known_hosts: str | None = "~/.ssh/known_hosts",
        accept_unknown_host_key: bool = False,
        grace: Seconds = 1.0,
        max_parallel: Count = 16,
        connect_timeout: PositiveSeconds = 10.0,
        reconnect_timeout: Seconds = 60.0,
    ) -> None:
        if not isinstance(hostname, str) or not hostname:
            raise ConfigError("SSHExecutor: hostname must be a non-empty string")
        require("SSHExecutor", "port", port, integer=True, ge=1, le=65535, error=ConfigError)
        for key, secs in (("grace", grace), ("reconnect_timeout", reconnect_timeout)):
            require("SSHExecutor", key, secs, ge=0, le=MAX_SECONDS, error=ConfigError)
        require(
            "SSHExecutor", "connect_timeout", connect_timeout, gt=0, le=MAX_SECONDS,
            error=ConfigError,
        )
        require("SSHExecutor", "max_parallel", max_parallel, integer=True, ge=1, error=ConfigError)
        self.hostname = hostname
        self.username = username
        self.ssh_key_file = ssh_key_file
        self.port = port
        self.python_path = python_path
        self.remote_workdir = remote_workdir
        self.known_hosts = known_hosts
        self.accept_unknown_host_key = accept_unknown_host_key
        self.grace = float(grace)
        self.max_parallel = max_parallel
        self.connect_timeout = float(connect_timeout)
        self.reconnect_timeout = float(reconnect_timeout)
        self._handles: weakref.WeakSet[RemoteTask] = weakref.WeakSet()

    @property
    def target(self) -> Target:
        """The connection settings (hashable: executors with equal ones share a connection)."""
        return Target(
            self.hostname,
            self.port,
            self.username,
            self.ssh_key_file,
            self.known_hosts,
            self.accept_unknown_host_key,
            self.python_path,
            self.remote_workdir,
            self.connect_timeout,
        )

    def run(self, task: Task, wake: Wake) -> RemoteTask:
        """Queue ``task`` for the host's thread (which connects on first use); never blocks."""
        worker = get_worker(self.target, self.max_parallel, self.reconnect_timeout)
        handle = RemoteTask(task, wake, self.grace, worker)
        self._handles.add(handle)
        worker.submit(handle)
        return handle

    def poll(self, handle: RemoteTask) -> TaskState:
        """The task's state as the host's thread last saw it (no network traffic)."""
        return handle.state

    def cancel(self, handle: RemoteTask) -> CancelOutcome:
        """``DEQUEUED`` if its function has not been called (queued, or its runner still
        loading it: it is stopped before it starts); ``KILLED`` (confirmed later by poll) if
        running;
        ``TOO_LATE`` if finished. If the host stays unreachable, poll ends with
        ``Cancelled(FAILED)``."""
        return handle.host.cancel(handle)

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel this executor's unfinished tasks and wait (bounded) for the stops."""
        live = [h for h in list(self._handles) if h.phase is not Phase.DONE]
        for h in live:
            h.host.cancel(h)
        deadline = time.monotonic() + (timeout if timeout is not None else self.grace + 5.0)
        for h in live:
            h.done.wait(max(0.0, deadline - time.monotonic()))
        close_idle()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_handles", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = weakref.WeakSet()

    def __repr__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"SSHExecutor({user}{self.hostname}:{self.port})"
