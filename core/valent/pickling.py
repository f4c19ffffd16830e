"""Pickling a task's function so that its tracebacks still name the user's file and line.

cloudpickle pickles a function defined in ``__main__`` (a script, a notebook cell) or inside
another function by value, and since cloudpickle 3.1 it writes every such code object with
the file name ``"<dynamic-code>"`` (for byte-identical pickles wherever the function was
defined). A task that raised then showed ``File "<dynamic-code>", line 6, in boom``. Here
the code keeps its real ``co_filename``, so a traceback shows ``File "/home/me/flow.py",
line 6, in boom`` and, where the file is readable (any Local or Dask worker on this machine),
the line of source too.
"""

from __future__ import annotations

import copyreg
import io
import types
from collections import ChainMap
from typing import Any

import cloudpickle

_DYNAMIC = "<dynamic-code>"


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's own reduction of a code object, with its real file name put back."""
    base = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
    if base is None:  # a cloudpickle that leaves code objects to the default: it keeps names
        return copyreg.dispatch_table[types.CodeType](code)  # pragma: no cover
    rv = base(code)
    ctor, args = rv[0], rv[1]
    if _DYNAMIC in args and code.co_filename != _DYNAMIC:
        i = args.index(_DYNAMIC)  # co_filename: the first str among the code's arguments
        args = (*args[:i], code.co_filename, *args[i + 1 :])
    return (ctor, args, *rv[2:])


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(
        {types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table
    )


def dumps(obj: Any, protocol: int = 5) -> bytes:
    """``cloudpickle.dumps(obj)``, except that functions pickled by value keep their file name.

    Use it for task functions (and anything that holds them) sent to a worker process.
    """
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()
