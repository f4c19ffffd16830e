"""Turning a traced graph into a dispatch's store rows and its run: for ``dispatch``,
``redispatch`` and the child dispatch of a sublattice alike."""

from __future__ import annotations

import pickle
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import cloudpickle

from .._gc import gc_paused
from ..errors import PicklingError
from ..graph import PARAMETER, Graph, Ref
from ..status import Status
from .resolve import Executors, executor_spec
from .reuse import ROW_EXECUTOR, ROW_OUT, ROW_PARENTS, Reuse, blob_digest
from .runstate import DispatchRun

NODE_COLUMNS = (
    "dispatch_id", "node_id", "name", "kind", "executor", "parents", "status", "output",
    "out_digest",
)

_PLAIN = (int, float, str, bytes, bool, type(None))

KEEP_GRAPH_NODES = 1000
"""A top-level dispatch's graph of at least this many nodes is kept in memory (see
``kept_graph``): re-tracing it is what a redispatch would otherwise spend most on."""
KEEP_GRAPH_BYTES = 1 << 20
"""... if its inputs and parameters pickle to at most this many bytes (a graph holds their
values: a big array passed in is not kept alive for a redispatch that may never come)."""
GRAPHS_KEPT = 2
"""At most this many graphs are kept (a redispatch that runs a kept graph again keeps it
under its own id too, without counting it twice), for at most ``IDS_KEPT`` dispatch ids,
with at most ``NODES_KEPT`` nodes in all (a graph takes about 350 bytes a node)."""
IDS_KEPT = 64
NODES_KEPT = 250_000
_kept: dict[str, tuple[Graph, tuple]] = {}
_kept_lock = threading.Lock()


def kept_graph(dispatch_id: str) -> Graph | None:
    """The graph dispatch ``dispatch_id`` was created from, if this process created it
    recently (one of the last ``GRAPHS_KEPT`` big ones) and each of its electrons is still
    what its module holds under its name (a module reloaded since, or an electron assigned
    anew, makes it None: tracing again would take the new one). Its nodes are never changed
    by a run (a redispatch applies the same replacements again, which changes nothing), so a
    redispatch may run it again; ``valent._redispatch`` does when the lattice and its inputs
    are unchanged."""
    kept = _kept.get(dispatch_id)
    if kept is None:
        return None
    graph, anchors = kept
    for obj, where in anchors:
        if _found(*where) is not obj:
            return None
    return graph


def _keep_graph(dispatch_id: str, graph: Graph, size: int) -> None:
    if not KEEP_GRAPH_NODES <= len(graph.nodes) <= NODES_KEPT or size > KEEP_GRAPH_BYTES:
        return
    anchors = next((a for g, a in list(_kept.values()) if g is graph), None)  # run again
    if anchors is None:
        anchors = _anchors(graph)
        if anchors is None:
            return
    with _kept_lock:
        _kept[dispatch_id] = (graph, anchors)
        while len(_kept) > IDS_KEPT or _too_many(g for g, _ in _kept.values()):
            del _kept[next(iter(_kept))]


def _too_many(graphs: Any) -> bool:
    distinct = {id(g): len(g.nodes) for g in graphs}
    return len(distinct) > GRAPHS_KEPT or sum(distinct.values()) > NODES_KEPT


