"""The remote side of the SSH executor: copied to the host over SFTP and run there.

Self-contained on purpose: the standard library, plus cloudpickle to run a task; valent is
not installed on the remote host. Kept to Python 3.6 syntax (f-strings at most) so an older
remote interpreter can still start and report its version. Two modes:

``python runner.py agent``
    One per SSH connection. Reads JSON commands on stdin (start, kill, clean, reap, ping),
    starts each task as a forked child in its own session (``setsid``, all three standard
    streams redirected: it survives the connection), records its pid and start time, watches
    it (SIGCHLD for its own children, ``/proc`` for tasks adopted after a reconnect), kills a
    task's process group on request (SIGTERM, grace, SIGKILL; zombies count as dead), and
    writes JSON events on stdout (hello, started, exit, gone, pong). Exits at end of stdin.
    Against pid reuse it signals a group only while its leader is still the runner it
    started (pid and start time) or a live member carries the task's token (an environment
    variable that everything the task starts inherits).

``python runner.py run TASKDIR``
    Runs one task: unpickles ``task.pkl``, calls it, writes ``result`` atomically (tmp,
    fsync, rename). Its stdout/stderr go to files in TASKDIR (redirected by the agent).
    The agent does not exec this: it forks itself (cloudpickle already imported) and calls
    ``run_task`` in the child; the mode is kept for running a task dir by hand.
"""

import base64
import io
import json
import os
import pickle
import select
import shutil
import signal
import sys
import time
import traceback
import types

TOKEN_ENV = "VALENT_SSH_TOKEN"
INLINE_MAX = 2 << 20  # results up to this size travel inline; larger ones are fetched by SFTP
LOG_MAX = 1 << 20  # the tail of stdout/stderr that is sent back
RESULT_VALUE = b"V"
RESULT_ERROR = b"E"

# ---------------------------------------------------------------------------------------
# run mode
# ---------------------------------------------------------------------------------------

_cancel = {"requested": False, "asked": False}


def cancel_requested():
    """True once the task was asked to stop (SIGTERM): the stand-in for valent's token."""
    _cancel["asked"] = True
    return _cancel["requested"]


def _on_sigterm(signum, frame):
    _cancel["requested"] = True
    if not _cancel["asked"]:
        # The task never looks at the token: stop now rather than wait for SIGKILL.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(128 + signal.SIGTERM)


def _install_valent_token(module_name):
    """Make ``valent.cancel_requested()`` answer from this process's SIGTERM flag.

    ``module_name`` is where valent defines it (``valent.cancel_token``): a function the task
    imported from there is pickled as a reference to it.
    """
    try:
        import importlib

        importlib.import_module(module_name).set_process_token(cancel_requested)
        return  # valent happens to be installed on this host
    except Exception:
        pass
    pkg = types.ModuleType("valent")
    pkg.__path__ = []
    pkg.__doc__ = "Stand-in for valent on an SSH host: only cancel_requested()."
    pkg.cancel_requested = cancel_requested
    sys.modules["valent"] = pkg
    parent, _, child = module_name.rpartition(".")
    if parent == "valent" and child:
        sub = types.ModuleType(module_name)
        sub.cancel_requested = cancel_requested
        setattr(pkg, child, sub)
        sys.modules[module_name] = sub


def _write_atomic(path, data, sync=True):
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _error_payload(exc, tb):
    """(exception cloudpickled or None, traceback text, repr), pickled by the stdlib."""
    import cloudpickle

    try:
        blob = cloudpickle.dumps(exc)
    except Exception:
        blob = None
    return RESULT_ERROR + pickle.dumps((blob, tb, f"{type(exc).__name__}: {exc}"))


def run_task(taskdir):
    """Run the task in ``taskdir`` and write its result file; return the exit code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    with open(os.path.join(taskdir, "task.pkl"), "rb") as f:
        header = pickle.load(f)  # a plain dict: {"token_module": ..., "task": bytes}
    _install_valent_token(header.get("token_module", "valent.cancel_token"))
    import cloudpickle

    try:
        fn, args, kwargs = cloudpickle.loads(header["task"])
        value = fn(*args, **kwargs)
    except BaseException as exc:  # the task's own error, reported as the node's error
        payload = _error_payload(exc, traceback.format_exc())
    else:
        try:
            payload = RESULT_VALUE + cloudpickle.dumps(value)
        except Exception as exc:
            err = TypeError(f"the task's return value cannot be pickled: {exc!r}")
            payload = _error_payload(err, traceback.format_exc())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _write_atomic(os.path.join(taskdir, "result"), payload)
    return 0


# ---------------------------------------------------------------------------------------
# agent mode: process facts
# ---------------------------------------------------------------------------------------


def _stat(pid):
    """(state, pgrp) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[2])


