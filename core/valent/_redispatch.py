"""``ct.redispatch``: run a dispatch's workflow again, with new inputs, replaced electrons,
and the outputs of what completed before.

``redispatch(dispatch_id, replace_electrons={"name": new_electron},
reuse_previous_results=False)(*args, **kwargs)`` traces the dispatch's lattice again (with the
old inputs when none are given), puts each replacement in place of the electrons of that
name (in sublattices too) and starts a new dispatch, whose id it returns. With
``reuse_previous_results=True`` a node takes the output of the same node of the earlier
dispatch iff that one COMPLETED and its function and resolved inputs are the same (digests,
see ``valent._engine.reuse``); such a node has ``start_time == end_time`` and the reason
``reused from <id>``. A sublattice node runs again as a new child dispatch whose nodes reuse
those of its earlier child. This is also how a CANCELLED or FAILED dispatch (or one whose
owner died) is resumed: only what did not complete runs.

With reuse, no new inputs and no replacement, in the process that made a big dispatch (1,000
nodes or more), the graph traced then is run again when the lattice and its inputs are
unchanged (``_same_graph``) rather than traced again.

Works from any process: the lattice (pickled by value), its electrons and its inputs are in
the store. In the process that dispatched it, the lattice object itself is used (executor
instances included; the store keeps executor names only, so another process runs electrons
given an executor instance on their lattice's or the default executor).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from .errors import ValentError
from .graph import SUBLATTICE, Electron, Lattice


def redispatch(
    dispatch_id: str,
    replace_electrons: dict[str, Any] | None = None,
    reuse_previous_results: bool = False,
    is_pending: bool = False,
) -> Callable[..., str]:
    """``redispatch(id, replace_electrons=None, reuse_previous_results=False)(*args,
    **kwargs)`` starts the workflow of dispatch ``id`` again and returns the new id.

    No arguments: the earlier dispatch's inputs. ``replace_electrons``: ``{electron name:
    electron (or function, or lattice)}``. ``is_pending`` is accepted for Covalent's
    signature and has no effect.
    """
    from . import api
    from ._engine.nest import as_electron
    from ._store import get_store

    if not isinstance(reuse_previous_results, bool):
        raise ValentError(
            f"redispatch(reuse_previous_results={reuse_previous_results!r}): give True or False"
        )
    if replace_electrons is not None and not isinstance(replace_electrons, dict):
        raise ValentError(
            "redispatch(replace_electrons=...) takes a dict {electron name: new electron}, got "
            f"{replace_electrons!r}"
        )
    store = get_store()
    did = store.resolve(dispatch_id)
    row = api.check_owner(store, store.dispatch_row(did))
    parent = row["parent_dispatch_id"] if "parent_dispatch_id" in row.keys() else None
    if parent:
        raise ValentError(
            f"dispatch {did} is the child dispatch of a sublattice of {parent}; redispatch "
            f"{row['root_dispatch_id'] or parent} (its sublattices reuse what completed inside)"
        )
    lattice, replace = _lattice_of(store, row)
    for name, new in (replace_electrons or {}).items():
        replace[name] = as_electron(name, new)

    def start(*args: Any, **kwargs: Any) -> str:
        from ._gc import gc_paused

        with gc_paused():  # tracing, the old rows, the new ones: 10,000s of objects kept
            return traced_and_started(*args, **kwargs)

    def traced_and_started(*args: Any, **kwargs: Any) -> str:
        from ._engine.nest import apply_replacements
        from ._engine.reuse import Reuse
        from .result import load_blob

        graph = None
        if reuse_previous_results and not args and not kwargs and not replace_electrons:
            graph = _same_graph(row, lattice, replace)
            if graph is not None:  # the very graph again: maybe every output is reusable
                new_id = _reuse_all(store, row, graph, lattice, replace)
                if new_id is not None:
                    return new_id
        if graph is None:
            if not args and not kwargs:
                try:
                    args, kwargs = load_blob(row["inputs"], None, store.dir) or ((), {})
                except ValentError:
                    raise
                except Exception as exc:
                    raise ValentError(
                        f"the inputs of dispatch {did} cannot be loaded here ({exc!r}); pass "
                        "them: redispatch(id)(*args, **kwargs)"
                    ) from exc
            graph = lattice.build_graph(*args, **kwargs)
        done = apply_replacements(graph, replace)
        missing = sorted(set(replace_electrons or {}) - done)
        if missing and not any(n.kind == SUBLATTICE for n in graph.nodes):
            names = sorted({n.electron.name for n in graph.nodes if n.electron is not None})
            raise ValentError(
                f"redispatch: no electron named {', '.join(map(repr, missing))} in lattice "
                f"{graph.lattice_name!r}; its electrons are {', '.join(map(repr, names))}"
            )
        reuse = None
        if reuse_previous_results:
            reuse = Reuse(did, store.reuse_rows(did))
        return api._start(graph, lattice, {"redispatch_of": did}, replace, reuse)

    return start


def _reuse_all(
    store: Any, row: Any, graph: Any, lattice: Lattice, replace: dict[str, Electron]
) -> str | None:
    """The id of a new dispatch of ``graph`` that took every output of dispatch ``row``
    (``_same_graph`` said ``graph`` is what it ran, with its lattice and inputs), written
    COMPLETED at once; None when not all of them qualify."""
    from . import api
    from ._engine.prepare import create_reused_dispatch

    dispatcher = api.get_dispatcher()
    new_id = create_reused_dispatch(
        graph, store, dispatcher.executors, dispatcher.owner, row, row["inputs"],
        row["lattice"],
    )
    if new_id is not None:
        api._remember_lattice(new_id, lattice, replace)
    return new_id


def _same_graph(row: Any, lattice: Lattice, replace: dict[str, Electron]) -> Any:
    """The graph dispatch ``row`` was traced into, when tracing its lattice again would give
    the same one, else None. Kept in this process for big graphs only
    (``valent._engine.prepare.kept_graph``); taken by a redispatch that reuses results and
    gives no new inputs and no replacement, when the lattice and the electrons it uses pickle
    (by value: their code, defaults, closures and the globals they read) and the inputs
    pickle to the very bytes stored at dispatch, and each electron is still the one its
    module holds (a module reloaded since is traced again). As Covalent, which resubmits the
    stored graph when nothing changed, the lattice's body then does not run again (what it
    reads from files, clocks or another module's attributes is not seen); it does in another
    process, and without reuse (a trigger's redispatch traces the lattice again each time)."""
    from ._engine.prepare import kept_graph

    graph = kept_graph(row["dispatch_id"])
    if graph is None or row["lattice"] is None or row["inputs"] is None:
        return None
    if not isinstance(lattice.fn, types.FunctionType) or _reads_modules(lattice.fn, set(), 0):
        return None  # what it reads there may have changed: only tracing says
    import cloudpickle

    from .api import _lattice_blob

    try:
        same = (
            _lattice_blob(lattice, replace) == row["lattice"]
            and cloudpickle.dumps((graph.args, graph.kwargs)) == row["inputs"]
        )
    except Exception:  # noqa: BLE001 - traced again, which says what is wrong
        return None
    return graph if same else None


def _reads_modules(fn: types.FunctionType, seen: set[int], depth: int) -> bool:
    """True when tracing ``fn`` may read what the lattice's pickle does not hold: a module of
    yours (``tasks.work``, ``settings.N``), or a function or class of yours from another
    module (pickled by name: a change there does not show) among the globals its code names
    and those of the functions of its own module it calls, recursively."""
    if depth > 20:
        return True
    seen.add(id(fn))
    names: list[str] = []
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        names.extend(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    g = fn.__globals__
    cells = [c.cell_contents for c in fn.__closure__ or () if _filled(c)]
    for v in [g[n] for n in dict.fromkeys(names) if n in g] + cells:
        if isinstance(v, types.ModuleType):
            if _mine(v.__name__):
                return True
        elif isinstance(v, types.FunctionType | type) and id(v) not in seen:
            if not _mine(getattr(v, "__module__", None)):
                continue  # the standard library's, valent's, an installed package's
            if v.__module__ != fn.__module__ or isinstance(v, type):
                return True
            if _reads_modules(v, seen, depth + 1):  # type: ignore[arg-type]
                return True
    return False


def _mine(module: str | None) -> bool:
    """A module of yours: ``__main__``, or a ``.py`` file neither valent's nor the standard
    library's (``valent._engine.reuse._yours``)."""
    from ._engine.reuse import _yours

    return module == "__main__" or _yours(module) is not None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _lattice_of(store: Any, row: Any) -> tuple[Lattice, dict[str, Electron]]:
    """The dispatch's lattice and the replacements it ran with: this process's objects when
    it dispatched it, else unpickled from the store (after the store-trust checks)."""
    from . import api
    from .result import load_blob

    did = row["dispatch_id"]
    kept = api._lattices.get(did)
    if kept is not None:
        return kept[0], dict(kept[1])
    blob = row["lattice"] if "lattice" in row.keys() else None
    if blob is None:
        raise ValentError(
            f"dispatch {did} has no stored lattice (made by an older valent, or its lattice "
            "could not be pickled); dispatch the workflow again with ct.dispatch"
        )
    try:
        what = load_blob(blob, None, store.dir)
    except ValentError:
        raise
    except Exception as exc:
        raise ValentError(
            f"the lattice of dispatch {did} cannot be loaded in this process ({exc!r}): a "
            "module it imports is missing here; run the redispatch where that module is "
            "importable"
        ) from exc
    return what["lattice"], dict(what.get("replace") or {})
