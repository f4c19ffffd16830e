"""The user-facing calls: ``dispatch``, ``dispatch_sync``, ``get_result``, ``cancel``."""

from __future__ import annotations

import atexit
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import DispatchTimeoutError, PicklingError, ValentError
from .graph import ELECTRON, PARAMETER, Electron, Graph, Lattice, Ref
from .result import Result
from .status import FINAL_VALUES, Status

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
        graph = lattice.build_graph(*args, **kwargs)
        return _start(graph)

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


def _start(graph: Graph) -> str:
    import uuid

    import cloudpickle

    from ._engine.runstate import DispatchRun

    dispatcher = get_dispatcher()
    store = _store()  # the configured one now (VALENT_RESULTS_DIR may have changed)
    dispatch_id = str(uuid.uuid4())
    # parameters first: an unpicklable lattice argument is reported with the node using it
    params: dict[int, bytes] = {}
    for node in graph.nodes:
        if node.kind == PARAMETER:
            try:
                params[node.id] = _dumps(node.value)
            except Exception as exc:
                raise PicklingError(_param_problem(graph, node.id, exc)) from exc
    try:
        inputs = cloudpickle.dumps((graph.args, graph.kwargs))
    except Exception as exc:
        raise PicklingError(
            f"the arguments of lattice {graph.lattice_name!r} cannot be pickled: {exc}; "
            "pass plain data (numbers, strings, lists, dicts, arrays) or paths"
        ) from exc
    executors = _resolve_executors(dispatcher, graph)
    now = time.time()
    new = Status.NEW_OBJECT.value
    nodes = [
        (
            dispatch_id,
            node.id,
            node.name,
            node.kind,
            None if executors[node.id] is None else executors[node.id].name,
            "[" + ",".join(map(str, node.parents)) + "]",
            new,
            params.get(node.id),
        )
        for node in graph.nodes
    ]
    pid, host, started = dispatcher.owner
    row = {
        "dispatch_id": dispatch_id,
        "lattice_name": graph.lattice_name,
        "status": Status.NEW_OBJECT.value,
        "created_at": now,
        "inputs": inputs,
        "input_repr": repr((graph.args, graph.kwargs))[:500],
        "owner_pid": pid,
        "owner_host": host,
        "owner_started": started,
        "node_count": len(graph.nodes),
    }
    store.create_dispatch(row, nodes, NODE_COLUMNS)
    dispatcher.start(DispatchRun(dispatch_id, graph, store, executors))
    return dispatch_id


NODE_COLUMNS = ("dispatch_id", "node_id", "name", "kind", "executor", "parents", "status", "output")


_PLAIN = (int, float, str, bytes, bool, type(None))


def _dumps(value: Any) -> bytes:
    """Pickle a parameter: the C pickler for plain scalars, cloudpickle for everything else
    (so functions and classes from ``__main__`` load in other processes too)."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5)
    import cloudpickle

    return cloudpickle.dumps(value, protocol=5)


def _resolve_executors(dispatcher, graph: Graph) -> list[Any]:
    """Each node's executor (None for nodes that run inline), resolved now: a name no plugin
    provides, a bad ``[executors.NAME]`` setting or an ``__init__`` that rejects its settings
    fails ``dispatch`` at once, before anything runs."""
    from ._engine.resolve import executor_spec
    from .config import default_executor_name

    default = default_executor_name()
    found: dict[Any, Any] = {}
    out: list[Any] = []
    for node in graph.nodes:
        if node.kind != ELECTRON:
            out.append(None)
            continue
        spec = executor_spec(node.electron, graph.executor, default)
        key = spec if isinstance(spec, str) else id(spec)
        ex = found.get(key)
        if ex is None:
            ex = found[key] = dispatcher.executors.resolve(spec)
        out.append(ex)
    return out


def _param_problem(graph: Graph, node_id: int, exc: Exception) -> str:
    node = graph.nodes[node_id]
    users = []
    for n in graph.nodes:
        for i, a in enumerate(n.args):
            if a == Ref(node_id):
                users.append(f"argument {i + 1} of {n.label}")
        for k, a in n.kwargs.items():
            if a == Ref(node_id):
                users.append(f"argument {k!r} of {n.label}")
    where = ", ".join(users) or "an argument"
    return (
        f"{where} ({type(node.value).__name__} value, node {node.label}) cannot be pickled, so "
        f"it cannot be sent to an executor: {exc}. Pass plain data, or create the object "
        "inside the electron that uses it."
    )


# ---------------------------------------------------------------------- results


def _owned_run(dispatch_id: str):
    d = _dispatcher
    return None if d is None else d.owned(dispatch_id)


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
        "stopped with it. Dispatch the workflow again."
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
