"""The task side of :mod:`valent.lepton`: calling a bash command, a C function or a function
of a Python module where the task runs.

Standard library only; :mod:`valent.lepton` registers it with cloudpickle to travel by value,
so a lepton runs on a host where valent is not installed (SSH), like any task. A bash lepton's
shell is a child of the task's process, in its process group: a cancel kills it with the task.
"""

from __future__ import annotations

import builtins
import shlex
import shutil
import subprocess
import sys
from typing import Any

INPUT, OUTPUT, INPUT_OUTPUT = 0, 1, 2
_MARK = "VALENT-LEPTON-OUTPUT-"


class LeptonError(RuntimeError):
    """A lepton's foreign call failed: its command exited non-zero, its library or function
    could not be loaded, or an output could not be read as its declared type."""


class PythonCall:
    """``module.function(*args, **kwargs)``, imported where the task runs."""

    def __init__(self, name: str, library_name: str, function_name: str):
        self.__name__ = self.__qualname__ = name
        self.library_name = library_name
        self.function_name = function_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        try:
            module = importlib.import_module(self.library_name)
        except ImportError as exc:
            raise LeptonError(
                f"lepton {self.__name__}: cannot import the module {self.library_name!r} "
                f"({exc}); make it importable where the task runs (install it, or add its "
                "folder to sys.path with call_before=ct.DepsCall(...))"
            ) from exc
        func = getattr(module, self.function_name, None)
        if not callable(func):
            raise LeptonError(
                f"lepton {self.__name__}: the module {self.library_name!r} has no function "
                f"{self.function_name!r}"
            )
        return func(*args, **kwargs)


class CCall:
    """A function of a C shared library, through ctypes. ``argtypes``: ``(ctypes type name,
    INPUT|OUTPUT|INPUT_OUTPUT)``; pointer types are ``LP_<type>``. Returns the OUTPUT and
    INPUT_OUTPUT values (one value, a tuple, or None)."""

    def __init__(self, name: str, library_name: str, function_name: str, argtypes: list):
        self.__name__ = self.__qualname__ = name
        self.library_name = library_name
        self.function_name = function_name
        self.argtypes = argtypes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import ctypes

        if kwargs:
            raise LeptonError(
                f"lepton {self.__name__}: a C function takes positional arguments only, got "
                f"keyword arguments {sorted(kwargs)}"
            )
        try:
            lib = ctypes.CDLL(self.library_name)
        except OSError as exc:
            raise LeptonError(
                f"lepton {self.__name__}: cannot load the shared library "
                f"{self.library_name!r}: {exc}. Build it first where the task runs (for "
                "example deps_bash=['gcc -shared -fPIC -o libx.so x.c'])"
            ) from exc
        try:
            func = getattr(lib, self.function_name)
        except AttributeError:
            raise LeptonError(
                f"lepton {self.__name__}: {self.library_name!r} has no function "
                f"{self.function_name!r}"
            ) from None
        types = [_ctype(ctypes, t) for t, _ in self.argtypes]
        attrs = [a for _, a in self.argtypes]
        inputs = sum(1 for a in attrs if a != OUTPUT)
        if len(args) != inputs:
            raise LeptonError(
                f"lepton {self.__name__}: takes {inputs} argument(s) (its INPUT and "
                f"INPUT_OUTPUT argtypes), got {len(args)}"
            )
        func.argtypes = types
        func.restype = None
        given = iter(args)
        c_args = []
        for t, attr in zip(types, attrs, strict=True):
            value = next(given) if attr != OUTPUT else None
            pointer = t.__name__.startswith("LP_")
            if pointer and isinstance(value, list | tuple):
                c_args.append((t._type_ * len(value))(*value))
            elif pointer:
                c_args.append(ctypes.pointer(t._type_(value) if value is not None else t._type_()))
            elif attr == INPUT:
                c_args.append(t(value))
            else:
                raise LeptonError(
                    f"lepton {self.__name__}: an OUTPUT or INPUT_OUTPUT argument must be a "
                    f"pointer type (POINTER(c_int32)), got {t.__name__}"
                )
        func(*c_args)
        out = []
        for arg, attr in zip(c_args, attrs, strict=True):
            if attr == INPUT:
                continue
            out.append(arg.contents.value if hasattr(arg, "contents") else [x for x in arg])
        return _pack(out)


def _ctype(ctypes: Any, name: str) -> Any:
    if name.startswith("LP_"):
        return ctypes.POINTER(getattr(ctypes, name[3:]))
    return getattr(ctypes, name)


class ShellCall:
    """A bash command (or a function of a sourced script). Keyword arguments are exported as
    environment variables and fill ``{name}`` fields of the command; positional ones are
    ``$1 ...``. ``named_outputs`` are read back as shell variables after the command, each
    converted to its declared type."""

    def __init__(
        self,
        name: str,
        command: str,
        library_name: str,
        function_name: str,
        out_types: list[str],
        named_outputs: list[str],
        inout_count: int,
    ):
        self.__name__ = self.__qualname__ = name
        self.command = command
        self.library_name = library_name
        self.function_name = function_name
        self.out_types = out_types
        self.named_outputs = named_outputs
        self.inout_count = inout_count

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shell = shutil.which("bash") or shutil.which("sh")
        if shell is None:
            raise LeptonError(f"lepton {self.__name__}: no bash or sh where the task runs")
        if len(kwargs) != self.inout_count:
            raise LeptonError(
                f"lepton {self.__name__}: expects {self.inout_count} keyword argument(s) (its "
                f"INPUT_OUTPUT argtypes), got {len(kwargs)}: {sorted(kwargs)}"
            )
        exports = "".join(f"export {k}={shlex.quote(str(v))} && " for k, v in kwargs.items())
        echo = "".join(
            f' && echo "{_MARK}{o}: ${{{o}}}"' for o in self.named_outputs
        )
        if self.command:
            try:
                body = self.command.format(**kwargs)
            except (KeyError, IndexError) as exc:
                raise LeptonError(
                    f"lepton {self.__name__}: the command names a field {exc} that is not a "
                    "keyword argument (write literal braces as {{ }})"
                ) from None
            cmd = [shell, "-c", f"{exports}{body}{echo}", "_", *map(str, args)]
        else:
            quoted = " ".join(shlex.quote(str(a)) for a in args)
            script = shlex.quote(self.library_name)
            cmd = [shell, "-c", f"{exports}source {script} && {self.function_name} {quoted}{echo}"]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        lines = []
        for line in proc.stdout.splitlines():
            if line.startswith(_MARK):
                continue
            lines.append(line)
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
        if proc.stderr:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise LeptonError(
                f"lepton {self.__name__}: the command exited with status {proc.returncode}"
                + (f": {proc.stderr.strip()}" if proc.stderr.strip() else "")
            )
        found = {}
        for line in proc.stdout.splitlines():
            if line.startswith(_MARK):
                key, _, value = line[len(_MARK):].partition(": ")
                found[key] = value
        out = []
        for name, type_name in zip(self.named_outputs, self.out_types, strict=True):
            convert = getattr(builtins, type_name, str)
            try:
                out.append(convert(found.get(name, "")))
            except (TypeError, ValueError) as exc:
                raise LeptonError(
                    f"lepton {self.__name__}: the output {name}={found.get(name)!r} is not a "
                    f"{type_name} ({exc})"
                ) from None
        return _pack(out)


def _pack(values: list) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
