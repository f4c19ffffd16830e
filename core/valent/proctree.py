"""Process-group and process-tree facts and kills, with zombies counted as dead."""

from __future__ import annotations

import os
import signal

import psutil


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[2])


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is ``pgid``."""
    if os.path.isdir("/proc/self"):
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            fields = _stat_fields(int(name))
            if fields and fields[1] == pgid and fields[0] not in ("Z", "X"):
                out.append(int(name))
        return out
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def snapshot_tree(pid: int) -> list[tuple[int, float]]:
    """(pid, create_time) of every live descendant of ``pid``; empty if it is gone."""
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
