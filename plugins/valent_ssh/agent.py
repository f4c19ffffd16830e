"""The remote side of the SSH executor, part 3: the agent (stdlib; cloudpickle for tasks).

``python agent.py agent`` runs one per SSH connection. It reads JSON commands on stdin
(start, kill, clean, reap, ping), starts each task as a forked child in its own session
(``setsid``, all three standard streams redirected: it survives the connection), records
its pid and start time, watches it (SIGCHLD for its own children, ``/proc`` for tasks
adopted after a reconnect), kills a task's process group on request (SIGTERM, grace,
SIGKILL; zombies count as dead), and writes JSON events on stdout (hello, started, exit,
gone, pong). It exits at end of stdin; the tasks live on. Against pid reuse it signals a
group only while its leader is still the runner it started (pid and start time) or a live
member carries the task's token (an environment variable that everything the task starts
inherits). ``python agent.py run TASKDIR`` runs one task dir by hand.

On the host the three files sit side by side as ``valent_ssh_{agent,runner,procs}.py``.
"""

import base64
import io
import json
import os
import select
import shutil
import signal
import sys
import time
import traceback

try:  # imported as part of the valent_ssh package (on the client, in tests)
    from . import procs, runner
except ImportError:  # run as a script on the SSH host
    import valent_ssh_procs as procs
    import valent_ssh_runner as runner

INLINE_MAX = 2 << 20  # results up to this size travel inline; larger ones are fetched by SFTP


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
        self.body_fd = None  # the runner writes a byte here when the task's function starts


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
            t = self.tasks.pop(cmd.get("key"), None)
            if t is not None and t.body_fd is not None:
                os.close(t.body_fd)
            shutil.rmtree(cmd["dir"], ignore_errors=True)
        elif op == "reap":
            self.reap(cmd["key"], cmd["dir"], cmd["token"], cmd.get("pid"), cmd.get("grace", 1.0))
        elif op == "ping":
            self.emit(ev="pong", n=cmd.get("n"))

    def reap(self, key, taskdir, token, pid, grace):
        """A task the host gave up on (unreachable for too long): kill it, then remove it."""
        fpid, started = procs.read_pidfile(taskdir)
        pid = pid or fpid
        if not procs.is_runner(pid, started, token):
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
        fpid, started = procs.read_pidfile(taskdir)
        pid = pid or fpid
        if pid is not None or os.path.exists(os.path.join(taskdir, "result")):
            t.pid, t.started = pid, started
            if not procs.is_runner(pid, started, token):
                t.exited = True  # finished (or lost) while nobody was watching
            self.tasks[key] = t
            self.emit(ev="started", key=key, pid=pid, adopted=True,
                      body=runner.body_started(taskdir))
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
        t.started = procs.starttime(t.pid)
        pid_line = f"{t.pid} {t.started or ''}".encode()
        runner.write_atomic(os.path.join(taskdir, "pid"), pid_line, sync=False)
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
        body_r, body_w = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:
                os.close(body_r)
                for other in self.tasks.values():  # other tasks' pipes are not this one's
                    if other.body_fd is not None:
                        os.close(other.body_fd)
                self._child(t, null, out, err, body_w)  # never returns
        except BaseException:
            os.close(body_r)
            raise
        finally:
            for fd in (null, out, err, body_w):
                os.close(fd)
        os.set_blocking(body_r, False)
        t.body_fd = body_r
        return pid

    def _child(self, t, null, out, err, body_w=None):
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
            os.environ[procs.TOKEN_ENV] = t.token  # inherited by everything the task starts
            os.environ["PYTHONUNBUFFERED"] = "1"
            os.chdir(os.path.expanduser("~"))
            sys.argv = [self.runner, "run", t.dir]
            code = runner.run_task(t.dir, body_w)
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
        group, escaped = procs.members(t.pid, t.token)
        ours = (
            (t.child and not t.exited)  # our unreaped child: its pid cannot be reused
            or procs.is_runner(t.pid, t.started, t.token)
            or any(procs.has_token(p, t.token) for p in group)
        )
        if group and ours:
            try:
                os.killpg(t.pid, signal.SIGTERM)
            except OSError:
                pass
        procs.signal_all(escaped, signal.SIGTERM)

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
                t.rc = None if status is None else procs.exit_code(status)
                t.exited = True
        elif not procs.is_runner(t.pid, t.started, t.token):
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
            group, escaped = procs.members(t.pid, t.token) if t.pid is not None else ([], [])
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
                procs.signal_all(escaped, signal.SIGKILL)
        self.check_leftovers(now)

    def check_leftovers(self, now):
        """Processes a finished task left in its group: SIGTERM, then SIGKILL a second later."""
        keep = []
        for item in self.leftovers:
            pgid, token, since = item
            group, _ = procs.members(pgid, token)
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

    def read_body(self, t):
        """The runner said its task's function starts (or closed the pipe: it ended)."""
        try:
            data = os.read(t.body_fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        os.close(t.body_fd)
        t.body_fd = None
        if data:
            self.emit(ev="body", key=t.key, t=runner.body_started(t.dir) or time.time())

    def report(self, t, ev):
        if t.body_fd is not None:
            self.read_body(t)  # say "body" before how it ended
        event = {"ev": ev, "key": t.key, "rc": t.rc, "body": runner.body_started(t.dir),
                 "stopped": os.path.exists(os.path.join(t.dir, runner.STOPPED_MARKER))}
        path = os.path.join(t.dir, "result")
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        if size is not None:  # also for "gone": a task that returned before the kill
            if size <= INLINE_MAX:
                with open(path, "rb") as f:
                    event["result"] = base64.b64encode(f.read()).decode()
            else:
                event["big"] = size
                with open(path, "rb") as f:
                    event["kind"] = f.read(1).decode("latin-1")
        event["stdout"] = procs.tail(os.path.join(t.dir, "stdout"))
        event["stderr"] = procs.tail(os.path.join(t.dir, "stderr"))
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
            bodies = {t.body_fd: t for t in self.tasks.values() if t.body_fd is not None}
            try:
                ready, _, _ = select.select([0, self.wake_r, *bodies], [], [], timeout)
            except InterruptedError:
                ready = []
            for fd in ready:
                if fd in bodies:
                    self.read_body(bodies[fd])
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
        return runner.run_task(argv[2])
    sys.stderr.write("usage: agent.py agent | agent.py run TASKDIR\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
