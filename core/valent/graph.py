"""``@electron`` and ``@lattice``, and the graph a lattice builds when it is traced.

Inside a lattice being traced, calling an electron adds a node and returns a
:class:`Placeholder`; literal arguments become ``:parameter:VALUE`` nodes numbered in creation
order (so node lists print as Covalent's do). Outside a lattice an electron is a plain call.

Names follow Covalent's: ``out[k]`` adds ``:task.__getitem__``, ``out.attr`` adds
``:task.__getattr__``, ``a, b = out`` adds ``:task()[0]`` and ``:task()[1]`` (each with the
key as a ``:parameter:`` node), ``out + 1`` adds an electron ``task_+_1`` that runs the
operator like any task, and ``ct.wait(child, parents)`` adds an ordering edge with no data.
"""

from __future__ import annotations

import contextvars
import dis
import functools
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._plugins.contract import Executor
from .checks import number_problem, seconds_problem
from .errors import TracingError, ValentError
from .task import node_label

ExecutorSpec = str | Executor | None

ELECTRON, PARAMETER, GETITEM, GETATTR, COLLECTION, SUBLATTICE = (
    "electron", "parameter", "getitem", "getattr", "collection", "sublattice",
)

_building: contextvars.ContextVar[Graph | None] = contextvars.ContextVar(
    "valent_building", default=None
)


@dataclass(frozen=True, slots=True)
class Ref:
    """Stands for a node's output inside another node's arguments or the lattice's result."""

    node_id: int


@dataclass(slots=True)
class Node:
    """One node of a traced lattice."""

    id: int
    name: str
    kind: str
    fn: Callable[..., Any] | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    value: Any = None
    electron: Electron | None = None
    parents: tuple[int, ...] = ()
    key: Any = None  # the index of a getitem node, the name of a getattr node
    # parents it waits for without taking their output (ct.wait); also in ``parents``
    waits: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return node_label(self.name, self.id)


@dataclass
class Graph:
    """The nodes a lattice's tracing produced, and its result as a structure of Refs."""

    lattice_name: str
    nodes: list[Node] = field(default_factory=list)
    result: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    executor: ExecutorSpec = None

    def add(self, name: str, kind: str, **kw: Any) -> Node:
        node = Node(len(self.nodes), name, kind, **kw)
        self.nodes.append(node)
        return node

    def children(self) -> list[list[int]]:
        """For each node, the ids of the nodes that take its output."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for p in n.parents:
                out[p].append(n.id)
        return out

    # ------------------------------------------------------------- tracing helpers

    def ref(self, value: Any) -> Ref:
        """The Ref for an argument: a placeholder's node, a collection node or a parameter."""
        if isinstance(value, Placeholder):
            if value._graph is not self:
                raise TracingError(
                    f"{value!r} belongs to another lattice's graph; electrons' outputs can be "
                    "passed only within the lattice that produced them"
                )
            return Ref(value._node_id)
        if _holds_placeholder(value):
            return Ref(self._collection(value).id)
        return Ref(self.add(f":parameter:{_short(value)}", PARAMETER, value=value).id)

    def _collection(self, value: list | tuple | dict) -> Node:
        kind = type(value).__name__ if isinstance(value, list | tuple | dict) else "list"
        node = self.add(f":electron_{kind}:", COLLECTION)
        if isinstance(value, dict):
            node.kwargs = {k: self.ref(v) for k, v in value.items()}
            node.value = dict
        else:
            node.args = tuple(self.ref(v) for v in value)
            node.value = type(value)
        node.parents = _parents(node.args, node.kwargs)
        return node

    def _subscript(self, parent: Placeholder, name: str, kind: str, key: Any) -> Placeholder:
        """A getitem/getattr node on ``parent``, with the key as a parameter node (as
        Covalent numbers them); the dispatcher computes it inline from ``node.key``."""
        node = self.add(name, kind, key=key)
        node.args = (Ref(parent._node_id), self.ref(key))
        node.parents = _parents(node.args, node.kwargs)
        return Placeholder(self, node.id)

    def add_wait(self, child: int, parents: list[int]) -> None:
        """Make node ``child`` start only after ``parents`` complete, taking no data from
        them; a parent that fails or is cancelled cancels it (upstream), like a data edge."""
        node = self.nodes[child]
        for pid in parents:
            if pid == child or child in self._ancestors(pid):
                raise TracingError(
                    f"ct.wait: {node.label} cannot wait for {self.nodes[pid].label}, which "
                    f"already depends on {node.label} (that would be a cycle)"
                )
            if pid not in node.parents:
                node.parents += (pid,)
                node.waits += (pid,)

    def _ancestors(self, node_id: int) -> set[int]:
        seen: set[int] = set()
        stack = [node_id]
        while stack:
            for p in self.nodes[stack.pop()].parents:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def structure(self, value: Any) -> Any:
        """The lattice's return value with placeholders turned into Refs."""
        if isinstance(value, Placeholder):
            return self.ref(value)
        if isinstance(value, list | tuple):
            return type(value)(self.structure(v) for v in value)
        if isinstance(value, dict):
            return {k: self.structure(v) for k, v in value.items()}
        return value


