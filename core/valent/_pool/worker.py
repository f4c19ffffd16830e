"""The child side of :mod:`valent._pool.pool`: one warm worker process, one task at a time.

Started by the pool's own thread as ``python -P -m valent._pool.worker SOCK_FD OWNER_PID OUT_PATH
ERR_PATH`` in its own session (``-P``: nothing from the current directory is importable at
start, so a ``valent/`` planted there cannot run), so the task and every subprocess it starts
share the worker's process group. On Linux it is also a child subreaper: a daemon a task starts
(double fork, ``setsid``) becomes the worker's child instead of init's, so while the worker
lives, everything its tasks started is in its process tree.

That is why the worker never dies before its tree when it is stopped. On a cancel, a
single-threaded worker waits until it has no child left (each one reaped: its tree is empty)
and exits, in the one wake-up the SIGTERM gives it (see :func:`_end_with_tree`); any other
stops itself (SIGSTOP) instead of exiting. On its owner's death the kernel stops it
(``PR_SET_PDEATHSIG`` = SIGSTOP, see :func:`_stop_with_owner`). The pool (or the pool's
watcher, :mod:`valent._pool.watch`) kills the tree under a frozen worker until it is empty,
and the worker last.

Messages to the pool: ``("ready",)`` once up; ``("started", job_id, time)`` right before a
task's body is called (a task that never got there is reported dequeued, not killed); then
the result tuple. ``("skipped", job_id)``: a job the pool asked back (``("skip", job_id)``)
before its body started, or a chained job whose upstream did not complete here; its body never
runs. ``("need", job_id)``: a chained job whose upstream value this worker no longer holds
(the pool sends it again with the value). ``("unstarted", job_id)``: the cancel's SIGTERM came
while ``started`` was being sent; the body was not called, and the worker ends.

The pool may send several jobs ahead (batches of quick jobs when its queue is deep, and a
chained job right after its upstream): they run in order; before each, whatever else the pool
sent is read, so a skip that arrives before a job's body starts is honoured. A job's result
waits for the next job's ``started`` and goes with it, in one send (it never waits past the
worker's next wait for work, nor past a body's start, nor past a stop by a cancel). A chained
job's arguments hold :class:`Up` markers; ``ups[i]`` says where value ``i`` comes from:
``("j", job_id)``, the result of an earlier job of this worker, or ``("v", payload)``, a value
the pool sends.
Imports only the standard library and cloudpickle before the first task.
"""

from __future__ import annotations

import _signal
import collections
import os
import pickle
import signal
import socket
import struct
import sys
import time
import traceback

HEADER = struct.Struct("!QQ")  # length of the pickled message, length of the blob + 1 (0: none)
SMALL = 1 << 16
MAX_CAPTURE = 1 << 20
KEEP_RESULTS = 8  # results of recent jobs kept for chained jobs sent later


class Up:
    """Marks, in a chained job's pickled arguments, where upstream value ``i`` goes."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __reduce__(self) -> tuple:
        return (Up, (self.i,))

    def __repr__(self) -> str:
        return f"Up({self.i})"

_cooperative = False
_cancelled = False
_in_task = False
_ending = False
_telling = False  # the pool is being told "started" and the body is not called yet
_subreaper = False


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> bool:
    """Linux ``prctl(option, arg)``; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stop_with_owner(owner: int) -> None:
    """Have the kernel freeze this worker when the pool's thread (its parent) dies.

    Noticed by the kernel, so it works whatever the task does (a task holding the GIL, a
    fork of the owner that keeps pipes open). SIGSTOP, not SIGKILL: a frozen worker stays
    alive as the subreaper of everything its task started, so the pool's watcher
    (:mod:`valent._pool.watch`, which holds a pidfd of the owner) finds the whole tree under it
    and kills it, worker last. A dead worker would hand its daemons to init instead.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGSTOP)
    if os.getppid() != owner:  # the owner died before the line above: nothing to keep
        os._exit(0)


def _stop_self() -> None:
    """Stopped by a cancel: freeze, still the subreaper of the task's tree, for the pool to
    kill that tree and then this process (it never resumes; if it does, it exits)."""
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(128 + signal.SIGTERM)


def _end_with_tree() -> None:
    """Stopped by a cancel, the task not cooperative: end this worker in this one wake-up
    when that cannot lose a process, else freeze it for the pool (:func:`_stop_self`).

    The pool sent SIGTERM to the worker's group and to the members of its tree outside it.
    A single-threaded subreaper is the parent of every process its task started that is
    not under another one it started: once it has no child left (``waitpid`` says so;
    this thread is the only one, so no fork can happen meanwhile), its tree is empty, and
    it exits. A child that does not end at SIGTERM keeps it waiting, as a frozen worker
    would: after the grace the pool freezes it, kills the tree, then kills it."""
    if not _subreaper or _threads() != 1:
        _stop_self()
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    os._exit(128 + signal.SIGTERM)


def _end_before_the_body(outbox: _Outbox) -> None:
    """A cancel came before the body was called: send what waits (the results before it
    are the truth; an ``unstarted``), then end with the tree (it never runs)."""
    global _ending
    try:
        outbox.flush()
    except OSError:
        pass
    _ending = True
    _end_with_tree()


def _threads() -> int:
    """This process's thread count (0 where there is no /proc to say)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _reap_orphans() -> None:
    """Between tasks: collect adopted descendants that exited (they would stay zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _token() -> bool:
    global _cooperative, _in_task
    _cooperative = True
    return _cancelled


def _orphaned() -> None:
    """The pool's end of the socket closed: its process died (the kernel may not have frozen
    this worker yet). Take everything this worker's tasks started down, then exit."""
    from valent._pool.watch import kill_below

    kill_below([os.getpid()])


