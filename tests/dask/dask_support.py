"""Helpers of the Dask executor tests: process checks and a dispatcher-like driver."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psutil
import valent
from valent.testing.procs import alive, live_descendants, wait_until  # noqa: F401


def descendants() -> dict[int, psutil.Process]:
    """Live (non-zombie) descendants of this process, by PID."""
    return {p.pid: p for p in live_descendants()}


def is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in p.cmdline())
    except psutil.Error:
        return True


def cluster_pids(client) -> set[int]:
    """PIDs of the Dask workers and of the warm pools inside them."""
    from valent_dask.worker_side import pool_pids

    pids = set(client.run(os.getpid).values())
    for got in client.run(pool_pids).values():
        pids.update(got)
    return pids


def local_pool_pids() -> set[int]:
    """PIDs of the warm pool of the dispatcher's shared "local" executor (not ours to check)."""
    from valent import api

    if api._dispatcher is None:
        return set()
    ex = api._dispatcher.named_executor("local")
    if ex is None or getattr(ex, "_pool", None) is None:
        return set()
    return set(ex.pool.own_pids())


def new_processes(before: set[int]) -> list[psutil.Process]:
    """Live descendants of this process not in ``before``, leaving out the warm pool of the
    dispatcher's shared "local" executor (another test's, shut down at the end of the
    session; it may have replaced a worker meanwhile) and multiprocessing's resource
    tracker."""
    own = local_pool_pids()
    return [p for pid, p in descendants().items()
            if pid not in before and pid not in own and not is_resource_tracker(p)]


class Runner:
    """Drives one executor the way the dispatcher does: run, wake, poll, cancel."""

    def __init__(self, executor: valent.Executor):
        self.executor = executor
        self.dispatch_id = uuid.uuid4().hex[:12]
        self._n = 0

    def start(self, fn, *args, **kwargs) -> tuple[object, threading.Event]:
        self._n += 1
        task = valent.Task(
            dispatch_id=self.dispatch_id, node_id=self._n, name=fn.__name__, fn=fn,
            args=args, kwargs=kwargs,
        )
        woke = threading.Event()
        handle = self.executor.run(task, woke.set)
        return handle, woke

    def wait(self, handle, woke: threading.Event, timeout: float = 30.0) -> valent.TaskState:
        """Poll on every wake until the state is final."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.executor.poll(handle)
            if state.final:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"task not final after {timeout} s: {state!r}")
            woke.wait(min(left, 1.0))
            woke.clear()

    def call(self, fn, *args, timeout: float = 30.0, **kwargs) -> valent.TaskState:
        h, w = self.start(fn, *args, **kwargs)
        return self.wait(h, w, timeout)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment holds ``VALENT_TEST_TAG=tag`` (children inherit it,
    so this finds what a test's subprocess left behind, orphans included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("VALENT_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM these PIDs (ours), SIGKILL what is left after ``grace``; they are then gone."""
    import signal

    from valent.testing.procs import wait_gone

    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in wait_gone(pids, grace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not wait_gone(pids, 10), f"could not end {pids}"


class DaskPrograms:
    """A cluster valent does not own: ``dask scheduler`` and ``dask worker`` started as
    separate programs (the test's processes, not its client's), as a user runs them.

    Each worker is its own ``dask worker --nthreads 1`` program (with its nanny). Ended by
    PID with :meth:`stop`.
    """

    def __init__(
        self,
        workdir: str,
        n_workers: int = 2,
        env: dict | None = None,
        host: str = "127.0.0.1",
        worker_host: str = "127.0.0.1",
        worker_prefix: tuple[str, ...] = (),
    ):
        import subprocess

        self.workdir = workdir
        self.host, self.worker_host, self.worker_prefix = host, worker_host, worker_prefix
        self.port = free_port()
        self.address = f"tcp://{host}:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.log = open(os.path.join(workdir, "dask-programs.log"), "ab")  # noqa: SIM115
        self._subprocess = subprocess
        self.scheduler = self.start_scheduler()
        self.workers = [self.start_worker() for _ in range(n_workers)]
        self.wait_for_workers(n_workers)

    def _popen(self, *args: str, prefix: tuple[str, ...] = ()):
        import sys

        return self._subprocess.Popen(
            [*prefix, sys.executable, "-m", "dask", *args], stdin=self._subprocess.DEVNULL,
            stdout=self.log, stderr=self.log, env=self.env, cwd=self.workdir,
        )

    def start_scheduler(self):
        """``dask scheduler`` on this cluster's port (again, after a restart)."""
        self.scheduler = self._popen(
            "scheduler", "--host", self.host, "--port", str(self.port), "--no-dashboard"
        )
        return self.scheduler

    def start_worker(self):
        return self._popen(
            "worker", self.address, "--nthreads", "1", "--host", self.worker_host,
            "--no-dashboard", "--local-directory", self.workdir, prefix=self.worker_prefix,
        )

    @property
    def scheduler_address(self) -> str:
        return self.address

    def client(self, timeout: float = 60.0):
        import distributed

        return distributed.Client(self.address, set_as_default=False, timeout=timeout)

    def wait_for_workers(self, n: int, timeout: float = 90.0) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (the nannies' children) serving now."""
        with self.client() as c:
            return sorted(c.run(os.getpid).values())

    def all_pids(self) -> list[int]:
        """Every program we started, and every live descendant of them."""
        pids = []
        for p in [self.scheduler, *self.workers]:
            pids.append(p.pid)
            try:
                pids += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        """End every program and its descendants by PID; reap them."""
        pids = self.all_pids()
        end_pids(pids)
        for p in [self.scheduler, *self.workers]:
            p.wait(10)
        self.log.close()


class NetnsHost:
    """A simulated second host: a network namespace joined to this one by a veth pair, on a
    private /24 of its own (see /work/shared/MULTIHOST_RIG.md). ``host_ip`` is this side,
    ``ip`` the namespace's; ``prefix`` runs a command inside it. Removed by :meth:`close`."""

    def __init__(self) -> None:
        import random
        import shutil
        import subprocess

        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise PermissionError("ip netns needs root and iproute2")
        self._run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=30)
        used = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
        while True:
            net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
            if f" {net}." not in used:
                break
        tag = uuid.uuid4().hex[:6]
        self.name, self.link = f"vd{tag}", f"vd{tag}h"
        self.host_ip, self.ip = f"{net}.1", f"{net}.2"
        self.prefix = ("ip", "netns", "exec", self.name)
        self._made: list[str] = []
        try:
            self._run("ip", "netns", "add", self.name)
            self._made.append("ns")
            self._run("ip", "link", "add", self.link, "type", "veth", "peer", "name", f"vd{tag}n")
            self._made.append("link")
            self._run("ip", "link", "set", f"vd{tag}n", "netns", self.name)
            self._run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.link)
            self._run("ip", "link", "set", self.link, "up")
            self._run(*self.prefix, "ip", "addr", "add", f"{self.ip}/24", "dev", f"vd{tag}n")
            self._run(*self.prefix, "ip", "link", "set", f"vd{tag}n", "up")
            self._run(*self.prefix, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        import subprocess

        if "link" in self._made:
            subprocess.run(["ip", "link", "del", self.link], capture_output=True, timeout=30)
        if "ns" in self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        self._made = []