def _parents(args: tuple, kwargs: dict) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for r in (*args, *kwargs.values()):
        if isinstance(r, Ref):
            seen[r.node_id] = None
    return tuple(seen)


def _holds_placeholder(value: Any) -> bool:
    if isinstance(value, Placeholder):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_placeholder(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_placeholder(v) for v in value.values())
    return False


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}


def _operand_name(value: Any) -> str:
    return _short(value._node.name if isinstance(value, Placeholder) else value)


def _as_list(value: Any) -> list:
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return [value]


_UNPACK: dict[tuple[Any, int], int | None] = {}


def _unpack_count(frame: Any) -> int | None:
    """How many values the instruction that asked for an iterator unpacks (``a, b = x``:
    UNPACK_SEQUENCE 2); None for anything else (a for loop, list(x), ``a, *rest = x``)."""
    code, at = frame.f_code, frame.f_lasti
    key = (code, at)
    if key not in _UNPACK:
        if len(_UNPACK) > 4096:  # code objects of lattices built on the fly: keep it bounded
            _UNPACK.clear()
        found = None
        for ins in dis.get_instructions(code):
            if ins.offset == at:
                found = ins.arg if ins.opname == "UNPACK_SEQUENCE" else None
                break
        _UNPACK[key] = found
    return _UNPACK[key]


