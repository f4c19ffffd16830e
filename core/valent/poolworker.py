"""The child side of :mod:`valent.procpool`: one warm worker process, one task at a time.

Started as ``python -m valent.poolworker SOCK_FD LIFELINE_FD OUT_PATH ERR_PATH`` in its own
session, so the task and every subprocess it starts share the worker's process group.
On Linux it is also a child subreaper: a daemon a task starts (double fork, ``setsid``)
becomes the worker's child instead of init's, so the kill of a cancelled task finds it in
the worker's process tree. Imports only the standard library and cloudpickle before the
first task arrives.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback

HEADER = struct.Struct("!QQ")  # length of the pickled message, length of the blob + 1 (0: none)
SMALL = 1 << 16
MAX_CAPTURE = 1 << 20

_cooperative = False
_cancelled = False
_in_task = False


PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``prctl``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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


def _on_sigterm(signum, frame):  # noqa: ARG001
    """A task that never asked ``cancel_requested()`` ends at once; one that did gets the grace."""
    global _cancelled
    _cancelled = True
    if _in_task and not _cooperative:
        os._exit(128 + signal.SIGTERM)


def _watch_lifeline(fd: int) -> None:
    """When the pool's process dies (its end of the pipe closes), take the whole group down."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(137)


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


def send_msg(sock: socket.socket, msg: object, blob: bytes | None = None) -> None:
    """Send a small picklable message and, optionally, a blob of raw bytes beside it."""
    meta = pickle.dumps(msg, protocol=5)
    blob_len = 0 if blob is None else len(blob) + 1
    head = HEADER.pack(len(meta), blob_len)
    if blob is None:
        sock.sendall(head + meta)
    elif len(blob) <= SMALL:
        sock.sendall(head + meta + blob)
    else:  # large: no concatenated copy
        sock.sendall(head + meta)
        sock.sendall(blob)


class _Capture:
    """Send fds 1 and 2 to files for the length of one task."""

    def __init__(self, out_path: str, err_path: str):
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.files = [os.open(p, flags, 0o600) for p in (out_path, err_path)]
        self.saved = [os.dup(1), os.dup(2)]

    def start(self) -> None:
        for fd, target in zip(self.files, (1, 2), strict=True):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # else the next task writes after a hole of NULs
            os.dup2(fd, target)

    def stop(self) -> tuple[str, str]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for saved, target in zip(self.saved, (1, 2), strict=True):
            os.dup2(saved, target)
        return tuple(_read_capture(fd) for fd in self.files)  # type: ignore[return-value]


def _read_capture(fd: int) -> str:
    size = os.fstat(fd).st_size
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
    global _cooperative, _in_task
    sock_fd, life_fd = int(argv[0]), int(argv[1])
    out_path, err_path = argv[2], argv[3]
    threading.Thread(target=_watch_lifeline, args=(life_fd,), daemon=True).start()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    subreaper = _become_subreaper()
    import faulthandler

    faulthandler.enable()
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
    fns: dict[int, object] = {}
    send_msg(sock, ("ready",))
    while True:
        got = recv_msg(sock)
        if got is None:
            return
        (job_id, fn_key, fn_blob, forget), args_blob = got
        for k in forget:
            fns.pop(k, None)
        _cooperative = False
        started = time.time()
        capture.start()
        try:
            if fn_blob is not None:
                fns[fn_key] = cloudpickle.loads(fn_blob)
            fn = fns[fn_key]
            args, kwargs = cloudpickle.loads(args_blob)
            _in_task = True
            if _cancelled and not _cooperative:
                os._exit(128 + signal.SIGTERM)  # the cancel arrived before the task began
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
        out, err = capture.stop()
        if subreaper:
            _reap_orphans()
        if ok:
            try:
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
        if ok:
            send_msg(sock, (job_id, ok, None, started, ended, out, err, stopped_by_cancel), payload)
        else:
            send_msg(sock, (job_id, ok, payload, started, ended, out, err, stopped_by_cancel))


if __name__ == "__main__":
    main(sys.argv[1:])