def _on_nudge(signum, frame):
    """SIGURG from the pool: nothing to do. Its arrival interrupts a blocking call, so that a
    SIGTERM that came just before the call began is handled now, not when the call returns."""


def _on_sigterm(signum, frame):
    """A task that never asked ``cancel_requested()`` stops at once; one that did gets the
    grace. Between tasks it only marks the cancel (the next body then never starts), and so
    while the pool is told a body starts: the worker then takes the start back
    (``unstarted``) instead of calling the body."""
    global _cancelled, _ending
    _cancelled = True
    if _in_task and not _cooperative and not _ending and not _telling:
        _ending = True  # once: a second SIGTERM while it waits must not start over
        _end_with_tree()


class _OwnState:
    """The worker's own ``sys.stdin/stdout/stderr``, signal handlers, working directory and
    umask, put back after every task: one task must not damage the worker for the next (a
    task that closes or replaces ``sys.stdout``, installs a SIGTERM handler, changes dir)."""

    def __init__(self) -> None:
        self.streams = [sys.stdin, sys.stdout, sys.stderr]
        self.cwd = os.getcwd()
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        # _signal's own getsignal: signal.getsignal wraps its answer in an enum (slow)
        self.handlers = {s: _signal.getsignal(s)
                         for s in (signal.SIGTERM, signal.SIGINT, signal.SIGURG)}

    def restore(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for i, (name, fd, mode) in enumerate((("stdin", 0, "r"), ("stdout", 1, "w"),
                                              ("stderr", 2, "w"))):
            own = self.streams[i]
            if own is None or own.closed:
                own = self.streams[i] = _reopen(fd, mode)
            if getattr(sys, name) is not own:
                setattr(sys, name, own)
        for sig, handler in self.handlers.items():
            if _signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        os.umask(self.umask)
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError:
            os.chdir(self.cwd)


def _reopen(fd: int, mode: str):
    """A fresh text stream on ``fd`` (which the worker keeps open: closing ``sys.stdout``
    does not close fd 1), line buffered like an interpreter's own stdio."""
    return open(fd, mode, buffering=1 if mode == "w" else -1, encoding="utf-8",
                errors="backslashreplace", closefd=False)


def recv_msg(sock: socket.socket) -> tuple[object, bytes | bytearray | None] | None:
    """One message and its blob (None when the message carried none); None at EOF."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    meta_len, blob_len = HEADER.unpack(head)
    meta = _recv_exact(sock, meta_len)
    if meta is None:
        return None
    blob = None
    if blob_len:
        blob = _recv_exact(sock, blob_len - 1)
        if blob is None:
            return None
    return pickle.loads(meta), blob


def _recv_exact(sock: socket.socket, n: int) -> bytes | bytearray | None:
    """Exactly ``n`` bytes (None at EOF); a short read (e.g. cut by a signal) just continues."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return bytes(buf) if n <= SMALL else buf  # large: returned without a copy


def pack_msg(msg: object, blob: bytes | None = None) -> bytes:
    """The header and pickled message (without the blob, which follows it on the wire)."""
    meta = pickle.dumps(msg, protocol=5)
    return HEADER.pack(len(meta), 0 if blob is None else len(blob) + 1) + meta


def send_msg(sock: socket.socket, msg: object, blob: bytes | None = None) -> None:
    """Send a small picklable message and, optionally, a blob of raw bytes beside it."""
    head = pack_msg(msg, blob)
    if blob is None:
        sock.sendall(head)
    elif len(blob) <= SMALL:
        sock.sendall(head + blob)
    else:  # large: no concatenated copy
        sock.sendall(head)
        sock.sendall(blob)


class _Outbox:
    """Messages to the pool, sent together: a result waits for the next job's ``started``
    (one send, one wake-up of the pool, per task), but never past the worker's next wait
    and never past a body's start (``started`` is sent before the body is called)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def add(self, msg: object, blob: bytes | None = None) -> None:
        self.buf += pack_msg(msg, blob)
        if blob is not None:
            self.buf += blob

    def flush(self) -> None:
        if self.buf:
            data, self.buf = self.buf, bytearray()
            self.sock.sendall(data)


class _Inbox:
    """The pool's messages, read ahead: jobs in order, and the ids the pool asked back."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.jobs: collections.deque = collections.deque()  # (message, args blob), oldest first
        self.skips: set[int] = set()
        self.eof = False

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= HEADER.size:
            meta_len, blob_len = HEADER.unpack_from(buf)
            start = HEADER.size + meta_len
            end = start + max(blob_len - 1, 0)
            if len(buf) < end:
                return
            msg = pickle.loads(buf[HEADER.size:start])
            blob = bytes(buf[start:end]) if blob_len else None
            del buf[:end]
            if msg[0] == "skip":
                self.skips.add(msg[1])
            else:
                self.jobs.append((msg, blob))

    def poll(self) -> None:
        """Read whatever the pool sent already, without waiting."""
        while not self.eof:
            try:
                data = self.sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self.buf += data
        self._parse()

    def next(self, before_wait=None):
        """The next job (waiting for one, after calling ``before_wait``); None at EOF."""
        if not self.jobs:
            self.poll()
        if not self.jobs and before_wait is not None:
            before_wait()
        while not self.jobs and not self.eof:
            try:
                data = self.sock.recv(1 << 18)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            self.buf += data
            self._parse()
        if not self.jobs:
            return None
        self.poll()  # and what came with it (a skip of this very job)
        return self.jobs.popleft()

    def wanted(self) -> set[int]:
        """Ids of earlier jobs whose results queued chained jobs take."""
        return {u[1] for (msg, _) in self.jobs for u in msg[4] if u[0] == "j"}


def _substitute(args: tuple, kwargs: dict, values: list) -> tuple[tuple, dict]:
    """Put the upstream values where the :class:`Up` markers are."""
    # this file runs as __main__: the markers unpickled are valent._pool.worker's class
    from valent._pool.worker import Up as up

    args = tuple(values[a.i] if isinstance(a, up) else a for a in args)
    kwargs = {k: values[v.i] if isinstance(v, up) else v for k, v in kwargs.items()}
    return args, kwargs


class _Capture:
    """Send fds 1 and 2 to files for the length of one task. Between tasks that follow one
    another (the next already received) they are not put back (``release`` does that before
    the worker waits); a file is emptied before a task only if something was written to it."""

    def __init__(self, out_path: str, err_path: str):
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.files = [os.open(p, flags, 0o600) for p in (out_path, err_path)]
        self.saved = [os.dup(1), os.dup(2)]
        self.active = False  # fds 1 and 2 are on the files
        self.dirty = [True, True]  # may hold bytes

    def start(self) -> None:
        for i, fd in enumerate(self.files):
            if self.dirty[i]:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)  # else the next task writes after a hole of NULs
                self.dirty[i] = False
        # always (two cheap calls): the task before may have closed or replaced fd 1 or 2
        for fd, target in zip(self.files, (1, 2), strict=True):
            os.dup2(fd, target)
        self.active = True

    def stop(self) -> tuple[str, str]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        out = []
        for i, fd in enumerate(self.files):
            size = os.fstat(fd).st_size
            self.dirty[i] = size > 0
            out.append(_read_capture(fd, size))
        return out[0], out[1]

    def release(self) -> None:
        """Put fds 1 and 2 back (before the worker waits for work)."""
        if self.active:
            for saved, target in zip(self.saved, (1, 2), strict=True):
                os.dup2(saved, target)
            self.active = False
            self.dirty = [True, True]  # what the worker writes meanwhile is not a task's