class Placeholder:
    """The future output of a node while a lattice is being traced."""

    __slots__ = ("_graph", "_node_id")

    def __init__(self, graph: Graph, node_id: int):
        self._graph = graph
        self._node_id = node_id

    @property
    def _node(self) -> Node:
        return self._graph.nodes[self._node_id]

    def __repr__(self) -> str:
        return f"<output of {self._node.label}>"

    def __getitem__(self, key: Any) -> Placeholder:
        if _holds_placeholder(key):
            raise TracingError(
                f"cannot index {self!r} with another electron's output while building the "
                "lattice; do the indexing inside an electron"
            )
        return self._graph._subscript(self, f":{self._node.name}.__getitem__", GETITEM, key)

    def __getattr__(self, attr: str) -> Placeholder:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return self._graph._subscript(self, f":{self._node.name}.__getattr__", GETATTR, attr)

    def wait_for(self, parents: Any) -> Placeholder:
        """Start this node only after ``parents`` (an output or a list of outputs) complete,
        without taking their values. Returns this output (as Covalent's ``wait_for``)."""
        items = [parents] if isinstance(parents, Placeholder) else _as_list(parents)
        ids = []
        for p in items:
            if not isinstance(p, Placeholder):
                raise TracingError(
                    f"ct.wait / wait_for: {self!r} can wait only for electrons' outputs in "
                    f"this lattice, got {p!r}"
                )
            ids.append(self._graph.ref(p).node_id)
        self._graph.add_wait(self._node_id, ids)
        return self

    def _refuse(self, what: str) -> TracingError:
        return TracingError(
            f"cannot {what} {self!r} while building the lattice: its value does not exist "
            "until the workflow runs. Do this inside an electron that takes it as an argument "
            "(or index it: out[0], out['key'])."
        )

    def __iter__(self):
        # `a, b = out`: the caller's bytecode says how many values it unpacks (as Covalent
        # reads it); any other iteration has no known length
        count = _unpack_count(sys._getframe(1))
        if count is None:
            raise TracingError(
                f"cannot iterate over {self!r} while building the lattice: its length is not "
                "known until the workflow runs. Unpack a fixed number of values "
                "(a, b = out), index it (out[0]), or loop inside an electron that takes it "
                "as an argument."
            )
        name = f":{self._node.name}()"
        graph = self._graph
        return iter([graph._subscript(self, f"{name}[{i}]", GETITEM, i) for i in range(count)])

    def __len__(self) -> int:
        raise self._refuse("take len() of")

    def __bool__(self) -> bool:
        raise self._refuse("use as a truth value (if/while/and/or)")

    def __int__(self) -> int:
        raise self._refuse("convert to int")

    def __float__(self) -> float:
        raise self._refuse("convert to float")

    def __index__(self) -> int:
        raise self._refuse("use as an index")

    def __contains__(self, item: Any) -> bool:
        raise self._refuse("test membership in")

    def __hash__(self) -> int:
        raise self._refuse("hash")

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        raise self._refuse("compare")

    def __lt__(self, other: object) -> bool:
        raise self._refuse("compare")

    __le__ = __gt__ = __ge__ = __ne__ = __lt__  # type: ignore[assignment]

    def _op(self, left: Any, symbol: str, right: Any) -> Placeholder:
        """``left symbol right`` as an electron node that runs the operator like any task,
        named as Covalent names it: ``task_1_+_task_2``, ``task_*_3``, ``2_-_task``."""
        graph = self._graph
        fn = _OPERATORS[symbol]
        node = graph.add(f"{_operand_name(left)}_{symbol}_{_operand_name(right)}", ELECTRON, fn=fn)
        node.args = (graph.ref(left), graph.ref(right))
        node.parents = _parents(node.args, node.kwargs)
        return Placeholder(graph, node.id)

    def __add__(self, other: Any) -> Placeholder:
        return self._op(self, "+", other)

    def __radd__(self, other: Any) -> Placeholder:
        return self._op(other, "+", self)

    def __sub__(self, other: Any) -> Placeholder:
        return self._op(self, "-", other)

    def __rsub__(self, other: Any) -> Placeholder:
        return self._op(other, "-", self)

    def __mul__(self, other: Any) -> Placeholder:
        return self._op(self, "*", other)

    def __rmul__(self, other: Any) -> Placeholder:
        return self._op(other, "*", self)

    def __truediv__(self, other: Any) -> Placeholder:
        return self._op(self, "/", other)

    def __rtruediv__(self, other: Any) -> Placeholder:
        return self._op(other, "/", self)

    def __floordiv__(self, other: Any) -> Placeholder:
        return self._op(self, "//", other)

    def __rfloordiv__(self, other: Any) -> Placeholder:
        return self._op(other, "//", self)

    def __mod__(self, other: Any) -> Placeholder:
        return self._op(self, "%", other)

    def __rmod__(self, other: Any) -> Placeholder:
        return self._op(other, "%", self)

    def __pow__(self, other: Any) -> Placeholder:
        return self._op(self, "**", other)

    def __rpow__(self, other: Any) -> Placeholder:
        return self._op(other, "**", self)

    def __neg__(self) -> Placeholder:
        node = self._graph.add(f"-_{self._node.name}", ELECTRON, fn=operator.neg)
        node.args = (Ref(self._node_id),)
        node.parents = (self._node_id,)
        return Placeholder(self._graph, node.id)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # out.method(...) or **out: the attribute is a placeholder too, and cannot be called
        node = self._node
        what = repr(self)
        if node.kind == GETATTR:
            what = f"{Placeholder(self._graph, node.parents[0])!r}.{node.key}"
        raise TracingError(
            f"cannot call {what} while building the lattice (a method of an electron's "
            "output, or ** unpacking of it): its value does not exist until the workflow "
            "runs. Do this inside an electron that takes the output as an argument."
        )

    def __reduce__(self):
        raise self._refuse("pickle")


