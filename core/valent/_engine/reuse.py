"""What a node's previous run can stand in for: digests, and the table a redispatch reuses.

Each node stores, when it completes, three digests:

- ``fn_digest``: of its function's definition (the code, defaults, closure and globals of a
  function of yours, not just its name: an edited function is a different function);
- ``in_digest``: of its resolved inputs, made of its parents' ``out_digest`` by position
  and keyword (a parent's output is the input);
- ``out_digest``: of its pickled output (the bytes the store keeps).

A redispatch with ``reuse_previous_results=True`` gives node N the output of node N of the
earlier dispatch iff that one COMPLETED, has the same name and kind, and both digests are the
same. A value whose pickle differs between processes (a set of strings under another hash
seed) is simply not reused: a digest never says "same" for different inputs.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import sys
import sysconfig
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..graph import ELECTRON, Electron, Lattice, Ref

_lock = threading.Lock()
_STDLIB = tuple(
    p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")} if p
)


def blob_digest(blob: bytes) -> str:
    """The digest of a pickled value."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _yours(module_name: str | None) -> Any:
    """The module to pickle by value for a function of ``module_name`` (None: by name)."""
    if not module_name or module_name == "__main__" or module_name.split(".")[0] == "valent":
        return None
    mod = sys.modules.get(module_name)
    path = getattr(mod, "__file__", None)
    if mod is None or not path or not path.endswith(".py") or path.startswith(_STDLIB):
        return None
    return mod


def dumps_by_value(obj: Any, module_names: list[str | None]) -> bytes:
    """``cloudpickle.dumps(obj)`` with the functions of the user modules ``module_names``
    pickled by value (their code, not a reference to a module another process may lack)."""
    with _lock:  # the registry is process-wide: one registration at a time
        done = []
        have = cloudpickle.list_registry_pickle_by_value()
        for name in dict.fromkeys(module_names):
            mod = _yours(name)
            if mod is None or mod.__name__ in have:
                continue
            try:
                cloudpickle.register_pickle_by_value(mod)
                done.append(mod)
            except (ValueError, TypeError):
                continue
        try:
            return cloudpickle.dumps(obj, protocol=5)
        finally:
            for mod in done:
                cloudpickle.unregister_pickle_by_value(mod)


def fn_digest(fn: Any) -> str | None:
    """The digest of a task function's definition: for a function of yours (from
    ``__main__`` or a module that is neither the standard library's nor valent's, or a
    closure or lambda), its code, defaults, closure and the globals it uses, recursively;
    for any other, its module and name. The same in every process (a pickle's bytes are
    not: pickling memoizes by object identity); a function that was edited digests
    differently."""
    h = hashlib.blake2b(digest_size=16)
    try:
        _value(fn, h, set(), 0)
    except Exception:  # noqa: BLE001 - what cannot be read is never reused
        return None
    return h.hexdigest()


_MAX_DEPTH = 40


def _by_name(obj: Any) -> bool:
    """True for a function or class imported by name (not yours: its module's version)."""
    qual = getattr(obj, "__qualname__", "")
    if "<locals>" in qual or "<lambda>" in qual:
        return False
    mod = getattr(obj, "__module__", None)
    return mod != "__main__" and _yours(mod) is None


# values no branch of ``_value`` but the last takes: their pickle, without the walk down
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})


