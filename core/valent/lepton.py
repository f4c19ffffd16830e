"""``ct.Lepton``: an electron whose body is a bash command, a C function or a Python function
named by module, as Covalent has them.

A lepton is an :class:`~valent.graph.Electron`: it takes ``executor=``, ``deps_bash=``,
``deps_pip=``, ``call_before=``, ``call_after=`` (``timeout=`` and ``retries=`` too), runs
on any executor, and is cancelled like any task: a bash lepton's shell is in the task's
process group, so a cancel kills it. The foreign call itself is in
:mod:`valent._leptonrun` (standard library only, shipped by value).

- ``language="bash"``: ``command`` (a string, or a list joined with ``&&``) or
  ``library_name`` (a script to source) + ``function_name``. Keyword arguments are exported
  as environment variables and fill ``{name}`` fields of the command; ``named_outputs`` are
  shell variables read back after the command, typed by the non-INPUT ``argtypes`` in order.
- ``language="C"``: ``library_name`` (a shared library) + ``function_name``; ``argtypes``
  are ctypes types (``c_int32``, ``POINTER(c_int32)``) with INPUT / OUTPUT / INPUT_OUTPUT;
  the OUTPUT and INPUT_OUTPUT values are returned. Compile it where the task runs with
  ``deps_bash=["gcc -shared -fPIC -o libx.so x.c"]`` (or beforehand).
- ``language="python"``: ``library_name`` (a module) + ``function_name``.
"""

from __future__ import annotations

from typing import Any

import cloudpickle

from . import _leptonrun
from ._leptonrun import CCall, LeptonError, PythonCall, ShellCall
from .errors import ValentError
from .graph import Electron, ExecutorSpec

cloudpickle.register_pickle_by_value(_leptonrun)

_PY = ("python", "Python")
_C = ("C", "c")
_SHELL = ("bash", "shell")

__all__ = ["Lepton", "LeptonError"]


class Lepton(Electron):
    """A task in another language (or a Python function named by module), used like an
    electron inside a lattice."""

    INPUT = _leptonrun.INPUT
    OUTPUT = _leptonrun.OUTPUT
    INPUT_OUTPUT = _leptonrun.INPUT_OUTPUT

    def __init__(
        self,
        language: str = "python",
        *,
        library_name: str = "",
        function_name: str = "",
        argtypes: list[tuple[Any, int]] | None = None,
        command: str | list[str] = "",
        named_outputs: list[str] | None = None,
        display_name: str = "",
        executor: ExecutorSpec = None,
        deps_bash: Any = None,
        deps_pip: Any = None,
        call_before: Any = None,
        call_after: Any = None,
        timeout: float | None = None,
        retries: int = 0,
    ):
        if isinstance(command, list | tuple):
            command = " && ".join(command)
        named_outputs = list(named_outputs or [])
        types = []
        for item in argtypes or []:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise ValentError(
                    f"Lepton: each argtype is (type, Lepton.INPUT|OUTPUT|INPUT_OUTPUT), got "
                    f"{item!r}"
                )
            t, attr = item
            if attr not in (self.INPUT, self.OUTPUT, self.INPUT_OUTPUT):
                raise ValentError(
                    f"Lepton: {item!r}: the second item must be Lepton.INPUT, Lepton.OUTPUT "
                    "or Lepton.INPUT_OUTPUT"
                )
            types.append((getattr(t, "__name__", str(t)), attr))
        name = display_name or function_name or command
        if language in _SHELL:
            if command and library_name:
                raise ValentError("Lepton: give command or library_name, not both")
            if not (command or library_name):
                raise ValentError("Lepton(language='bash'): give command= or library_name=")
            outs = [t for t, a in types if a != self.INPUT]
            if len(outs) != len(named_outputs):
                raise ValentError(
                    f"Lepton {name!r}: {len(outs)} OUTPUT/INPUT_OUTPUT argtypes but "
                    f"{len(named_outputs)} named_outputs; give one name per output"
                )
            inout = sum(1 for _, a in types if a == self.INPUT_OUTPUT)
            fn: Any = ShellCall(
                name, command, library_name, function_name, outs, named_outputs, inout
            )
        elif language in _PY + _C:
            if command or named_outputs:
                raise ValentError(
                    f"Lepton(language={language!r}): command= and named_outputs= are for bash"
                )
            if not (library_name and function_name):
                raise ValentError(
                    f"Lepton(language={language!r}): give library_name= and function_name="
                )
            if language in _PY:
                fn = PythonCall(name, library_name, function_name)
            else:
                fn = CCall(name, library_name, function_name, types)
        else:
            raise ValentError(
                f"Lepton: language {language!r} is not supported; use 'python', 'C' or 'bash'"
            )
        hooks = None
        if any(v is not None for v in (deps_bash, deps_pip, call_before, call_after)):
            from .deps import make_hooks

            hooks = make_hooks(name, deps_bash, deps_pip, call_before, call_after)
            if hooks is not None and hooks.retval_keywords:
                raise ValentError(
                    f"Lepton {name!r}: a DepsCall's retval_keyword cannot pass a value into a "
                    "lepton (as in Covalent); drop retval_keyword"
                )
        super().__init__(fn, executor, timeout, retries, hooks)
        self.language = language
        self.library_name = library_name
        self.function_name = function_name
        self.argtypes = types
        self.command = command
        self.named_outputs = named_outputs
        self.display_name = display_name

    def __repr__(self) -> str:
        return f"<lepton {self.language} {self.name}>"
