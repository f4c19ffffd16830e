"""The Dask cluster valent owns: a scheduler and a worker program, started as their own programs.

``python -m distributed.cli.dask_scheduler`` and ``python -m distributed.cli.dask_worker``
(what the ``dask scheduler`` / ``dask worker`` commands run) on 127.0.0.1, never a
``LocalCluster`` of spawned processes: a spawned process re-imports the user's ``__main__``,
which re-runs a script written without ``if __name__ == "__main__":``. Nothing here imports
the user's script, so a plain script works, and there is no ``multiprocessing`` state of ours
in the user's process to clean up at exit.

Every program of the cluster is in one process group, led by a tiny watcher (stdlib only,
no user code, no Dask) that waits on the owner's pidfd: when the owner dies (``kill -9``,
SIGTERM without atexit, a crash), the watcher ends the group, so nothing outlives the owner.
``close()`` ends the programs by PID (SIGTERM, then SIGKILL for the group after a grace).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from valent import ExecutorError

HOST = "127.0.0.1"
STOP_GRACE = 3.0
"""Seconds the scheduler and worker programs get to close on SIGTERM before SIGKILL."""

_WATCHER = r"""
import os, select, shutil, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
owner, grace, folder = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
try:
    fd = os.pidfd_open(owner)
except OSError:
    fd = None
if fd is not None:
    select.select([fd], [], [])
else:
    while os.getppid() == owner:
        time.sleep(0.2)
group = os.getpgrp()
try:
    os.killpg(group, signal.SIGTERM)
    time.sleep(grace)
    os.chdir("/")
    shutil.rmtree(folder, ignore_errors=True)  # the dead owner cannot remove it
finally:
    os.killpg(group, signal.SIGKILL)
"""
"""The watcher: leads the cluster's process group; ends the group when the owner dies."""


class ClusterStartError(ExecutorError):
    """The Dask cluster valent starts could not start (its programs' log says why)."""


def _child_pythonpath() -> str:
    """PYTHONPATH for the cluster's programs: valent's own directories first (so a module in
    some user directory cannot shadow it), then the owner's import path minus the current
    directory and the interpreter's own directories (the workers import what the owner can,
    as spawned workers did)."""
    import valent

    import valent_dask

    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out: list[str] = []
    for d in (
        str(Path(valent.__file__).resolve().parent.parent),
        str(Path(valent_dask.__file__).resolve().parent.parent),
        *(p for p in sys.path if p),
    ):
        real = os.path.realpath(d)
        if real in out or not os.path.isdir(real):
            continue
        if any(real == p or real.startswith(p + os.sep) for p in prefixes):
            continue
        out.append(real)
    return os.pathsep.join(out)


class ClusterPrograms:
    """A scheduler and ``n_workers`` worker processes on 127.0.0.1, owned by this process.

    The programs start at construction (without waiting: the caller imports Dask meanwhile);
    :meth:`wait_for_address` and :meth:`wait_for_workers` wait for them, and raise
    :class:`ClusterStartError` (with the programs' last log lines) if they cannot start.
    """

    def __init__(self, n_workers: int, threads_per_worker: int):
        self.owner = os.getpid()
        self.n_workers = n_workers
        self.dir = tempfile.mkdtemp(prefix="valent-dask-")
        self.log_path = os.path.join(self.dir, "cluster.log")
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.workers: subprocess.Popen | None = None
        self._closed = False
        py = sys.executable
        self.watcher = subprocess.Popen(
            [py, "-I", "-S", "-c", _WATCHER, str(self.owner), str(STOP_GRACE), self.dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            process_group=0, cwd=self.dir,
        )
        self.pgid = self.watcher.pid
        try:
            self._start(py, n_workers, threads_per_worker)
        except BaseException:
            self.close()
            raise

    def _start(self, py: str, n_workers: int, threads: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _child_pythonpath()
        self._sched_file = sched_file = os.path.join(self.dir, "scheduler.json")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the children, closed below
        try:
            common = {"stdin": subprocess.DEVNULL, "stderr": log, "env": env,
                      "process_group": self.pgid}
            self.scheduler = subprocess.Popen(
                [py, "-P", "-m", "distributed.cli.dask_scheduler", "--host", HOST,
                 "--port", "0", "--no-dashboard", "--dashboard-address", f"{HOST}:0",
                 "--scheduler-file", sched_file],
                stdout=log, cwd=self.dir, **common,
            )
            # the workers start at the same time and wait for the scheduler file; they keep
            # this process's working directory (tasks open relative paths) and stdout (a
            # finish-mode task's print shows as it did with a LocalCluster)
            self.workers = subprocess.Popen(
                [py, "-P", "-m", "distributed.cli.dask_worker", "--scheduler-file", sched_file,
                 "--nworkers", str(n_workers), "--nthreads", str(threads), "--host", HOST,
                 "--no-dashboard", "--local-directory", os.path.join(self.dir, "work")],
                **common,
            )
        finally:
            log.close()

    def wait_for_address(self, timeout: float) -> str:
        """The scheduler's address, once it wrote it; ClusterStartError if it cannot start."""
        deadline = time.monotonic() + timeout
        while not self.address:
            self._check_alive()
            try:
                self.address = json.loads(Path(self._sched_file).read_text())["address"]
            except (OSError, ValueError, KeyError):
                self._check_time(deadline, timeout, "the scheduler to write its address")
                time.sleep(0.02)
        return self.address

    def wait_for_workers(self, client: object, timeout: float) -> None:
        """Return once every worker joined; raise ClusterStartError if a program died."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                client.wait_for_workers(self.n_workers, timeout=0.25)  # type: ignore[attr-defined]
                return
            except TimeoutError:
                self._check_time(deadline, timeout, f"{self.n_workers} worker(s) to join")

    def _check_alive(self) -> None:
        for name, p in (("scheduler", self.scheduler), ("worker", self.workers)):
            if p is not None and p.poll() is not None:
                raise ClusterStartError(
                    f"the Dask {name} program valent started exited with code {p.returncode} "
                    f"before the cluster was up. Its log:\n{self.log_tail()}\nCheck that "
                    f"`{sys.executable} -m distributed.cli.dask_{name} --help` runs here, or "
                    "pass scheduler_address= to use a cluster you started yourself."
                )

    def _check_time(self, deadline: float, timeout: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"the Dask cluster valent started did not come up: waited {timeout:g} s for "
                f"{what} (raise connect_timeout on a slow machine). Its log:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the scheduler and worker programs wrote."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"

    def pids(self) -> list[int]:
        """PIDs of the watcher, the scheduler and the worker program (not the worker
        processes the worker program starts: ask the workers for those)."""
        return [p.pid for p in (self.watcher, self.scheduler, self.workers) if p is not None]

    def close(self, timeout: float = STOP_GRACE) -> None:
        """End every program of the cluster: SIGTERM by PID, SIGKILL to the group after
        ``timeout``; reap them. Idempotent; does nothing in a forked child of the owner."""
        if self._closed or os.getpid() != self.owner:
            return
        self._closed = True
        progs = [p for p in (self.workers, self.scheduler) if p is not None]
        deadline = time.monotonic() + timeout
        # the workers first (with their scheduler still there they close in ~0.2 s; without
        # it a nanny waits 8 s for its worker), then the scheduler
        for p in progs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)  # the watcher, and whatever else is left
        except (ProcessLookupError, PermissionError):
            pass
        for p in (self.watcher, *progs):
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
