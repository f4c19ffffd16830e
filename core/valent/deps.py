"""What runs with an electron, in its own process: shell commands, pip packages, calls.

``@ct.electron(deps_bash=..., deps_pip=..., call_before=..., call_after=...)`` (Covalent's
names) wraps the electron's function into one callable (:class:`valent._hooked.HookedCall`),
which the executor runs like any task function. So the commands, the package install, the
calls and the body run in the task's process, on the task's executor (Local, Dask, SSH
alike), and a cancel that kills the task kills them too: a ``sleep`` in a ``DepsBash`` is in
the task's process group.

Order, as in Covalent: ``deps_bash``, ``deps_pip``, each ``call_before`` (a
``retval_keyword`` passes its return value to the task as that keyword argument), the body,
each ``call_after`` (only when the body returned).

``DepsPip`` never installs into the running environment. The requirement set is installed
once, with ``pip install --target``, into a directory named by a digest of the set (and the
Python version and platform) under ``$VALENT_DEPS_CACHE`` (default
``~/.cache/valent/deps``) on the machine that runs the task; every task asking for the same
set reuses it. While the task runs, that directory is first on ``sys.path`` (and on
``PYTHONPATH`` for the subprocesses it starts); afterwards the process's path and modules
are as before. When the running environment already satisfies every requirement, nothing is
installed. A file lock makes parallel tasks wait for one build instead of building twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle

from . import _hooked
from ._hooked import DependencyError, HookedCall
from .errors import ValentError

# the task side travels by value: valent need not be installed where the task runs
cloudpickle.register_pickle_by_value(_hooked)

RESERVED_RETVAL_KEYS = ("files",)

__all__ = ["DependencyError", "DepsBash", "DepsCall", "DepsPip", "Hooks", "make_hooks"]


# ---------------------------------------------------------------------- the three kinds


class DepsBash:
    """Shell commands run (in order, each with ``bash -c``) right before the electron, in its
    process tree. A command that exits non-zero fails the task, with its output in the error.

    :param commands: one command or a list of them.
    """

    def __init__(self, commands: list[str] | str = ()):  # type: ignore[assignment]
        self.commands = [commands] if isinstance(commands, str) else list(commands)
        for cmd in self.commands:
            if not isinstance(cmd, str):
                raise ValentError(f"DepsBash: each command must be a string, got {cmd!r}")

    def part(self) -> tuple:
        return ("bash", list(self.commands))

    def __repr__(self) -> str:
        return f"DepsBash({self.commands!r})"


class DepsPip:
    """PyPI packages the electron needs, installed into a cached directory of their own (never
    into the running environment) and put first on the task's ``sys.path``.

    :param packages: requirement strings (``"numpy==1.26.4"``, ``"requests>=2"``).
    :param reqs_path: a requirements file, read now (it need not exist where the task runs);
        used instead of ``packages`` when given. pip options in it (``--find-links``,
        ``--no-index``, ``--index-url``) apply.
    :param pip_args: extra arguments for ``pip install`` (valent's addition).
    :param cache_dir: where the installed sets live on the machine that runs the task
        (default ``$VALENT_DEPS_CACHE``, else ``~/.cache/valent/deps``).
    """

    def __init__(
        self,
        packages: list[str] | str = (),  # type: ignore[assignment]
        reqs_path: str = "",
        *,
        pip_args: Iterable[str] = (),
        cache_dir: str | None = None,
    ):
        self.packages = [packages] if isinstance(packages, str) else list(packages)
        for pkg in self.packages:
            if not isinstance(pkg, str) or not pkg.strip():
                raise ValentError(
                    f"DepsPip: each package must be a requirement string, got {pkg!r}"
                )
        self.reqs_path = str(reqs_path or "")
        self.requirements_content = ""
        if self.reqs_path:
            try:
                self.requirements_content = Path(self.reqs_path).read_text()
            except OSError as exc:
                raise ValentError(
                    f"DepsPip: cannot read the requirements file {self.reqs_path!r}: {exc}"
                ) from None
        self.pip_args = [str(a) for a in pip_args]
        self.cache_dir = cache_dir
        if not self.packages and not self.requirements_content.strip():
            raise ValentError("DepsPip: give packages=[...] or reqs_path= (both are empty)")

    def lines(self) -> list[str]:
        """The requirement set, one requirement or pip option a line."""
        if self.requirements_content:
            return [
                line.split(" #")[0].strip()
                for line in self.requirements_content.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
        return list(self.packages)

    def spec(self) -> dict[str, Any]:
        return {
            "lines": self.lines(),
            "packages": list(self.packages),
            "requirements_content": self.requirements_content,
            "pip_args": list(self.pip_args),
            "cache_dir": self.cache_dir,
        }

    def part(self) -> tuple:
        return ("pip", self.spec())

    def digest(self) -> str:
        """Names the installed set: the requirements, pip's arguments, Python and platform."""
        return _hooked.pip_digest(self.spec())

    def satisfied(self) -> bool:
        """True when the running environment already has every requirement."""
        return _hooked.pip_satisfied(self.lines())

    def __repr__(self) -> str:
        what = f"reqs_path={self.reqs_path!r}" if self.reqs_path else repr(self.packages)
        return f"DepsPip({what})"


class DepsCall:
    """A function called in the electron's process, before it (``call_before=``) or after it
    (``call_after=``). With ``retval_keyword``, a ``call_before``'s return value is passed to
    the electron as that keyword argument.
    """

    def __init__(
        self,
        func: Callable[..., Any] | None = None,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        retval_keyword: str = "",
        override_reserved_retval_keys: bool = False,
    ):
        if not callable(func):
            raise ValentError(f"DepsCall needs a function to call, got {func!r}")
        if retval_keyword in RESERVED_RETVAL_KEYS and not override_reserved_retval_keys:
            raise ValentError(
                f"DepsCall: retval_keyword {retval_keyword!r} is reserved; use another name"
            )
        self.func = func
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.retval_keyword = retval_keyword

    def part(self) -> tuple:
        return ("call", self.func, self.args, self.kwargs, self.retval_keyword)

    def __repr__(self) -> str:
        return f"DepsCall({getattr(self.func, '__name__', self.func)!r})"


Step = DepsBash | DepsPip | DepsCall


# ---------------------------------------------------------------------- on the electron


class Hooks:
    """An electron's steps before and after its body, in the order they run."""

    def __init__(self, before: list[Step], after: list[Step]):
        self.before = before
        self.after = after
        self.retval_keywords = {
            s.retval_keyword for s in before if isinstance(s, DepsCall) and s.retval_keyword
        }

    def wrap(self, fn: Callable[..., Any], name: str) -> HookedCall:
        parts = [s.part() for s in self.before] + [("body", fn)]
        return HookedCall(name, parts + [s.part() for s in self.after])


def make_hooks(
    name: str, deps_bash: Any, deps_pip: Any, call_before: Any, call_after: Any
) -> Hooks | None:
    """The electron's :class:`Hooks` from the decorator's arguments (None when there are none)."""
    before: list[Step] = []
    if deps_bash is not None:
        if isinstance(deps_bash, str | list | tuple):
            deps_bash = DepsBash(list(deps_bash) if not isinstance(deps_bash, str) else deps_bash)
        if not isinstance(deps_bash, DepsBash):
            raise ValentError(
                f"@electron {name}: deps_bash must be a command, a list of commands or "
                f"ct.DepsBash([...]), got {deps_bash!r}"
            )
        if deps_bash.commands:
            before.append(deps_bash)
    if deps_pip is not None:
        if isinstance(deps_pip, str | list | tuple):
            deps_pip = DepsPip(list(deps_pip) if not isinstance(deps_pip, str) else deps_pip)
        if not isinstance(deps_pip, DepsPip):
            raise ValentError(
                f"@electron {name}: deps_pip must be ct.DepsPip(packages=[...]) or a list of "
                f"requirement strings, got {deps_pip!r}"
            )
        before.append(deps_pip)
    before += _steps(name, "call_before", call_before)
    after = _steps(name, "call_after", call_after)
    return Hooks(before, after) if before or after else None


def _steps(name: str, what: str, value: Any) -> list[Step]:
    if value is None:
        return []
    items = list(value) if isinstance(value, list | tuple) else [value]
    for item in items:
        if not isinstance(item, DepsCall | DepsBash | DepsPip):
            raise ValentError(
                f"@electron {name}: {what} takes ct.DepsCall(func, args=..., kwargs=...) (or "
                f"ct.DepsBash / ct.DepsPip), or a list of them; got {item!r}"
            )
    return items
