"""The dispatcher's live view of a dispatch and its nodes, and the values flowing between them."""

from __future__ import annotations

import threading
from typing import Any

import cloudpickle

from .._plugins.contract import Executor
from .._store import Store
from ..errors import StoreError, ValentError
from ..graph import COLLECTION, GETATTR, GETITEM, Graph, Node, Ref
from ..status import FINAL, CancelOutcome, Status

_MISSING = object()
_RELEASED = object()


class NodeRun:
    """The dispatcher's live view of one node."""

    __slots__ = (
        "node", "status", "executor", "handle", "waiting", "value", "pickled", "attempts",
        "cancel_at", "cancel_outcome", "cancel_tries", "timed_out", "deadline", "reason",
        "start_time", "end_time", "error", "submitted", "run", "consumers", "chained",
        "upstream_cancel", "live", "sub", "building", "fn_digest", "in_digest", "out_digest",
        "output_file", "reused",
    )

    def __init__(self, run: DispatchRun, node: Node):
        self.run = run
        self.node = node
        self.status = Status.NEW_OBJECT
        self.executor: Executor | None = None
        self.handle: Any = None
        self.waiting = len(node.parents)
        self.value: Any = _MISSING
        self.pickled: bytes | None = None
        self.attempts = 0
        self.cancel_at: float | None = None
        self.cancel_outcome: CancelOutcome | None = None
        self.cancel_tries = 0
        self.timed_out = False
        self.deadline: float | None = None
        self.reason: str | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.error: str | None = None
        self.submitted = False
        self.consumers = 0  # dependents not final yet (+1 if the lattice returns it)
        self.chained = False  # started on its executor before every parent completed
        self.upstream_cancel = False  # cancelled because a parent failed or was cancelled
        self.live = False  # the store points at files holding its output so far
        self.sub: DispatchRun | None = None  # a sublattice's child dispatch, once built
        self.building = False  # a sublattice whose graph is being built
        self.fn_digest: str | None = None  # valent._engine.reuse
        self.in_digest: str | None = None
        self.out_digest: str | None = None
        self.output_file: str | None = None  # where a reused output is (when not inline)
        self.reused = False  # COMPLETED from the start: a redispatch took an earlier output

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def retries(self) -> int:
        """How many times a failed attempt is started again."""
        electron = self.node.electron
        return electron.retries if electron is not None else 0

    def get_value(self) -> Any:
        if self.value is _RELEASED:
            raise ValentError(f"internal: the value of {self.node.label} was already released")
        if self.value is _MISSING:
            if self.pickled is None and self.reused and not self.output_file:
                # written COMPLETED with an earlier node's output: it is in the store
                self.pickled, self.output_file = self.run.store.node_output(
                    self.run.id, self.node.id
                )
            if self.pickled is None and self.output_file:
                from .._store import read_trusted_file

                self.pickled = read_trusted_file(self.output_file, self.run.store.dir)
            self.value = cloudpickle.loads(self.pickled) if self.pickled is not None else None
        return self.value


class DispatchRun:
    """One dispatch this process owns."""

    def __init__(
        self,
        dispatch_id: str,
        graph: Graph,
        store: Store | None = None,
        executors: list[Executor | None] | None = None,
    ):
        self.id = dispatch_id
        self.graph = graph
        self.store = store  # where it was created (the dispatcher's store when None)
        self.nodes = [NodeRun(self, n) for n in graph.nodes]
        if executors is not None:  # resolved at dispatch (valent._engine.resolve), one per node
            for nr, ex in zip(self.nodes, executors, strict=True):
                nr.executor = ex
        self.children = graph.children()
        for nr, kids in zip(self.nodes, self.children, strict=True):
            nr.consumers = len(kids)
        for node_id in _refs(graph.result):
            self.nodes[node_id].consumers += 1  # kept until the result is assembled
        self.remaining = len(self.nodes)
        self.status = Status.NEW_OBJECT
        self.cancel_requested = False
        self.done = threading.Event()
        self.executors: set[int] = set()
        self.executor_objs: list[Executor] = []
        self.store_error: StoreError | None = None
        # nesting and redispatch
        self.parent: NodeRun | None = None  # the sublattice node this child dispatch runs
        self.root_id = dispatch_id
        self.reuse: Any = None  # valent._engine.reuse.Reuse: outputs it may take
        self.replace: dict[str, Any] = {}  # electron name -> replacement (redispatch)
        self.result_blob: bytes | None = None  # the pickled result, once COMPLETED
        self.error: str | None = None

    def leaf_nodes(self):
        """Its nodes and, in place of each sublattice node that ran, its child's (recursively)."""
        for nr in self.nodes:
            if nr.sub is not None:
                yield from nr.sub.leaf_nodes()
            else:
                yield nr

    def use(self, executor: Executor) -> None:
        """Note that a task of this dispatch went to ``executor`` (closed at the end)."""
        if id(executor) not in self.executors:
            self.executors.add(id(executor))
            self.executor_objs.append(executor)


def release_inputs(nr: NodeRun) -> None:
    """``nr`` is final: a parent whose dependents are all final drops its value (it is in the
    store), so memory follows the running frontier of the graph, not its whole size."""
    nodes = nr.run.nodes
    for pid in nr.node.parents:
        parent = nodes[pid]
        parent.consumers -= 1
        if parent.consumers <= 0 and parent.final:
            parent.value = _RELEASED
            parent.pickled = None


def _refs(structure: Any) -> list[int]:
    if isinstance(structure, Ref):
        return [structure.node_id]
    if isinstance(structure, list | tuple):
        return [i for v in structure for i in _refs(v)]
    if isinstance(structure, dict):
        return [i for v in structure.values() for i in _refs(v)]
    return []


def compute_inline(node: Node, args: tuple, kwargs: dict) -> Any:
    if node.kind == GETITEM:
        return args[0][node.key] if args else None
    if node.kind == GETATTR:
        return getattr(args[0], node.key)
    if node.kind == COLLECTION:
        return dict(kwargs) if node.value is dict else node.value(args)
    raise ValentError(f"node {node.label} of kind {node.kind} cannot run inline")


def structure_value(run: DispatchRun, s: Any) -> Any:
    if isinstance(s, Ref):
        return run.nodes[s.node_id].get_value()
    if isinstance(s, list | tuple):
        return type(s)(structure_value(run, v) for v in s)
    if isinstance(s, dict):
        return {k: structure_value(run, v) for k, v in s.items()}
    return s


def error_text(error: Any) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)