def _value(v: Any, h: Any, seen: set[int], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("too deep")
    if type(v) in _ATOMS:
        h.update(b"V" + pickle.dumps(v, protocol=5))
        return
    depth += 1
    if isinstance(v, types.ModuleType):
        h.update(b"M" + v.__name__.encode())
    elif isinstance(v, Electron):
        h.update(b"E" + v.name.encode())
        _value(v.task_fn, h, seen, depth)
    elif isinstance(v, Lattice):
        h.update(b"L" + v.name.encode())
        _value(v.fn, h, seen, depth)
    elif isinstance(v, types.FunctionType):
        _function(v, h, seen, depth)
    elif isinstance(v, functools.partial):
        h.update(b"P")
        _value(v.func, h, seen, depth)
        _value(v.args, h, seen, depth)
        _value(v.keywords, h, seen, depth)
    elif isinstance(v, type | types.BuiltinFunctionType | types.MethodType) or callable(v) and (
        hasattr(v, "__qualname__") and hasattr(v, "__module__")
    ):
        if isinstance(v, types.MethodType):
            _value(v.__func__, h, seen, depth)
            return
        h.update(f"N{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', '')}".encode())
        if isinstance(v, type) and not _by_name(v) and id(v) not in seen:
            seen.add(id(v))
            for k in sorted(vars(v)):
                if not k.startswith("__") or k in ("__init__", "__call__"):
                    h.update(k.encode())
                    _value(vars(v)[k], h, seen, depth)
    elif isinstance(v, frozenset | set):
        h.update(b"S")
        for r in sorted(repr(x) for x in v):
            h.update(r.encode())
    elif isinstance(v, list | tuple):
        h.update(b"T" + str(len(v)).encode())
        for x in v:
            _value(x, h, seen, depth)
    elif isinstance(v, dict):
        h.update(b"D" + str(len(v)).encode())
        for k, x in v.items():
            h.update(repr(k).encode())
            _value(x, h, seen, depth)
    else:
        try:
            h.update(b"V" + pickle.dumps(v, protocol=5))
        except Exception:  # noqa: BLE001
            h.update(b"R" + repr(v).encode())


def _function(f: types.FunctionType, h: Any, seen: set[int], depth: int) -> None:
    h.update(f"F{f.__module__}.{f.__qualname__}".encode())
    if _by_name(f):
        return
    if id(f) in seen:
        return  # recursion: named above
    seen.add(id(f))
    names: list[str] = []
    _code(f.__code__, h, names)
    _value(f.__defaults__, h, seen, depth)
    _value(f.__kwdefaults__, h, seen, depth)
    for cell in f.__closure__ or ():
        try:
            _value(cell.cell_contents, h, seen, depth)
        except ValueError:  # an empty cell
            h.update(b"empty")
    g = f.__globals__
    for name in dict.fromkeys(names):
        if name in g:
            h.update(b"G" + name.encode())
            _value(g[name], h, seen, depth)


def _code(code: types.CodeType, h: Any, names: list[str]) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                   code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                   code.co_flags)).encode())
    names.extend(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code(c, h, names)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(repr(x) for x in c)).encode())
        else:
            h.update(repr(c).encode())


