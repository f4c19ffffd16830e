"""Sublattices: building a child dispatch when its inputs are known, off the loop's thread.

A sublattice node (``@ct.electron`` over a ``@ct.lattice``) starts when its parents complete:
its lattice's body is traced with the real values of its inputs (so it may branch on them),
here on a builder thread (user code must not hold up the loop), and written to the store as
a child dispatch linked to its parent dispatch, parent node and root dispatch. The loop then
runs it like any dispatch it owns (``_Loop.built``): its electrons are real nodes on their own
executors. Executors inside: an inner electron's own, else the sublattice's ``@lattice``
executor, else the sublattice electron's, else the enclosing lattice's, else the default.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import ValentError
from ..graph import ELECTRON, SUBLATTICE, Electron, Graph, Lattice
from .prepare import create_run
from .resolve import Executors
from .reuse import Reuse
from .runstate import DispatchRun, NodeRun

BUILDER_THREADS = 4
"""Sublattices built at once (their bodies only trace; the work runs on executors)."""


def as_electron(name: str, new: Any) -> Electron:
    """A replacement given to ``redispatch(replace_electrons=...)`` as an electron."""
    if isinstance(new, Electron):
        return new
    if isinstance(new, Lattice):
        return Electron(new)
    if callable(new):
        return Electron(new)
    raise ValentError(
        f"replace_electrons[{name!r}] must be an electron, a lattice or a function, got {new!r}"
    )


def apply_replacements(graph: Graph, replace: dict[str, Electron]) -> set[str]:
    """Give the nodes of the electrons named in ``replace`` the replacement's function and
    settings (the node keeps its place and, for the same kind, its name). Returns the names
    replaced here."""
    done: set[str] = set()
    if not replace:
        return done
    for node in graph.nodes:
        el = node.electron
        if el is None or el.name not in replace:
            continue
        new = replace[el.name]
        done.add(el.name)
        sub = isinstance(new.fn, Lattice)
        kind = SUBLATTICE if sub else ELECTRON
        if kind != node.kind:
            node.name = f":sublattice:{el.name}" if sub else el.name
        node.kind = kind
        node.electron = new
        node.fn = new.fn if sub else new.task_fn
    return done


class Builder:
    """Builds child dispatches on a few daemon threads; each result goes to ``deliver``."""

    def __init__(
        self,
        executors: Executors,
        owner: tuple[int, str, float],
        deliver: Callable[[NodeRun, DispatchRun | None, BaseException | None, str], None],
    ):
        self.executors = executors
        self.owner = owner
        self.deliver = deliver
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, nr: NodeRun, args: tuple, kwargs: dict) -> None:
        """Build ``nr``'s child dispatch with these (real) arguments, then deliver it."""
        run = nr.run
        source = None
        if run.reuse is not None:
            source = run.reuse.child_source(nr.node.id, nr.node.name)
        self.jobs.put((nr, args, kwargs, source, dict(run.replace), run.graph.executor))
        with self.lock:
            if self.idle == 0 and self.threads < BUILDER_THREADS:
                self.threads += 1
                threading.Thread(
                    target=self._work, name="valent-sublattice", daemon=True
                ).start()

    def _work(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            job = self.jobs.get()
            with self.lock:
                self.idle -= 1
            nr = job[0]
            try:
                child = self.build(*job)
            except BaseException as exc:  # noqa: BLE001 - the node fails with it
                self.deliver(nr, None, exc, traceback.format_exc())
            else:
                self.deliver(nr, child, None, "")

    def build(
        self,
        nr: NodeRun,
        args: tuple,
        kwargs: dict,
        source: str | None,
        replace: dict[str, Electron],
        outer_executor: Any,
    ) -> DispatchRun:
        node = nr.node
        lattice = node.fn
        if not isinstance(lattice, Lattice):
            raise ValentError(f"{node.label} is not a sublattice")
        graph = lattice.build_graph(*args, **kwargs)
        apply_replacements(graph, replace)
        el = node.electron
        graph.executor = (
            lattice.executor
            or (el.executor if el is not None else None)
            or outer_executor
        )
        parent = nr.run
        store = parent.store
        links = {
            "parent_dispatch_id": parent.id,
            "parent_node_id": node.id,
            "root_dispatch_id": parent.root_id,
        }
        reuse = Reuse(source, store.reuse_rows(source)) if source is not None else None
        child = create_run(graph, store, self.executors, self.owner, links, reuse=reuse)
        child.replace = replace
        return child
