"""The user-facing calls: ``dispatch``, ``dispatch_sync``, ``get_result``, ``cancel``."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import DispatchTimeoutError, ValentError
from .graph import Electron, Graph, Lattice
from .result import Result
from .status import FINAL_VALUES

_lock = threading.Lock()
_dispatcher = None


def get_dispatcher():
    """This process's dispatcher, started on first use (no work at import time)."""
    global _dispatcher
    if _dispatcher is None:
        with _lock:
            if _dispatcher is None:
                from ._engine.dispatcher import Dispatcher
                from ._plugins.manager import get_plugins
                from ._store import get_store
                from .lifecycle import at_exit, install_signal_handlers

                _dispatcher = Dispatcher(get_store(), get_plugins())
                install_signal_handlers()
                global _exit_registered
                if not _exit_registered:
                    _exit_registered = True
                    atexit.register(at_exit)
    return _dispatcher


_exit_registered = False


def _reset_after_fork() -> None:
    """In a child made by ``os.fork()``: the parent's dispatcher (its thread does not exist
    here) is not ours; the first dispatch makes a new one, owned by this process."""
    global _dispatcher, _lock
    _dispatcher = None
    _lock = threading.Lock()


def _store():
    from ._store import get_store

    return get_store()


# ---------------------------------------------------------------------- dispatch


def dispatch(lattice: Lattice) -> Callable[..., str]:
    """``dispatch(workflow)(*args, **kwargs)`` starts it and returns its id at once."""
    _check_lattice(lattice, "dispatch")

    def start(*args: Any, **kwargs: Any) -> str:
        from ._gc import gc_paused

        with gc_paused():  # the graph and its rows: 10,000s of objects, all kept
            graph = lattice.build_graph(*args, **kwargs)
            if lattice.triggers:
                return _start_triggered(graph, lattice)
            return _start(graph, lattice)

    return start


def dispatch_sync(lattice: Lattice) -> Callable[..., Result]:
    """``dispatch_sync(workflow)(*args, **kwargs)`` runs it and returns its final Result."""
    _check_lattice(lattice, "dispatch_sync")

    def run(*args: Any, **kwargs: Any) -> Result:
        return get_result(dispatch(lattice)(*args, **kwargs), wait=True)

    return run


def _check_lattice(obj: Any, what: str) -> None:
    if isinstance(obj, Lattice):
        return
    if isinstance(obj, Electron):
        raise ValentError(
            f"{what}() takes a @lattice, got the electron {obj.name!r}; wrap it in a lattice "
            "(@ct.lattice def workflow(...): return task(...))"
        )
    raise ValentError(f"{what}() takes a function decorated with @ct.lattice, got {obj!r}")


def _start_triggered(graph: Graph, lattice: Lattice) -> str:
    """A lattice with triggers: its dispatch is stored but waits; its triggers start
    observing, and the first to fire runs it (``valent.triggers``)."""
    from .triggers import track_pending

    run_box: list[Any] = []
    did = _start(graph, lattice, keep=run_box.append)
    track_pending(run_box[0])
    for t in lattice.triggers:
        t.fresh(did).register()
    return did


def _start(
    graph: Graph, lattice: Lattice | None = None, links: dict[str, Any] | None = None,
    replace: dict[str, Electron] | None = None, reuse: Any = None,
    keep: Callable[[Any], None] | None = None,
) -> str:
    """Write a new dispatch of ``graph`` to the store and start it; its id.

    ``lattice`` (with the electrons ``replace`` puts in place of others, by name) is stored,
    pickled by value, so that ``redispatch`` works from any process; ``reuse``: the earlier
    dispatch whose outputs nodes may take (``valent._engine.reuse.Reuse``).
    """
    from ._engine.prepare import create_run

    dispatcher = get_dispatcher()
    store = _store()  # the configured one now (VALENT_RESULTS_DIR may have changed)
    run = create_run(
        graph, store, dispatcher.executors, dispatcher.owner, links,
        lattice_blob=_lattice_blob(lattice, replace) if lattice is not None else None,
        reuse=reuse,
    )
    if lattice is not None:
        _remember_lattice(run.id, lattice, replace or {})
    run.replace = dict(replace or {})
    if keep is not None:  # not started now (a lattice with triggers)
        keep(run)
        return run.id
    dispatcher.start(run)
    return run.id


_LATTICES_KEPT = 64
_lattices: dict[str, tuple[Lattice, dict[str, Electron]]] = {}


def _remember_lattice(dispatch_id: str, lattice: Lattice, replace: dict[str, Electron]) -> None:
    """Keep the lattice object of recent dispatches: a redispatch in this process uses it
    as it is (executor instances included, which the store does not keep)."""
    _lattices[dispatch_id] = (lattice, replace)
    while len(_lattices) > _LATTICES_KEPT:
        del _lattices[next(iter(_lattices))]


def _lattice_blob(lattice: Lattice, replace: dict[str, Electron] | None) -> bytes | None:
    """``{"lattice": ..., "replace": ...}`` pickled by value (the functions' code, and that
    of the electrons in the same modules), for a redispatch from another process; None when
    it cannot be pickled."""
    import cloudpickle

    from ._engine.reuse import dumps_by_value

    what = {"lattice": lattice, "replace": dict(replace or {})}
    modules = [getattr(lattice.fn, "__module__", None)]
    modules += [getattr(e.fn, "__module__", None) for e in what["replace"].values()]
    for by_value in (True, False):
        try:
            if by_value:
                return dumps_by_value(what, modules)
            return cloudpickle.dumps(what, protocol=5)
        except Exception:  # noqa: BLE001 - redispatch from another process will say so
            continue
    return None


# ---------------------------------------------------------------------- results