def _alive(pid):
    """Is ``pid`` a live process (a zombie counts as dead)?"""
    if os.path.isdir("/proc/self"):
        st = _stat(pid)
        return st is not None and st[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _starttime(pid):
    """When ``pid`` started (clock ticks since boot), or None: with the pid, an identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def _read_pidfile(taskdir):
    """(pid, starttime) the agent recorded when it started the task, or (None, None)."""
    try:
        with open(os.path.join(taskdir, "pid")) as f:
            fields = f.read().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _is_runner(pid, started, token):
    """Is ``pid`` still the task's runner (not a recycled pid)?"""
    if pid is None or not _alive(pid):
        return False
    now = _starttime(pid)
    if started is not None and now is not None:
        return now == started
    return _has_token(pid, token)


def _exit_code(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _has_token(pid, token):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    return (TOKEN_ENV + "=" + token).encode() in env.split(b"\0")


def _members(pgid, token):
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
        st = _stat(pid)
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
        if _has_token(pid, token):
            escaped.append(pid)
    return group, escaped


def _signal(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _tail(path, limit=LOG_MAX):
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


# ---------------------------------------------------------------------------------------
# agent mode: the loop
# ---------------------------------------------------------------------------------------


class _Task:
    def __init__(self, key, taskdir, token):
        self.key = key
        self.dir = taskdir
        self.token = token
        self.pid = None
        self.started = None  # the runner's start time (/proc): guards against pid reuse
        self.child = False  # started by this agent (so it is reaped here)
        self.rc = None
        self.exited = False
        self.kill_at = None  # when SIGKILL is due; None: no kill requested
        self.killed = False
        self.reported = False
        self.reap = False  # remove it silently once gone


class Agent:
    def __init__(self, runner_path):
        self.runner = runner_path
        self.tasks = {}
        self.leftovers = []  # groups of finished tasks still holding processes: [pgid, token, t]
        self.buf = b""
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    def emit(self, **event):
        data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        while data:
            n = os.write(1, data)
            data = data[n:]

    def hello(self):
        try:
            import cloudpickle

            cp = cloudpickle.__version__
        except Exception:
            cp = None
        self.emit(
            ev="hello",
            python=list(sys.version_info[:3]),
            executable=sys.executable,
            cloudpickle=cp,
            pid=os.getpid(),
            cwd=os.getcwd(),
        )

    # -- commands ------------------------------------------------------------------------

    def handle(self, cmd):
        op = cmd.get("op")
        if op == "start":
            self.start(cmd["key"], cmd["dir"], cmd["token"], cmd.get("pid"))
        elif op == "kill":
            self.kill(cmd["key"], float(cmd.get("grace", 1.0)))
        elif op == "clean":
            self.tasks.pop(cmd.get("key"), None)
            shutil.rmtree(cmd["dir"], ignore_errors=True)
        elif op == "reap":
            self.reap(cmd["key"], cmd["dir"], cmd["token"], cmd.get("pid"), cmd.get("grace", 1.0))
        elif op == "ping":
            self.emit(ev="pong", n=cmd.get("n"))

    def reap(self, key, taskdir, token, pid, grace):
        """A task the host gave up on (unreachable for too long): kill it, then remove it."""
        fpid, started = _read_pidfile(taskdir)
        pid = pid or fpid
        if not _is_runner(pid, started, token):
            shutil.rmtree(taskdir, ignore_errors=True)
            return
        t = _Task(key, taskdir, token)
        t.pid, t.started, t.reap = pid, started, True
        self.tasks[key] = t
        self.kill(key, float(grace))

    def start(self, key, taskdir, token, pid=None):
        """Start the task, or adopt it if it was started before (a reconnect)."""
        if key in self.tasks:
            return
        t = _Task(key, taskdir, token)
        fpid, started = _read_pidfile(taskdir)
        pid = pid or fpid
        if pid is not None or os.path.exists(os.path.join(taskdir, "result")):
            t.pid, t.started = pid, started
            if not _is_runner(pid, started, token):
                t.exited = True  # finished (or lost) while nobody was watching
            self.tasks[key] = t
            self.emit(ev="started", key=key, pid=pid, adopted=True)
            return
        if not os.path.exists(os.path.join(taskdir, "task.pkl")):
            self.emit(ev="start_failed", key=key, error=f"task directory {taskdir} is missing")
            return
        try:
            t.pid = self.spawn(t)
        except OSError as exc:
            self.emit(ev="start_failed", key=key, error=f"cannot start the runner: {exc}")
            return
        t.child = True
        t.started = _starttime(t.pid)
        pid_line = f"{t.pid} {t.started or ''}".encode()
        _write_atomic(os.path.join(taskdir, "pid"), pid_line, sync=False)
        self.tasks[key] = t
        self.emit(ev="started", key=key, pid=t.pid, t=time.time())

    def spawn(self, t):
        """Fork a runner for ``t`` in its own session (setsid), streams to files; its pid.

        A fork of this small single-threaded agent, which has cloudpickle imported already:
        much cheaper than starting a new interpreter per task.
        """
        null = os.open(os.devnull, os.O_RDONLY)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(os.path.join(t.dir, "stdout"), flags, 0o600)
        err = os.open(os.path.join(t.dir, "stderr"), flags, 0o600)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(t, null, out, err)  # never returns
        finally:
            for fd in (null, out, err):
                os.close(fd)
        return pid

    def _child(self, t, null, out, err):
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            for fd in (null, out, err, self.wake_r, self.wake_w):
                os.close(fd)
            for fd, name in ((1, "stdout"), (2, "stderr")):  # unbuffered, like python -u
                raw = io.FileIO(fd, "w", closefd=False)
                stream = io.TextIOWrapper(
                    raw, encoding="utf-8", errors="backslashreplace", write_through=True
                )
                setattr(sys, name, stream)
            os.environ[TOKEN_ENV] = t.token  # inherited by everything the task starts
            os.environ["PYTHONUNBUFFERED"] = "1"
            os.chdir(os.path.expanduser("~"))
            sys.argv = [self.runner, "run", t.dir]
            code = run_task(t.dir)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)

    def kill(self, key, grace):
        t = self.tasks.get(key)
        if t is None or t.kill_at is not None:
            return
        t.kill_at = time.monotonic() + grace
        if t.pid is None:
            return
        self._reap(t)
        group, escaped = _members(t.pid, t.token)
        ours = (
            (t.child and not t.exited)  # our unreaped child: its pid cannot be reused
            or _is_runner(t.pid, t.started, t.token)
            or any(_has_token(p, t.token) for p in group)
        )
        if group and ours:
            try:
                os.killpg(t.pid, signal.SIGTERM)
            except OSError:
                pass
        _signal(escaped, signal.SIGTERM)

    # -- watching ------------------------------------------------------------------------

    def _reap(self, t):
        if t.exited or t.pid is None:
            return
        if t.child:
            try:
                pid, status = os.waitpid(t.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = t.pid, None
            if pid == t.pid:
                t.rc = None if status is None else _exit_code(status)
                t.exited = True
        elif not _is_runner(t.pid, t.started, t.token):
            t.exited = True

    def check(self):
        """Report tasks that ended or whose kill is confirmed; push kills along."""
        now = time.monotonic()
        for key in list(self.tasks):
            t = self.tasks[key]
            if t.reported:
                continue
            self._reap(t)
            if t.kill_at is None:
                if t.exited:
                    t.reported = True
                    self.report(t, "exit")
                    if t.pid is not None:
                        self.leftovers.append([t.pid, t.token, None])
                continue
            group, escaped = _members(t.pid, t.token) if t.pid is not None else ([], [])
            if not group and not escaped:
                t.reported = True
                if t.reap:
                    self.tasks.pop(key, None)
                    shutil.rmtree(t.dir, ignore_errors=True)
                else:
                    self.report(t, "gone")
            elif now >= t.kill_at and (not t.killed or now >= t.kill_at + 1.0):
                t.killed = True
                t.kill_at = max(t.kill_at, now - 0.5)  # re-send SIGKILL every second
                try:
                    os.killpg(t.pid, signal.SIGKILL)
                except OSError:
                    pass
                _signal(escaped, signal.SIGKILL)
        self.check_leftovers(now)

    def check_leftovers(self, now):
        """Processes a finished task left in its group: SIGTERM, then SIGKILL a second later."""
        keep = []
        for item in self.leftovers:
            pgid, token, since = item
            group, _ = _members(pgid, token)
            if not group:
                continue
            if since is None:
                item[2] = now
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except OSError:
                    pass
            elif now - since > 1.0:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
            keep.append(item)
        self.leftovers = keep

    def report(self, t, ev):
        event = {"ev": ev, "key": t.key, "rc": t.rc}
        path = os.path.join(t.dir, "result")
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        if size is not None and ev == "exit":
            if size <= INLINE_MAX:
                with open(path, "rb") as f:
                    event["result"] = base64.b64encode(f.read()).decode()
            else:
                event["big"] = size
        event["stdout"] = _tail(os.path.join(t.dir, "stdout"))
        event["stderr"] = _tail(os.path.join(t.dir, "stderr"))
        self.emit(**event)

    def timeout(self):
        """How long to wait for input: short while a kill or an adopted task needs watching."""
        timeout = 0.01 if self.leftovers else 1.0
        for t in self.tasks.values():
            if t.reported:
                continue
            if t.kill_at is not None:
                return 0.01
            if not t.child:
                timeout = min(timeout, 0.05)
        return timeout

    def loop(self):
        self.hello()
        while True:
            timeout = self.timeout()
            try:
                ready, _, _ = select.select([0, self.wake_r], [], [], timeout)
            except InterruptedError:
                ready = []
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except OSError:
                    pass
            if 0 in ready:
                data = os.read(0, 1 << 16)
                if not data:
                    return  # the connection is gone; the tasks live on
                self.buf += data
                while b"\n" in self.buf:
                    line, self.buf = self.buf.split(b"\n", 1)
                    if line.strip():
                        self.handle(json.loads(line.decode()))
            self.check()


def main(argv):
    if len(argv) >= 2 and argv[1] == "agent":
        Agent(os.path.abspath(argv[0])).loop()
        return 0
    if len(argv) >= 3 and argv[1] == "run":
        return run_task(argv[2])
    sys.stderr.write("usage: runner.py agent | runner.py run TASKDIR\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
