"""What crosses the wire: the pickled task going out, the result file coming back."""

from __future__ import annotations

import functools
import os
import pickle
import sys
import sysconfig
import threading
import types
from typing import Any

from valent.plugin import Completed, Failed, PicklingError, Task, TaskState, cancel_requested, dumps

from .runner import RESULT_ERROR, RESULT_VALUE

_lock = threading.Lock()


class RemoteTaskError(Exception):
    """Stands in for a remote task's exception that cannot be unpickled here."""


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def _is_user_module(mod: types.ModuleType | None) -> bool:
    """Is ``mod`` the user's own code (so the remote host cannot import it)?"""
    if mod is None or mod.__name__ in ("__main__", "builtins"):
        return False
    top = mod.__name__.split(".")[0]
    if top == "valent" or top.startswith("valent_"):
        return False
    path = getattr(mod, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    return not path.startswith(_installed_roots()) and "site-packages" not in path


def _modules_of(task: Task) -> set[types.ModuleType]:
    """Top-level packages of the user's own code the task refers to, to pickle by value."""
    objs: list[Any] = [task.fn, *task.args, *task.kwargs.values()]
    names = {getattr(o, "__module__", None) for o in objs}
    names |= {type(o).__module__ for o in objs}
    out = set()
    for name in names:
        if not isinstance(name, str):
            continue
        mod = sys.modules.get(name)
        if _is_user_module(mod):
            top = sys.modules.get(name.split(".")[0]) or mod
            out.add(top if _is_user_module(top) else mod)
    return out


def pickle_task(task: Task) -> bytes:
    """cloudpickle ``(fn, args, kwargs)``; the user's own modules travel by value.

    Raises ``valent.PicklingError`` naming the task when something cannot be pickled.
    """
    import cloudpickle

    with _lock:
        registered = set(cloudpickle.list_registry_pickle_by_value())
        added = []
        for mod in _modules_of(task):
            if mod.__name__ not in registered:
                cloudpickle.register_pickle_by_value(mod)
                added.append(mod)
        try:
            blob = dumps((task.fn, task.args, task.kwargs))  # file names kept
        except Exception as exc:
            raise PicklingError(
                f"task {task.label} cannot be pickled for the SSH host: {exc}; pass values "
                "that can be pickled (no open files, locks, sockets or connections)"
            ) from exc
        finally:
            for mod in added:
                cloudpickle.unregister_pickle_by_value(mod)
    # The runner reads this header with the stdlib's pickle before cloudpickle loads the task.
    token_module = cancel_requested.__module__
    return pickle.dumps({"token_module": token_module, "task": blob}, protocol=4)


def result_state(
    payload: bytes, started_at: float | None, ended_at: float, stdout: str, stderr: str
) -> TaskState:
    """Turn a runner's result file into a ``Completed`` or ``Failed`` state."""
    kind, body = payload[:1], payload[1:]
    times = dict(started_at=started_at, ended_at=ended_at, stdout=stdout, stderr=stderr)
    if kind == RESULT_VALUE:
        return Completed(pickled=body, **times)
    if kind != RESULT_ERROR:
        return Failed(RemoteTaskError("the remote result file is corrupt"), "", **times)
    exc_blob, tb, text = pickle.loads(body)
    error: BaseException | str = text
    if exc_blob is not None:
        try:
            import cloudpickle

            error = cloudpickle.loads(exc_blob)
        except Exception as exc:
            error = RemoteTaskError(f"{text} (the exception cannot be unpickled here: {exc!r})")
    elif text:
        error = RemoteTaskError(text)
    return Failed(error, tb, **times)