def _owned_run(dispatch_id: str):
    d = _dispatcher
    return None if d is None else d.owned(dispatch_id)


LAZY_NODES = 1000
"""A final dispatch of at least this many nodes gets a ``Result`` that reads its nodes when
first asked for them: its status, result and timings come at once (a million nodes take
seconds to read)."""


def get_result(
    dispatch_id: str, wait: bool = False, timeout: float | None = None, progress: bool = False
) -> Result:
    """The dispatch's Result; with ``wait=True``, once it is final and every executor
    confirmed that nothing it started is still running (``timeout`` in seconds).
    ``progress=True`` shows a progress bar of finished nodes on stderr while waiting."""
    if timeout is not None:
        from .checks import seconds_problem

        problem = seconds_problem(timeout, allow_zero=True)
        if problem:
            raise ValentError(f"get_result(timeout={timeout!r}): {problem}")
    store = _store()
    if _owned_run(dispatch_id) is None:  # an id this process runs is a full id already
        dispatch_id = store.resolve(dispatch_id)
    if wait and progress:
        from .cli.progress import StoreProgress

        with StoreProgress(store, dispatch_id):
            _wait(store, dispatch_id, timeout)
    elif wait:
        _wait(store, dispatch_id, timeout)
    row = check_owner(store, store.dispatch_row(dispatch_id))
    if row["status"] in FINAL_VALUES and (row["node_count"] or 0) >= LAZY_NODES:
        return Result(row, None, str(store.dir), store)  # nodes read when first asked for
    return Result(row, store.node_rows(dispatch_id), str(store.dir))




def _wait(store, dispatch_id: str, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    run = _owned_run(dispatch_id)
    if run is not None:
        if not run.done.wait(timeout):
            raise DispatchTimeoutError(
                f"dispatch {dispatch_id} is still {run.status} after {timeout} s; it goes on "
                "(call get_result again, or cancel it)"
            )
        if run.store_error is not None:
            raise run.store_error
        return
    delay = 0.02
    while True:
        row = check_owner(store, store.dispatch_row(dispatch_id))
        if row["status"] in FINAL_VALUES:
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise DispatchTimeoutError(
                f"dispatch {dispatch_id} is still {row['status']} after {timeout} s; it goes on"
            )
        time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)


def _owner_dead(row) -> bool:
    """True when the process that owns a dispatch (on this host) is gone."""
    import socket

    if row["owner_host"] != socket.gethostname() or row["owner_pid"] is None:
        return False
    pid = row["owner_pid"]
    if pid == os.getpid() and _dispatcher is not None:
        return (
            _dispatcher.owned(row["dispatch_id"]) is None
            and row["status"] not in FINAL_VALUES
            and abs(_dispatcher.owner[2] - (row["owner_started"] or 0)) > 1.0
        )
    import psutil

    try:
        proc = psutil.Process(pid)
        if row["owner_started"] and abs(proc.create_time() - row["owner_started"]) > 1.0:
            return True
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def check_owner(store, row):
    """The dispatch row, after marking the dispatch FAILED if its owner process died.

    Every reader (``get_result``, ``cancel``, the CLI's list/status/show/watch) goes through
    this, so a dispatch whose owner was killed is never reported RUNNING.
    """
    if row["status"] in FINAL_VALUES or not _owner_dead(row):
        return row
    store.mark_orphaned(row["dispatch_id"], _orphan_message(row))
    return store.dispatch_row(row["dispatch_id"])


def reap_orphans(store) -> int:
    """Mark every unfinished dispatch whose owner died (``check_owner``); how many were."""
    n = 0
    for row in store.unfinished_dispatches():
        if check_owner(store, row) is not row:
            n += 1
    return n


def _orphan_message(row) -> str:
    return (
        f"the process that dispatched it (pid {row['owner_pid']} on {row['owner_host']}) "
        "exited or was killed before the dispatch finished; its unfinished tasks were "
        "stopped with it. Resume it (what completed is reused): "
        f"`valent redispatch {row['dispatch_id'][:8]} --reuse`."
    )


# ---------------------------------------------------------------------- cancel


def cancel(dispatch_id: str, task_ids: list[int] | int | None = None) -> str:
    """Cancel a whole dispatch, or the listed node ids and all their dependents.

    Idempotent; on a dispatch that already finished it says so and changes nothing. Works
    from any process: the owning process picks the request up within a fraction of a second.
    """
    if isinstance(task_ids, int):
        task_ids = [task_ids]
    store = _store()
    dispatch_id = store.resolve(dispatch_id)
    if _owned_run(dispatch_id) is not None:
        return get_dispatcher().cancel(dispatch_id, task_ids)
    triggers = sys.modules.get("valent.triggers")
    if triggers is not None and dispatch_id in triggers._pending:
        triggers.stop_triggers(dispatch_id)  # it ends CANCELLED, nothing of it having run
        return f"Dispatch {dispatch_id}: it was waiting for its triggers; they were stopped."
    row = store.dispatch_row(dispatch_id)
    if row["status"] in FINAL_VALUES:
        return f"Dispatch {dispatch_id} already finished ({row['status']}); nothing to cancel."
    if check_owner(store, row) is not row:
        return (
            f"Dispatch {dispatch_id}: its owner process (pid {row['owner_pid']}) is gone; "
            "marked FAILED, nothing is running."
        )
    from ._engine.dispatcher import check_task_ids

    problem = check_task_ids(dispatch_id, task_ids, row["node_count"])
    if problem:
        return problem
    store.request_cancel(dispatch_id, task_ids)
    return (
        f"Dispatch {dispatch_id} cancel requested; its owner (pid {row['owner_pid']}) is "
        "stopping it."
    )