def _anchors(graph: Graph) -> tuple | None:
    """For each distinct electron of ``graph``: itself (or its function) and where its module
    holds it, ``(module, qualname)``; None when one is found nowhere (made on the fly: whether
    tracing again would make the same cannot be told)."""
    out = []
    seen: set[int] = set()
    for node in graph.nodes:
        el = node.electron
        if el is None or id(el) in seen:
            continue
        seen.add(id(el))
        for obj in (el, el.fn):
            where = (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if _found(*where) is obj:
                out.append((obj, where))
                break
        else:
            return None
    return tuple(out)


def _found(module: str | None, qualname: str | None) -> Any:
    """What module ``module`` holds at ``qualname`` (dotted: a class's attribute), or None."""
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None or not isinstance(obj, type | types.ModuleType):
            return None
        obj = vars(obj).get(part)
    return obj


def dumps_param(value: Any) -> bytes:
    """Pickle a parameter: the C pickler for plain scalars, cloudpickle for everything else
    (so functions and classes from ``__main__`` load in other processes too)."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5)
    return cloudpickle.dumps(value, protocol=5)


def resolve_executors(executors: Executors, graph: Graph, default: str | None = None) -> list:
    """Each node's executor (None for nodes that run inline and sublattices), resolved now: a
    name no plugin provides, a bad ``[executors.NAME]`` setting or an ``__init__`` that
    rejects its settings fails at once, before anything runs."""
    from ..config import default_executor_name
    from ..graph import ELECTRON

    if default is None:
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
            ex = found[key] = executors.resolve(spec)
        out.append(ex)
    return out


def param_problem(graph: Graph, node_id: int, exc: Exception) -> str:
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


def create_run(
    graph: Graph,
    store: Any,
    executors: Executors,
    owner: tuple[int, str, float],
    links: dict[str, Any] | None = None,
    lattice_blob: bytes | None = None,
    default_executor: str | None = None,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    reuse: Reuse | None = None,
) -> DispatchRun:
    """Write a new dispatch of ``graph`` to ``store`` (NEW_OBJECT) and return its run.

    ``links``: ``parent_dispatch_id``, ``parent_node_id``, ``root_dispatch_id``,
    ``redispatch_of`` (the root is the dispatch itself when not given). ``reuse``: the
    earlier dispatch a redispatch takes outputs from; the nodes that qualify
    (``Reuse.plan``) are written COMPLETED (start == end, reason ``reused from <id>``) and
    never run.
    """
    with gc_paused():  # tens of thousands of small tuples: no collection in between
        return _create_run(
            graph, store, executors, owner, links, lattice_blob, default_executor, new_id(),
            reuse,
        )


def _dispatch_row(
    dispatch_id: str, graph: Graph, inputs: bytes, owner: tuple[int, str, float],
    links: dict[str, Any], lattice_blob: bytes | None, now: float,
) -> dict[str, Any]:
    """A new dispatch's row (NEW_OBJECT); ``links`` gains its ``root_dispatch_id``."""
    pid, host, started = owner
    links.setdefault("root_dispatch_id", dispatch_id)
    return {
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
        "lattice": lattice_blob,
        **links,
    }


def create_reused_dispatch(
    graph: Graph,
    store: Any,
    executors: Executors,
    owner: tuple[int, str, float],
    source: Any,
    inputs: bytes,
    lattice_blob: bytes | None,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> str | None:
    """A redispatch that reuses everything, written COMPLETED at once; its id, or None when
    not everything qualifies (then ``create_run`` decides node by node).

    ``graph`` is the very graph ``source`` (a COMPLETED dispatch's row, its result inline)
    was created from, kept by this process (``kept_graph``), and ``inputs`` and
    ``lattice_blob`` pickle as that dispatch's did. Then a node's inputs are the same as in
    ``source`` exactly when its parents' outputs are, so each node takes its old output when
    all nodes of ``source`` COMPLETED with an output under the same name, kind and executor,
    each electron's function digests as it did then, and each parameter pickles to the same
    digest: all checked in the store in the transaction that writes the new dispatch (the
    lattice's result is the source's: the same structure of the same outputs). Nothing runs,
    so no executor is started; a sublattice (whose child dispatch decides) is never taken
    whole."""
    from .._store import spans
    from ..graph import ELECTRON, SUBLATTICE
    from .reuse import fn_digest

    if (
        source["status"] != Status.COMPLETED.value or source["result"] is None
        or source["node_count"] != len(graph.nodes)
    ):
        return None
    default = None
    found: dict[tuple, list] = {}
    params: list[tuple[int, str]] = []
    for node in graph.nodes:
        kind = node.kind
        if kind == PARAMETER:
            try:
                params.append((node.id, blob_digest(dumps_param(node.value))))
            except Exception:  # noqa: BLE001 - create_run says what cannot be pickled
                return None
            continue
        if kind == SUBLATTICE:
            return None
        key = (node.name, kind, id(node.electron))
        group = found.get(key)
        if group is None:
            group = found[key] = [node, []]
        group[1].append(node.id)
    groups = []
    for (name, kind, _), (first, ids) in found.items():
        ex_name = fn_d = None
        if kind == ELECTRON:
            if default is None:
                from ..config import default_executor_name

                default = default_executor_name()
            spec = executor_spec(first.electron, graph.executor, default)
            ex_name = executors.resolve(spec).name
            fn_d = fn_digest(first.fn)
            if fn_d is None:
                return None
        groups.append((spans(ids), name, kind, ex_name, fn_d))
    now = time.time()
    dispatch_id = new_id()
    links = {"redispatch_of": source["dispatch_id"]}
    row = _dispatch_row(dispatch_id, graph, inputs, owner, links, lattice_blob, now)
    row.update(
        status=Status.COMPLETED.value, start_time=now, end_time=now, result=source["result"]
    )
    if not store.copy_completed_dispatch(row, source["dispatch_id"], groups, params):
        return None
    _keep_graph(dispatch_id, graph, len(inputs))
    return dispatch_id


def _create_run(
    graph: Graph,
    store: Any,
    executors: Executors,
    owner: tuple[int, str, float],
    links: dict[str, Any] | None,
    lattice_blob: bytes | None,
    default_executor: str | None,
    dispatch_id: str,
    reuse: Reuse | None,
) -> DispatchRun:
    # parameters first: an unpicklable lattice argument is reported with the node using it
    params: dict[int, bytes] = {}
    for node in graph.nodes:
        if node.kind == PARAMETER:
            try:
                params[node.id] = dumps_param(node.value)
            except Exception as exc:
                raise PicklingError(param_problem(graph, node.id, exc)) from exc
    try:
        inputs = cloudpickle.dumps((graph.args, graph.kwargs))
    except Exception as exc:
        raise PicklingError(
            f"the arguments of lattice {graph.lattice_name!r} cannot be pickled: {exc}; "
            "pass plain data (numbers, strings, lists, dicts, arrays) or paths"
        ) from exc
    node_executors = resolve_executors(executors, graph, default_executor)
    digests = {nid: blob_digest(b) for nid, b in params.items()}
    plan = reuse.plan(graph, digests) if reuse is not None else {}
    now = time.time()
    new = Status.NEW_OBJECT.value
    reused: dict[str, Any] | None = None
    if not plan:
        nodes = [
            (
                dispatch_id,
                node.id,
                node.name,
                node.kind,
                None if node_executors[node.id] is None else node_executors[node.id].name,
                "[" + ",".join(map(str, node.parents)) + "]",
                new,
                params.get(node.id),
                digests.get(node.id),
            )
            for node in graph.nodes
        ]
    else:
        nodes = []
        reused = {
            "source": reuse.source_id,  # type: ignore[union-attr]
            "time": now,
            "reason": f"reused from {reuse.source_id}",  # type: ignore[union-attr]
            "same": [],
            "rows": [],
        }
    for node in graph.nodes if plan else ():
        nid = node.id
        ex = node_executors[nid]
        ex_name = None if ex is None else ex.name
        parents = "[" + ",".join(map(str, node.parents)) + "]"
        taken = plan.get(nid)
        if taken is None:
            nodes.append((
                dispatch_id, nid, node.name, node.kind, ex_name, parents, new, params.get(nid),
                digests.get(nid),
            ))
            continue
        old, fn_d, in_d = taken
        if ex_name == old[ROW_EXECUTOR] and parents == old[ROW_PARENTS]:
            reused["same"].append(nid)  # type: ignore[index]  # copied whole in one statement
        else:
            reused["rows"].append(  # type: ignore[index]
                (nid, node.name, node.kind, ex_name, parents, fn_d, in_d)
            )
    links = dict(links or {})
    row = _dispatch_row(dispatch_id, graph, inputs, owner, links, lattice_blob, now)
    store.create_dispatch(row, nodes, NODE_COLUMNS, reused)
    if lattice_blob is not None and "parent_dispatch_id" not in links:
        _keep_graph(dispatch_id, graph, len(inputs) + sum(map(len, params.values())))
    run = DispatchRun(dispatch_id, graph, store, node_executors)
    run.root_id = links["root_dispatch_id"]
    run.reuse = reuse
    for nid, d in digests.items():
        run.nodes[nid].out_digest = d
    for nid, (old, fn_d, in_d) in plan.items():
        nr = run.nodes[nid]
        nr.status = Status.COMPLETED
        nr.reused = nr.submitted = True  # its output: read from the store when needed
        nr.out_digest, nr.fn_digest, nr.in_digest = old[ROW_OUT], fn_d, in_d
        nr.start_time = nr.end_time = now
    return run