def in_digest(
    args: tuple, kwargs: dict, out_digests: Callable[[int], str | None]
) -> str | None:
    """The digest of a node's inputs: its arguments' parents' output digests, by position
    and keyword (None when a parent has none, so the node is never reused)."""
    parts = []
    for a in args:
        d = out_digests(a.node_id) if type(a) is Ref else _arg_digest(a, out_digests)
        if d is None:
            return None
        parts.append(d)
    for k, a in kwargs.items():
        d = _arg_digest(a, out_digests)
        if d is None:
            return None
        parts.append(f"{k!r}={d}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def _arg_digest(a: Any, out_digests: Callable[[int], str | None]) -> str | None:
    if isinstance(a, Ref):
        return out_digests(a.node_id)
    try:
        return blob_digest(cloudpickle.dumps(a, protocol=5))
    except Exception:  # noqa: BLE001
        return None


def node_fn_digest(node: Any, cache: dict[int, tuple[Any, str | None]] | None = None):
    """The ``fn_digest`` of a node: its function's for an electron (cached by function in
    ``cache``), its kind and key for a node computed inline (getitem, collection...)."""
    if node.kind != ELECTRON:
        text = f"{node.kind}:{node.key!r}:{getattr(node.value, '__name__', '')}"
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    fn = node.fn
    if cache is None:
        return fn_digest(fn)
    got = cache.get(id(fn))
    if got is None or got[0] is not fn:
        got = cache[id(fn)] = (fn, fn_digest(fn))
    return got[1]


def _topological(graph: Any) -> list[Any]:
    """The graph's nodes, each after its parents (ids are not: a node is added before the
    parameter nodes of its arguments)."""
    done: set[int] = set()
    out = []
    for start in graph.nodes:
        if start.id in done:
            continue
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node.id in done:
                continue
            if expanded:
                done.add(node.id)
                out.append(node)
                continue
            stack.append((node, True))
            for p in node.parents:
                if p not in done:
                    stack.append((graph.nodes[p], False))
    return out


def _in_id_order(graph: Any) -> bool:
    """True when every node's parents, parameters aside, come before it by id (most graphs:
    a collection node made for an argument comes after the node that takes it)."""
    from ..graph import PARAMETER

    nodes = graph.nodes
    for node in nodes:
        i = node.id
        for p in node.parents:
            if p > i and nodes[p].kind != PARAMETER:
                return False
    return True


_NOT_REF = object()

ROW_ID, ROW_NAME, ROW_KIND, ROW_STATUS, ROW_FN, ROW_IN, ROW_OUT, ROW_SUB, ROW_EXECUTOR, \
    ROW_PARENTS = range(10)
"""Positions in a row of ``Store.reuse_rows``."""


class Reuse:
    """The earlier dispatch a redispatch may take outputs from (``reuse_previous_results``).

    ``rows``: ``Store.reuse_rows`` of it: (node_id, name, kind, status, fn_digest, in_digest,
    out_digest, sub_dispatch_id, executor, parents) for each node that COMPLETED with an
    output, and each sublattice node that had a child dispatch.
    """

    def __init__(self, source_id: str, rows: list[Any]):
        self.source_id = source_id
        self.rows = {r[ROW_ID]: r for r in rows}

    def match(self, node_id: int, name: str, kind: str, fn_d: str | None, in_d: str | None):
        """The old row node ``node_id`` may take its output from, or None."""
        old = self.rows.get(node_id)
        if old is None or fn_d is None or in_d is None:
            return None
        if old[ROW_STATUS] != "COMPLETED" or old[ROW_NAME] != name or old[ROW_KIND] != kind:
            return None
        if old[ROW_FN] != fn_d or old[ROW_IN] != in_d or not old[ROW_OUT]:
            return None
        return old

    def plan(self, graph: Any, param_digests: dict[int, str]) -> dict[int, tuple]:
        """The nodes of ``graph`` (a new dispatch) that take an earlier output, decided
        before it starts: ``{node_id: (old_row, fn_digest, in_digest)}``. A node qualifies
        when its parents' outputs are known (parameters, or nodes that qualify) and
        ``match`` says so; a sublattice never does as a whole (its child dispatch reuses its
        earlier child's nodes)."""
        from ..graph import PARAMETER, SUBLATTICE

        outs: dict[int, str | None] = dict(param_digests)
        out_of = outs.get
        cache: dict[int, tuple[Any, str | None]] = {}
        found: dict[int, tuple] = {}
        rows = self.rows
        order = graph.nodes if _in_id_order(graph) else _topological(graph)
        for node in order:
            kind = node.kind
            if kind == PARAMETER or kind == SUBLATTICE:
                continue
            # the checks of ``match``, cheapest first (most nodes of a resume qualify)
            old = rows.get(node.id)
            if (
                old is None or old[ROW_STATUS] != "COMPLETED" or old[ROW_NAME] != node.name
                or old[ROW_KIND] != kind or not old[ROW_OUT]
            ):
                continue
            # ``in_digest`` inline for the usual node (arguments that are all outputs)
            parts = None if node.kwargs else [
                out_of(a.node_id) if type(a) is Ref else _NOT_REF for a in node.args
            ]
            if parts is None or _NOT_REF in parts:
                in_d = in_digest(node.args, node.kwargs, out_of)
            elif None in parts:
                continue
            else:
                in_d = hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()
            if in_d is None or in_d != old[ROW_IN]:
                continue
            if kind == ELECTRON:  # ``node_fn_digest``, its cache looked up here
                fn = node.fn
                got = cache.get(id(fn))
                if got is None or got[0] is not fn:
                    got = cache[id(fn)] = (fn, fn_digest(fn))
                fn_d = got[1]
            else:
                fn_d = node_fn_digest(node)
            if fn_d is None or fn_d != old[ROW_FN]:
                continue
            outs[node.id] = old[ROW_OUT]
            found[node.id] = (old, fn_d, in_d)
        return found

    def child_source(self, node_id: int, name: str) -> str | None:
        """The child dispatch of the old sublattice node ``node_id`` (same name), if any."""
        old = self.rows.get(node_id)
        if old is not None and old[ROW_NAME] == name and old[ROW_SUB]:
            return old[ROW_SUB]
        for r in self.rows.values():
            if r[ROW_NAME] == name and r[ROW_SUB]:
                return r[ROW_SUB]
        return None
