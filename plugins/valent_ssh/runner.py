"""The remote side of the SSH executor, part 1: running one task (stdlib + cloudpickle).

Copied to the host over SFTP with ``agent.py`` and ``procs.py`` (valent is not installed
there); kept to Python 3.6 syntax (f-strings at most) so an older remote interpreter can
still start and report its version. The agent forks itself for each task (cloudpickle
already imported) and calls :func:`run_task` in the child, which unpickles ``task.pkl``,
calls the function and writes ``result`` atomically (tmp, fsync, rename): the value, or the
exception and its traceback. Its stdout/stderr are files in the task dir (set up by the
agent). ``valent.cancel_requested()`` answers from a SIGTERM flag here.
"""

import os
import pickle
import signal
import sys
import time
import traceback
import types

RESULT_VALUE = b"V"
RESULT_ERROR = b"E"

UNSTARTED_RC = 75
"""The runner's exit code when a SIGTERM came while it said its function starts, before it
called it: it took the start back (the body marker removed); the function never ran."""

_cancel = {"requested": False, "asked": False, "telling": False}


def cancel_requested():
    """True once the task was asked to stop (SIGTERM): the stand-in for valent's token."""
    _cancel["asked"] = True
    return _cancel["requested"]


def _on_sigterm(signum, frame):
    _cancel["requested"] = True
    if not _cancel["asked"] and not _cancel["telling"]:  # (telling: run_task takes it back)
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


def write_atomic(path, data, sync=True):
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


BODY_MARKER = "body"  # written just before the task's function is called: its start time
STOPPED_MARKER = "stopped"  # the function returned after SIGTERM asked it to stop


def body_started(taskdir):
    """When the task's function was called (the marker's time), or None if it never was."""
    try:
        with open(os.path.join(taskdir, BODY_MARKER)) as f:
            return float(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _mark_body(taskdir, body_fd):
    """Record that the body starts now: a marker file (read after a reconnect too) and a
    byte on the agent's pipe (so it says so at once)."""
    try:
        write_atomic(os.path.join(taskdir, BODY_MARKER), repr(time.time()).encode(), sync=False)
    except OSError:
        pass
    if body_fd is not None:
        try:
            os.write(body_fd, b"b")
            os.close(body_fd)
        except OSError:
            pass


def run_task(taskdir, body_fd=None):
    """Run the task in ``taskdir`` and write its result file; return the exit code.

    ``body_fd``: a pipe to the agent, told (and closed) when the task's function is called.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    with open(os.path.join(taskdir, "task.pkl"), "rb") as f:
        header = pickle.load(f)  # a plain dict: {"token_module": ..., "task": bytes}
    _install_valent_token(header.get("token_module", "valent.cancel_token"))
    import cloudpickle

    try:
        fn, args, kwargs = cloudpickle.loads(header["task"])
        if _cancel["requested"]:  # asked to stop while it was being loaded: never start it
            os._exit(128 + signal.SIGTERM)
        _cancel["telling"] = True  # a SIGTERM now only marks: the agent may have the start
        _mark_body(taskdir, body_fd)
        _cancel["telling"] = False  # (no signal handler runs between this line and the call)
        if _cancel["requested"]:  # it came while the start was told: take it back, never call
            try:
                os.unlink(os.path.join(taskdir, BODY_MARKER))
            except OSError:
                pass
            os._exit(UNSTARTED_RC)
        value = fn(*args, **kwargs)
        if _cancel["requested"]:  # it returned because it was asked to stop: say so
            write_atomic(os.path.join(taskdir, STOPPED_MARKER), b"", sync=False)
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
    write_atomic(os.path.join(taskdir, "result"), payload)
    return 0