def _check_executor(spec: Any, where: str) -> ExecutorSpec:
    if spec is None or isinstance(spec, Executor):
        return spec
    if type(spec).__module__ != "builtins" and _is_covalent_executor(spec):
        from ._covalent_executor import wrap

        return wrap(spec)  # a Covalent-style executor (valent.executor.base.BaseExecutor)
    if isinstance(spec, str):
        from ._plugins.manager import get_plugins

        get_plugins().executor_class(spec)  # UnknownExecutorError lists the installed names
        return spec
    raise ValentError(
        f"{where}: executor must be an executor name (like 'local') or an Executor instance "
        f"(like ct.executors.LocalExecutor(), or a Covalent-style executor from "
        f"valent.executor.base), got {spec!r}"
    )


def _is_covalent_executor(spec: Any) -> bool:
    from .executor.base import _AbstractBaseExecutor

    return isinstance(spec, _AbstractBaseExecutor)


class Electron:
    """A task: a function that becomes a node when called inside a lattice."""

    def __init__(
        self,
        fn: Callable[..., Any],
        executor: ExecutorSpec = None,
        timeout: float | None = None,
        retries: int = 0,
        hooks: Any = None,
    ):
        if not callable(fn):
            raise TypeError(f"@electron needs a function, got {fn!r}")
        name = getattr(fn, "__name__", type(fn).__name__)
        self.fn = fn
        self.executor = _check_executor(executor, f"@electron {name}")
        if timeout is not None and (problem := seconds_problem(timeout)):
            raise ValentError(f"@electron {name}: timeout={problem} (or None for no timeout)")
        if problem := number_problem(retries, integer=True, ge=0):
            raise ValentError(
                f"@electron {name}: retries={problem}; give a whole number >= 0 (0: no retry)"
            )
        self.timeout = timeout
        self.retries = retries
        self.name = name
        # deps_bash / deps_pip / call_before / call_after (valent.deps.Hooks): the node runs
        # the function wrapped with them, in the task's process
        self.hooks = hooks
        self.task_fn = fn if hooks is None else hooks.wrap(fn, name)
        # over a lattice (a sublattice) take its names only, not its attributes (fn, ...)
        functools.update_wrapper(self, fn, updated=() if isinstance(fn, Lattice) else ("__dict__",))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graph = _building.get()
        if graph is None:
            return self.fn(*args, **kwargs)
        if isinstance(self.fn, Lattice):
            # a sublattice: its graph is built, and run as a child dispatch, when its inputs
            # are known (valent._engine.dispatcher)
            node = graph.add(f":sublattice:{self.name}", SUBLATTICE, fn=self.fn, electron=self)
        else:
            node = graph.add(self.name, ELECTRON, fn=self.task_fn, electron=self)
        if self.hooks is not None and self.hooks.retval_keywords:
            # filled in by a call_before's return value where the task runs (as Covalent)
            kwargs = {k: v for k, v in kwargs.items() if k not in self.hooks.retval_keywords}
        # graph.ref and _parents, inline for the usual argument (another node's output):
        # tracing a 100,000-node lattice makes this call 100,000 times
        ref = graph.ref
        parents: dict[int, None] = {}
        refs = []
        for a in args:
            r = Ref(a._node_id) if type(a) is Placeholder and a._graph is graph else ref(a)
            refs.append(r)
            parents[r.node_id] = None
        node.args = tuple(refs)
        if kwargs:
            node.kwargs = {k: ref(v) for k, v in kwargs.items()}
            for r in node.kwargs.values():
                parents[r.node_id] = None
        node.parents = tuple(parents)
        return Placeholder(graph, node.id)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else functools.partial(self, obj)

    def __reduce__(self):
        # Instances of executors (clients, connections) never travel with the function.
        spec = self.executor if isinstance(self.executor, str) else None
        return (Electron, (self.fn, spec, self.timeout, self.retries, self.hooks))

    def __repr__(self) -> str:
        return f"<electron {self.name}>"


