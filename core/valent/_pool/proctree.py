"""Process-group and process-tree facts and kills, with zombies counted as dead."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psutil

GONE = frozenset(("Z", "X"))
"""Process states (/proc/PID/stat) that count as dead: zombie, and dead but not yet gone."""


def _stat_fields(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgrp, ppid, start time in clock ticks) of ``pid`` from /proc, or None if it is
    gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 1024)
    except OSError:
        return None
    finally:
        os.close(fd)
    rest = data[data.rindex(b")") + 2 :].split(None, 20)
    return rest[0].decode(), int(rest[2]), int(rest[1]), int(rest[19])


def _live_procs() -> Iterator[tuple[int, int, int]]:
    """(pid, pgrp, ppid) of every live (non-zombie) process: one pass over /proc, or psutil
    where there is no /proc."""
    if os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if name.isdigit():
                fields = _stat_fields(int(name))
                if fields and fields[0] not in GONE:
                    yield int(name), fields[1], fields[2]
        return
    for p in psutil.process_iter(["status", "ppid"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE:
                yield p.pid, os.getpgid(p.pid), p.info["ppid"]
        except (ProcessLookupError, psutil.Error):
            continue


_scan_cache: tuple[float, dict[int, list[int]]] | None = None
SCAN_MAX_AGE = 0.05


def _children_map() -> dict[int, list[int]]:
    """{ppid: [live child pids]} from one scan, reused for ``SCAN_MAX_AGE`` seconds
    (cancelling many tasks at once snapshots many trees: one scan serves them all)."""
    global _scan_cache
    import time

    now = time.monotonic()
    if _scan_cache is not None and now - _scan_cache[0] < SCAN_MAX_AGE:
        return _scan_cache[1]
    out: dict[int, list[int]] = {}
    for pid, _, ppid in _live_procs():
        out.setdefault(ppid, []).append(pid)
    _scan_cache = (now, out)
    return out


class Scan:
    """One fresh pass over the live (non-zombie) processes (Linux /proc): who is whose child,
    who is in which group, when each started. Used to kill a tree until a scan finds nothing
    left of it."""

    def __init__(self) -> None:
        self.kids: dict[int, list[int]] = {}
        self.groups: dict[int, list[int]] = {}
        self.start: dict[int, int] = {}  # pid -> start time (ticks): tells a reused pid apart
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            fields = _stat_fields(pid)
            if fields is None or fields[0] in GONE:
                continue
            self.kids.setdefault(fields[2], []).append(pid)
            self.groups.setdefault(fields[1], []).append(pid)
            self.start[pid] = fields[3]

    def alive(self, tree: dict[int, int]) -> dict[int, int]:
        """The members of an earlier ``tree`` ({pid: start}) that are the same processes
        and still alive."""
        return {p: t for p, t in tree.items() if self.start.get(p) == t}

    def tree(self, pid: int) -> dict[int, int]:
        """{pid: start} of the live descendants of ``pid`` and the members of its process
        group, ``pid`` itself left out."""
        out = {p: self.start[p] for p in self.descendants(pid)}
        out.update((p, self.start[p]) for p in self.groups.get(pid, ()))
        out.pop(pid, None)
        return out

    def descendants(self, pid: int) -> list[int]:
        """Every live descendant of ``pid``."""
        found, stack = [], list(self.kids.get(pid, ()))
        while stack:
            c = stack.pop()
            found.append(c)
            stack.extend(self.kids.get(c, ()))
        return found



def walk(pid: int) -> tuple[dict[int, tuple[int, int]], frozenset[int]] | None:
    """The live descendants of ``pid``, found from its children down (Linux
    ``/proc/PID/task/TID/children``): ``({pid: (start ticks, pgrp)}, zombie pids)``; None
    where the kernel does not list children (then use a :class:`Scan`).

    It reads only the tree, not every process of the machine. Each level is read at its own
    moment: a child that forks and exits between two reads hands its child to the subreaper
    above (read already), so an empty answer counts only if the zombies seen are the same as
    at the walk before (a new zombie means a process just exited: walk again)."""
    live: dict[int, tuple[int, int]] = {}
    zombies: set[int] = set()
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue  # gone
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                if os.path.isdir(f"/proc/{p}/task/{tid}"):
                    return None  # the thread is there, its list is not: not listed here
                continue  # that thread (or process) ended
            except OSError:
                continue
            for word in data.split():
                c = int(word)
                fields = _stat_fields(c)
                if fields is None:
                    continue
                if fields[0] in GONE:
                    zombies.add(c)
                    continue
                live[c] = (fields[3], fields[1])
                stack.append(c)
    return live, frozenset(zombies)


def group_empty(pgid: int) -> bool:
    """True when no process at all (not even a zombie) is in process group ``pgid``: the
    kernel answers (``killpg(pgid, 0)``), no scan of every process. False when one may be."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: a member of another user's
        return False
    return False


def still_alive(tree: dict[int, int]) -> dict[int, int]:
    """The members of ``tree`` ({pid: start ticks}) that are the same processes and alive."""
    out = {}
    for pid, start in tree.items():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] not in GONE and fields[3] == start:
            out[pid] = start
    return out


def state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie, ...), or
    None if it is gone (or there is no /proc)."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def signal_pids(pids, sig: int) -> None:
    """Send ``sig`` to each pid; one already gone is fine."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is ``pgid``."""
    return [pid for pid, group, _ in _live_procs() if group == pgid]


def live_groups() -> set[int]:
    """The process groups that have at least one live (non-zombie) member: one scan for all."""
    return {group for _, group, _ in _live_procs()}


def snapshot_tree(pid: int) -> list[tuple[int, float]]:
    """(pid, create_time) of every live descendant of ``pid``; empty if it is gone."""
    if os.path.isdir("/proc/self"):
        kids = _children_map()
        found, stack = [], list(kids.get(pid, ()))
        while stack:
            c = stack.pop()
            found.append(c)
            stack.extend(kids.get(c, ()))
        out = []
        for c in found:
            try:
                out.append((c, psutil.Process(c).create_time()))
            except psutil.Error:
                continue
        return out
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for c in children:
        try:
            out.append((c.pid, c.create_time()))
        except psutil.Error:
            continue
    return out


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _same(pid: int, created: float) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def signal_escapees(tree: list[tuple[int, float]], pgid: int, sig: int) -> None:
    """Signal processes of a snapshot that left group ``pgid`` (``setsid`` in a task)."""
    for pid, created in tree:
        p = _same(pid, created)
        if p is None:
            continue
        try:
            if os.getpgid(pid) != pgid:
                p.send_signal(sig)
        except (ProcessLookupError, psutil.Error):
            continue


def alive_escapees(tree: list[tuple[int, float]], pgid: int) -> list[int]:
    """PIDs of a snapshot still alive outside group ``pgid``."""
    out = []
    for pid, created in tree:
        if _same(pid, created) is None:
            continue
        try:
            if os.getpgid(pid) != pgid:
                out.append(pid)
        except ProcessLookupError:
            continue
    return out


def signal_name(returncode: int | None) -> str:
    """How a process ended, in words: ``exit code 3`` or ``signal SIGSEGV``."""
    if returncode is None:
        return "unknown cause"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