def _read_capture(fd: int, size: int) -> str:
    if size == 0:
        return ""
    data = os.pread(fd, min(size, MAX_CAPTURE), max(0, size - MAX_CAPTURE))
    text = data.decode("utf-8", "replace")
    if size > MAX_CAPTURE:
        text = f"[... {size - MAX_CAPTURE} earlier bytes dropped ...]\n" + text
    return text


def _pack_error(exc: BaseException) -> tuple:
    import cloudpickle

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return (blob, f"{type(exc).__name__}: {exc}", tb)


def main(argv: list[str]) -> None:
    global _cooperative, _in_task, _subreaper, _ending, _telling
    sock_fd, owner = int(argv[0]), int(argv[1])
    out_path, err_path = argv[2], argv[3]
    _stop_with_owner(owner)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGURG, _on_nudge)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    subreaper = _subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    import faulthandler

    faulthandler.enable()
    os.set_inheritable(sock_fd, False)  # a task's exec'd children must not hold the pool's line
    sock = socket.socket(fileno=sock_fd)
    got = recv_msg(sock)
    if got is None:
        return
    init, _ = got
    sys.path[:] = init["sys_path"]
    import cloudpickle

    try:
        from valent import cancel_token as _cancel_mod

        _cancel_mod.set_process_token(_token)
    except Exception:
        pass
    capture = _Capture(out_path, err_path)
    own = _OwnState()
    fns: dict[int, object] = {}
    inbox = _Inbox(sock)
    outbox = _Outbox(sock)
    results: dict[int, bytes | None] = {}  # job id -> its pickled value (None: not ok)
    plain = (int, float, str, bytes, bool, type(None))

    def before_wait() -> None:  # nothing more to run now: send what waits, fds back
        capture.release()
        outbox.flush()

    send_msg(sock, ("ready",))
    while True:
        try:
            got = inbox.next(before_wait)
        except OSError:
            return _orphaned()
        if got is None:
            return _orphaned()
        (job_id, fn_key, fn_blob, forget, ups), args_blob = got
        for k in forget:
            fns.pop(k, None)
        if fn_blob is not None:
            fns[fn_key] = fn_blob  # unpickled when a job first calls it
        payloads: list = []
        reply = None
        if job_id in inbox.skips:
            inbox.skips.discard(job_id)
            reply = ("skipped", job_id)
        for kind, ref in ups:
            if kind == "v":
                payloads.append(ref)
            elif ref not in results:
                reply = reply or ("need", job_id)  # an evicted result: the pool resends
            elif results[ref] is None:
                reply = reply or ("skipped", job_id)  # its upstream did not complete here
            else:
                payloads.append(results[ref])
        if reply is not None:
            outbox.add(reply)
            continue
        _cooperative = False
        started = time.time()
        if outbox.buf and (isinstance(fns.get(fn_key), bytes) or len(args_blob or b"")
                           + sum(len(p) for p in payloads) > SMALL):
            try:  # what comes next may take a while (imports, big values): results first
                outbox.flush()
            except OSError:
                return _orphaned()
        capture.start()
        try:
            fn = fns[fn_key]
            if isinstance(fn, bytes):
                fn = fns[fn_key] = cloudpickle.loads(fn)
            args, kwargs = cloudpickle.loads(args_blob)
            if ups:
                args, kwargs = _substitute(args, kwargs, [cloudpickle.loads(p) for p in payloads])
            _in_task = True
            if _cancelled:  # the cancel arrived before the body began: it never runs
                _end_before_the_body(outbox)
            started = time.time()
            # sent (with the previous result) before the body runs: a task whose body
            # started is never reported as dequeued
            outbox.add(("started", job_id, started))
            _telling = True  # a SIGTERM now only marks the cancel: the pool may have the start
            try:
                outbox.flush()
            except OSError:
                return _orphaned()
            _telling = False  # (no signal handler runs between these two lines and the call)
            if _cancelled:  # it came while the pool was told: the body is never called
                outbox.add(("unstarted", job_id))
                _end_before_the_body(outbox)
            try:
                value = fn(*args, **kwargs)
            finally:
                _in_task = False
            ok = True
        except BaseException as exc:  # noqa: BLE001 - a task's SystemExit is its error too
            ok, value = False, exc
        # whether the cancel reached the task while it ran; a SIGTERM from now on only
        # marks it (the result is delivered and reported as finished before the cancel)
        stopped_by_cancel = _cancelled
        ended = time.time()
        own.restore()
        out, err = capture.stop()
        if subreaper:
            _reap_orphans()
        if ok:
            try:
                if type(value) in plain:
                    payload = pickle.dumps(value, protocol=5)  # what cloudpickle writes, faster
                else:
                    payload = cloudpickle.dumps(value, protocol=5)
            except BaseException as exc:  # noqa: BLE001
                ok = False
                msg_text = (
                    f"the return value ({type(value).__name__}) cannot be pickled, so it "
                    f"cannot leave the worker: {exc}. Return plain data (numbers, strings, "
                    "lists, dicts, arrays) or write it to a file and return the path."
                )
                payload = (None, msg_text, "".join(traceback.format_exception(exc)))
        else:
            payload = _pack_error(value)
        results[job_id] = payload if ok else None
        if len(results) > KEEP_RESULTS:
            inbox.poll()
            wanted = inbox.wanted()
            for k in [k for k in results if k not in wanted][: len(results) - KEEP_RESULTS]:
                del results[k]
        try:
            if ok:
                outbox.add((job_id, ok, None, started, ended, out, err, stopped_by_cancel),
                           payload)
            else:
                outbox.add((job_id, ok, payload, started, ended, out, err, stopped_by_cancel))
            if len(outbox.buf) > SMALL or _cancelled:
                outbox.flush()  # a big value, or a cancel pending: no reason to hold it
        except OSError:
            return _orphaned()


if __name__ == "__main__":
    main(sys.argv[1:])
