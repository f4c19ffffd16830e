"""The remote side of the SSH executor, part 2: process facts on the host (stdlib only).

Liveness treats zombies as dead; a task's runner is identified by pid and start time (so a
recycled pid is never taken for it), anything it started by the ``VALENT_SSH_TOKEN`` in its
environment. Reads ``/proc`` (Linux) and falls back to signals elsewhere.
"""

import os

TOKEN_ENV = "VALENT_SSH_TOKEN"
LOG_MAX = 1 << 20  # the tail of stdout/stderr that is sent back


def stat(pid):
    """(state, pgrp) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[2])


def alive(pid):
    """Is ``pid`` a live process (a zombie counts as dead)?"""
    if os.path.isdir("/proc/self"):
        st = stat(pid)
        return st is not None and st[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def starttime(pid):
    """When ``pid`` started (clock ticks since boot), or None: with the pid, an identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def read_pidfile(taskdir):
    """(pid, starttime) the agent recorded when it started the task, or (None, None)."""
    try:
        with open(os.path.join(taskdir, "pid")) as f:
            fields = f.read().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def is_runner(pid, started, token):
    """Is ``pid`` still the task's runner (not a recycled pid)?"""
    if pid is None or not alive(pid):
        return False
    now = starttime(pid)
    if started is not None and now is not None:
        return now == started
    return has_token(pid, token)


def exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def has_token(pid, token):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    return (TOKEN_ENV + "=" + token).encode() in env.split(b"\0")


def members(pgid, token):
    """(live members of group ``pgid``, live processes elsewhere carrying ``token``)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return [pgid], []
        except OSError:
            return [], []
    group, escaped = [], []
    me = os.getuid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        if st[1] == pgid:
            group.append(pid)
            continue
        try:
            if os.stat("/proc/" + name).st_uid != me:
                continue
        except OSError:
            continue
        if has_token(pid, token):
            escaped.append(pid)
    return group, escaped


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def tail(path, limit=LOG_MAX):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if size > limit:
        text = f"[... {size - limit} earlier bytes not shown]\n" + text
    return text
