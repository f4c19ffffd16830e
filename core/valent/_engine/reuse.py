"""What a node's previous run can stand in for: digests, and the table a redispatch reuses.

Each node stores, when it completes, three digests:

- ``fn_digest``: of its function pickled *by value* (the code of a function in a module of
  yours, not just its name: an edited function is a different function);
- ``in_digest``: of its resolved inputs, made of its parents' ``out_digest`` by position
  and keyword (a parent's output is the input);
- ``out_digest``: of its pickled output (the bytes the store keeps).

A redispatch with ``reuse_previous_results=True`` gives node N the output of node N of the
earlier dispatch iff that one COMPLETED, has the same name and kind, and both digests are the
same. A value whose pickle differs between processes (a set of strings under another hash
seed) is simply not reused: a digest never says "same" for different inputs.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..graph import Ref

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
    """The digest of a task function pickled by value (None when it cannot be pickled)."""
    inner = getattr(fn, "__wrapped__", fn)
    try:
        return blob_digest(dumps_by_value(fn, [getattr(inner, "__module__", None)]))
    except Exception:  # noqa: BLE001 - an unpicklable function is never reused
        return None


def in_digest(
    args: tuple, kwargs: dict, out_digests: Callable[[int], str | None]
) -> str | None:
    """The digest of a node's inputs: its arguments' parents' output digests (None when a
    parent has none, so the node is never reused)."""
    parts = []
    for i, a in enumerate(args):
        d = _arg_digest(a, out_digests)
        if d is None:
            return None
        parts.append(f"{i}={d}")
    for k, a in kwargs.items():
        d = _arg_digest(a, out_digests)
        if d is None:
            return None
        parts.append(f"{k!r}={d}")
    return hashlib.blake2b(";".join(parts).encode(), digest_size=16).hexdigest()


def _arg_digest(a: Any, out_digests: Callable[[int], str | None]) -> str | None:
    if isinstance(a, Ref):
        return out_digests(a.node_id)
    try:
        return blob_digest(cloudpickle.dumps(a, protocol=5))
    except Exception:  # noqa: BLE001
        return None


class Reuse:
    """The earlier dispatch a redispatch may take outputs from (``reuse_previous_results``).

    ``rows`` are its node rows (with outputs), by node id.
    """

    def __init__(self, source_id: str, rows: list[Any]):
        self.source_id = source_id
        self.rows = {r["node_id"]: r for r in rows}

    def match(self, node_id: int, name: str, kind: str, fn_d: str | None, in_d: str | None):
        """The old row node ``node_id`` may take its output from, or None."""
        old = self.rows.get(node_id)
        if old is None or fn_d is None or in_d is None:
            return None
        if old["status"] != "COMPLETED" or old["name"] != name or old["kind"] != kind:
            return None
        if old["fn_digest"] != fn_d or old["in_digest"] != in_d:
            return None
        return old

    def child_source(self, node_id: int, name: str) -> str | None:
        """The child dispatch of the old sublattice node ``node_id`` (same name), if any."""
        old = self.rows.get(node_id)
        if old is not None and old["name"] == name and old["sub_dispatch_id"]:
            return old["sub_dispatch_id"]
        for r in self.rows.values():
            if r["name"] == name and r["sub_dispatch_id"]:
                return r["sub_dispatch_id"]
        return None