class Lattice:
    """A workflow: tracing its function with arguments builds the graph to dispatch."""

    def __init__(
        self, fn: Callable[..., Any], executor: ExecutorSpec = None, triggers: Any = None
    ):
        if not callable(fn):
            raise TypeError(f"@lattice needs a function, got {fn!r}")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self.executor = _check_executor(executor, f"@lattice {self.name}")
        self.triggers: list = []
        if triggers is not None:  # valent.triggers: each dispatch of it is watched
            from .triggers import check_triggers

            self.triggers = check_triggers(triggers)
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the workflow here, as plain function calls (no dispatch)."""
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        # as Electron: an executor instance (clients, connections) never travels with it
        spec = self.executor if isinstance(self.executor, str) else None
        return (Lattice, (self.fn, spec))

    def build_graph(self, *args: Any, **kwargs: Any) -> Graph:
        """Trace the workflow with these arguments."""
        from ._gc import gc_paused

        graph = Graph(self.name, args=args, kwargs=kwargs, executor=self.executor)
        token = _building.set(graph)
        try:
            with gc_paused():  # a node per electron call, all kept: nothing to collect
                ret = self.fn(*args, **kwargs)
        finally:
            _building.reset(token)
        graph.result = graph.structure(ret)
        return graph

    def draw(self, *args: Any, **kwargs: Any) -> Any:
        """Trace with these arguments (nothing runs) and draw the graph: inline in a
        notebook, else written to an HTML file whose path is printed (``valent ui`` lists it)."""
        from .ui.draw import draw_lattice

        return draw_lattice(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<lattice {self.name}>"


def electron(
    fn: Callable[..., Any] | None = None,
    *,
    executor: ExecutorSpec = None,
    timeout: float | None = None,
    retries: int = 0,
    deps_bash: Any = None,
    deps_pip: Any = None,
    call_before: Any = None,
    call_after: Any = None,
    files: Any = None,
) -> Any:
    """Make a function a task. Bare (``@electron``) or with arguments.

    :param executor: an executor name (``"local"``, ``"dask"``, ``"ssh"``) or instance;
        default: the lattice's, else the config's ``default_executor``, else ``"local"``.
    :param timeout: seconds; a task running longer is cancelled and its node FAILS.
    :param retries: how many times to re-run a task that failed by its own error.
    :param deps_bash: shell commands (``ct.DepsBash`` or strings) run right before the task.
    :param deps_pip: ``ct.DepsPip`` (or requirement strings) installed into a cached
        directory of their own and put first on the task's path (see :mod:`valent.deps`).
    :param call_before: ``ct.DepsCall`` (or a list) called before the task, in its process;
        ``retval_keyword`` passes a result to the task as that keyword argument.
    :param call_after: ``ct.DepsCall`` (or a list) called after the task returned.
    :param files: ``ct.fs.FileTransfer`` objects (a list) run in the task's process before
        or after it; the task gets ``files=[(from_path, to_path), ...]`` (see :mod:`valent.fs`).
    """
    if files is not None or any(
        v is not None for v in (deps_bash, deps_pip, call_before, call_after)
    ):
        from .deps import make_hooks

        def with_hooks(f: Callable[..., Any]) -> Electron:
            name = getattr(f, "__name__", type(f).__name__)
            made = make_hooks(name, deps_bash, deps_pip, call_before, call_after)
            if files:
                from .fs.transfer import attach

                made = attach(name, made, files)
            return Electron(f, executor, timeout, retries, made)

        return with_hooks if fn is None else with_hooks(fn)
    if fn is None:
        return lambda f: Electron(f, executor, timeout, retries)
    return Electron(fn, executor, timeout, retries)


def lattice(
    fn: Callable[..., Any] | None = None, *, executor: ExecutorSpec = None, triggers: Any = None
) -> Any:
    """Make a function a workflow of electrons. Bare or with ``executor=`` (its electrons'
    default) and ``triggers=`` (``valent.triggers``: a dispatch of it waits for a trigger to
    fire, and each firing runs it again)."""
    if fn is None:
        return lambda f: Lattice(f, executor, triggers)
    return Lattice(fn, executor, triggers)


def wait(child: Any, parents: Any) -> Any:
    """Inside a lattice: ``child`` (an electron's output) starts only after ``parents`` (an
    output or a list of them) complete, without taking their values; a parent that fails or
    is cancelled cancels ``child``. Returns ``child``. Outside a lattice: returns ``child``."""
    graph = _building.get()
    if graph is None:
        return child
    if not isinstance(child, Placeholder):
        raise TracingError(
            f"ct.wait(child, parents): child must be an electron's output in this lattice, got "
            f"{child!r}"
        )
    return child.wait_for(parents)
