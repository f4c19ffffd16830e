"""``@electron`` and ``@lattice``, and the graph a lattice builds when it is traced.

Inside a lattice being traced, calling an electron adds a node and returns a
:class:`Placeholder`; literal arguments become ``:parameter:VALUE`` nodes numbered in creation
order (so node lists print as Covalent's do). Outside a lattice an electron is a plain call.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import TracingError, ValentError
from .executor import Executor

ExecutorSpec = str | Executor | None

ELECTRON, PARAMETER, GETITEM, GETATTR, COLLECTION = (
    "electron", "parameter", "getitem", "getattr", "collection",
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

    @property
    def label(self) -> str:
        return f"{self.name}({self.id})"


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
        node = self._graph.add(
            f"{self._node.name}()[{key!r}]", GETITEM, args=(Ref(self._node_id),),
            parents=(self._node_id,), key=key,
        )
        return Placeholder(self._graph, node.id)

    def __getattr__(self, attr: str) -> Placeholder:
        if attr.startswith("_"):
            raise AttributeError(attr)
        node = self._graph.add(
            f"{self._node.name}().{attr}", GETATTR, args=(Ref(self._node_id),),
            parents=(self._node_id,), key=attr,
        )
        return Placeholder(self._graph, node.id)

    def _refuse(self, what: str) -> TracingError:
        return TracingError(
            f"cannot {what} {self!r} while building the lattice: its value does not exist "
            "until the workflow runs. Do this inside an electron that takes it as an argument "
            "(or index it: out[0], out['key'])."
        )

    def __iter__(self):
        raise self._refuse("iterate over")

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

    def __add__(self, other: object) -> Any:
        raise self._refuse("do arithmetic on")

    __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __add__
    __floordiv__ = __mod__ = __pow__ = __neg__ = __add__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # out.method(...) or **out: the attribute is a placeholder too, and cannot be called
        raise TracingError(
            f"cannot call {self!r} while building the lattice (a method of an electron's "
            "output, or ** unpacking of it): its value does not exist until the workflow "
            "runs. Do this inside an electron that takes the output as an argument."
        )

    def __reduce__(self):
        raise self._refuse("pickle")


def _check_executor(spec: Any, where: str) -> ExecutorSpec:
    if spec is None or isinstance(spec, Executor):
        return spec
    if isinstance(spec, str):
        from .plugins import get_plugins

        get_plugins().executor_class(spec)  # UnknownExecutorError lists the installed names
        return spec
    raise ValentError(
        f"{where}: executor must be an executor name (like 'local') or an Executor instance "
        f"(like ct.executors.LocalExecutor()), got {spec!r}"
    )


class Electron:
    """A task: a function that becomes a node when called inside a lattice."""

    def __init__(
        self,
        fn: Callable[..., Any],
        executor: ExecutorSpec = None,
        timeout: float | None = None,
        retries: int = 0,
    ):
        if not callable(fn):
            raise TypeError(f"@electron needs a function, got {fn!r}")
        name = getattr(fn, "__name__", type(fn).__name__)
        self.fn = fn
        self.executor = _check_executor(executor, f"@electron {name}")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValentError(f"@electron {name}: timeout must be a positive number of seconds")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValentError(f"@electron {name}: retries must be a whole number >= 0")
        self.timeout = timeout
        self.retries = retries
        self.name = name
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        graph = _building.get()
        if graph is None:
            return self.fn(*args, **kwargs)
        node = graph.add(self.name, ELECTRON, fn=self.fn, electron=self)
        node.args = tuple(graph.ref(a) for a in args)
        node.kwargs = {k: graph.ref(v) for k, v in kwargs.items()}
        node.parents = _parents(node.args, node.kwargs)
        return Placeholder(graph, node.id)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else functools.partial(self, obj)

    def __reduce__(self):
        # Instances of executors (clients, connections) never travel with the function.
        spec = self.executor if isinstance(self.executor, str) else None
        return (Electron, (self.fn, spec, self.timeout, self.retries))

    def __repr__(self) -> str:
        return f"<electron {self.name}>"


class Lattice:
    """A workflow: tracing its function with arguments builds the graph to dispatch."""

    def __init__(self, fn: Callable[..., Any], executor: ExecutorSpec = None):
        if not callable(fn):
            raise TypeError(f"@lattice needs a function, got {fn!r}")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self.executor = _check_executor(executor, f"@lattice {self.name}")
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the workflow here, as plain function calls (no dispatch)."""
        return self.fn(*args, **kwargs)

    def build_graph(self, *args: Any, **kwargs: Any) -> Graph:
        """Trace the workflow with these arguments."""
        graph = Graph(self.name, args=args, kwargs=kwargs, executor=self.executor)
        token = _building.set(graph)
        try:
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
) -> Any:
    """Make a function a task. Bare (``@electron``) or with arguments.

    :param executor: an executor name (``"local"``, ``"dask"``, ``"ssh"``) or instance;
        default: the lattice's, else the config's ``default_executor``, else ``"local"``.
    :param timeout: seconds; a task running longer is cancelled and its node FAILS.
    :param retries: how many times to re-run a task that failed by its own error.
    """
    if fn is None:
        return lambda f: Electron(f, executor, timeout, retries)
    return Electron(fn, executor, timeout, retries)


def lattice(fn: Callable[..., Any] | None = None, *, executor: ExecutorSpec = None) -> Any:
    """Make a function a workflow of electrons. Bare or with ``executor=`` (its electrons'
    default)."""
    if fn is None:
        return lambda f: Lattice(f, executor)
    return Lattice(fn, executor)
