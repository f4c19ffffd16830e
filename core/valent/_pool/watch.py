"""The pool's watcher: when the pool's owning process dies, kill every worker and its tree.

One per :class:`valent._pool.pool.ProcessPool`, started by the pool as
``python -P /path/to/watch.py OWNER_PID [POOL_DIR]`` in its own session, before the pool makes
its folder of capture files (POOL_DIR, or the ``dir`` line: removed once the workers are
dead). Standard library only (run by path: nothing from valent or the current directory is
imported). The pool writes one line per change on its stdin: ``dir PATH`` (its folder, made
just now), ``+ PID`` (a worker started), ``- PID`` (a worker is gone), ``exit`` (the pool shut
down).

Why a watcher: the owner's death must be noticed by the kernel, whatever its tasks do. The
watcher holds a pidfd of the owner (fallback: polls ``getppid()``), not a pipe a fork of the
owner could keep open, and runs no user code, so it always gets to run. The workers freeze
themselves at the same moment (``PR_SET_PDEATHSIG`` = SIGSTOP in :mod:`valent._pool.worker`): a
frozen worker is still the subreaper of everything its task started, including ``setsid``
daemons, so the watcher finds the whole tree under it, kills it until a scan finds nothing,
and kills the worker last.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, start time in ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19])


def _live() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, pgrp)} of every live (non-zombie) process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] not in ("Z", "X"):
                out[int(name)] = (st[1], st[2])
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_below(roots: list[int]) -> None:
    """SIGKILL every descendant of ``roots`` and every other member of their process groups
    until two scans in a row find none (a root that is alive keeps the orphans of its tree:
    the workers are subreapers)."""
    empty = 0
    deadline = time.monotonic() + 30
    while empty < 2 and time.monotonic() < deadline:
        live = _live()
        kids: dict[int, list[int]] = {}
        for p, (ppid, _) in live.items():
            kids.setdefault(ppid, []).append(p)
        doomed = set()
        for root in roots:
            stack = list(kids.get(root, ()))
            while stack:
                c = stack.pop()
                doomed.add(c)
                stack.extend(kids.get(c, ()))
            doomed.update(p for p, (_, grp) in live.items() if grp == root)
        doomed.difference_update(roots)
        for p in doomed:
            _kill(p, signal.SIGKILL)
        empty = 0 if doomed else empty + 1
        if doomed:
            time.sleep(0.002)


def kill_trees(workers: dict[int, int]) -> None:
    """Freeze each worker (pid -> start time), kill everything under it, then the worker."""
    mine = [p for p, start in workers.items() if (_stat(p) or ("", 0, 0, -1))[3] == start]
    for pid in mine:
        _kill(pid, signal.SIGSTOP)
    kill_below(mine)
    for pid in mine:
        _kill(pid, signal.SIGKILL)


class _News:
    """What the pool wrote on stdin: its live workers (pid -> start time), or that it ended."""

    def __init__(self) -> None:
        self.workers: dict[int, int] = {}
        self.pool_dir: str | None = None
        self.pool_exited = False
        self.buf = b""

    def read(self) -> bool:
        """Read what is there and apply it; False at end of file or when nothing is left
        to read (non-blocking)."""
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return False
        if not data:
            return False
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            op, _, arg = line.decode().partition(" ")
            if op == "+":
                st = _stat(int(arg))
                if st is not None:
                    self.workers[int(arg)] = st[3]
            elif op == "-":
                self.workers.pop(int(arg), None)
            elif op == "dir":  # the workers' output folder: removed if the owner dies
                self.pool_dir = arg
            elif op == "exit":
                self.pool_exited = True
        return True


def main(argv: list[str]) -> None:
    owner = int(argv[0])
    pool_dir = argv[1] if len(argv) > 1 else None
    # it must outlive its owner to do its work: a signal sent to the owner's group or children
    # (Ctrl-C, `pkill -P OWNER`, a service manager stopping everything) must not end it first
    # and leave the workers frozen; the pool ends it with "exit", or SIGKILL
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pidfd = None
    try:
        pidfd = os.pidfd_open(owner)
    except (AttributeError, OSError):
        pass
    news = _News()
    poller = select.poll()
    poller.register(0, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    owner_dead = os.getppid() != owner
    while not owner_dead:
        events = poller.poll(None if pidfd is not None else 100)
        if pidfd is None and os.getppid() != owner:
            owner_dead = True
        for fd, _ in events:
            if fd == pidfd:
                owner_dead = True
            elif not news.read():  # the pool's end closed without "exit": it died
                owner_dead = True
        if news.pool_exited:
            return
    # The owner is dead, but what it wrote may still wait in the pipe: under load this
    # process can start after its owner already died, and would otherwise kill nothing.
    # Read the rest without blocking (a fork of the owner may hold the pipe open).
    os.set_blocking(0, False)
    while news.read():
        pass
    if news.pool_exited:
        return
    workers = news.workers
    kill_trees(workers)
    pool_dir = news.pool_dir or pool_dir
    if pool_dir:  # the owner cannot clean up after itself any more
        import shutil

        shutil.rmtree(pool_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
