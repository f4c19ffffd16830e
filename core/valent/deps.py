"""What runs with an electron, in its own process: shell commands, pip packages, calls.

``@ct.electron(deps_bash=..., deps_pip=..., call_before=..., call_after=...)`` (Covalent's
names) wraps the electron's function into one :class:`HookedCall`, which the executor runs
like any task function. So the commands, the package install, the calls and the body run in
the task's process, on the task's executor (Local, Dask, SSH alike), and a cancel that kills
the task kills them too: a ``sleep`` in a ``DepsBash`` is in the task's process group.

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

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import ValentError

RESERVED_RETVAL_KEYS = ("files",)
CACHE_ENV = "VALENT_DEPS_CACHE"
_DONE = "valent-deps.json"


class DependencyError(ValentError):
    """A task's dependency could not be set up (a bash command or a pip install failed)."""


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

    def run(self, where: str) -> None:
        shell = shutil.which("bash") or "/bin/sh"
        for cmd in self.commands:
            proc = subprocess.run(
                [shell, "-c", cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True
            )
            _echo(proc.stdout, proc.stderr)
            if proc.returncode != 0:
                raise DependencyError(
                    f"deps_bash of {where}: the command {cmd!r} exited with status "
                    f"{proc.returncode}{_tail(proc.stderr or proc.stdout)}"
                )

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

    def digest(self) -> str:
        """Names the installed set: the requirements, pip's arguments, Python and platform."""
        spec = {
            "v": 1,
            "python": sys.implementation.cache_tag,
            "platform": sysconfig.get_platform(),
            "lines": self.lines(),
            "pip_args": self.pip_args,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    def satisfied(self) -> bool:
        """True when the running environment already has every requirement (by
        ``importlib.metadata`` and the requirement's version specifier)."""
        try:
            from packaging.requirements import InvalidRequirement, Requirement
        except ImportError:  # pip vendors it
            try:
                from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
            except ImportError:
                return False
        from importlib import metadata

        for line in self.lines():
            if line.startswith("-"):
                if line.split()[0].split("=")[0] in _HARMLESS_OPTIONS:
                    continue
                return False  # -r, -e, -c ...: cannot tell
            try:
                req = Requirement(line)
            except InvalidRequirement:
                return False  # a URL or a path
            if req.marker is not None and not req.marker.evaluate():
                continue
            if req.url or req.extras:
                return False
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                return False
            if not req.specifier.contains(version, prereleases=True):
                return False
        return True

    def prepare(self, where: str) -> str | None:
        """Install the set (once) and return its directory; None when nothing is needed."""
        if self.satisfied():
            return None
        cache = Path(self.cache_dir or os.environ.get(CACHE_ENV) or _default_cache()).expanduser()
        key = self.digest()
        target = cache / f"pip-{key}"
        if (target / _DONE).exists():
            return str(target)
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f"pip-{key}.lock"):
            if (target / _DONE).exists():  # another task built it while this one waited
                return str(target)
            for stale in cache.glob(f"pip-{key}.tmp-*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp = cache / f"pip-{key}.tmp-{os.getpid()}"
            tmp.mkdir()
            cmd = [
                sys.executable, "-m", "pip", "install", "--no-input",
                "--disable-pip-version-check", "--target", str(tmp), *self.pip_args,
            ]
            if self.requirements_content:
                reqs = tmp.parent / f"pip-{key}.tmp-{os.getpid()}.txt"
                reqs.write_text(self.requirements_content)
                cmd += ["-r", str(reqs)]
            else:
                cmd += self.packages
            started = time.time()
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if self.requirements_content:
                reqs.unlink(missing_ok=True)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DependencyError(_pip_failure(where, self.lines(), proc))
            info = {"lines": self.lines(), "python": sys.version, "built_at": started}
            (tmp / _DONE).write_text(json.dumps(info))
            os.replace(tmp, target)
        print(f"valent: installed {' '.join(self.lines())} into {target}", file=sys.stderr)
        return str(target)

    def __repr__(self) -> str:
        what = f"reqs_path={self.reqs_path!r}" if self.reqs_path else repr(self.packages)
        return f"DepsPip({what})"


_HARMLESS_OPTIONS = {
    "--find-links", "-f", "--no-index", "--index-url", "-i", "--extra-index-url",
    "--trusted-host", "--pre", "--only-binary", "--prefer-binary", "--no-binary",
}


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

    def call(self) -> Any:
        return self.func(*self.args, **self.kwargs)

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
        return HookedCall(fn, name, self.before, self.after)


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


class HookedCall:
    """The electron's function with its steps around it, as one callable that an executor
    runs like any task function (cloudpickle-able; each part is unpickled only right before
    it runs, so a ``DepsPip`` set is on the path before the body's imports happen)."""

    def __init__(self, fn: Callable[..., Any], name: str, before: list[Step], after: list[Step]):
        self.name = name
        self._parts: list[Any] = [*before, fn, *after]
        self._nbefore = len(before)
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __getstate__(self) -> dict[str, Any]:
        parts = [p if isinstance(p, bytes) else cloudpickle.dumps(p) for p in self._parts]
        return {"name": self.name, "parts": parts, "nbefore": self._nbefore}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._parts = list(state["parts"])
        self._nbefore = state["nbefore"]
        self.__name__ = self.__qualname__ = self.name

    def _part(self, i: int) -> Any:
        # loaded afresh at each call (a warm worker keeps this object between tasks): imports
        # then resolve against this call's path, not against a set of an earlier call
        part = self._parts[i]
        return cloudpickle.loads(part) if isinstance(part, bytes) else part

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scope = _PathScope()
        try:
            for i in range(self._nbefore):
                step = self._part(i)
                value = self._run_step(step, "call_before", scope)
                if isinstance(step, DepsCall) and step.retval_keyword:
                    kwargs[step.retval_keyword] = value
            result = self._part(self._nbefore)(*args, **kwargs)
            for i in range(self._nbefore + 1, len(self._parts)):
                self._run_step(self._part(i), "call_after", scope)
            return result
        finally:
            scope.undo()

    def _run_step(self, step: Step, when: str, scope: _PathScope) -> Any:
        if isinstance(step, DepsBash):
            step.run(self.name)
        elif isinstance(step, DepsPip):
            path = step.prepare(self.name)
            if path is not None:
                scope.activate(path)
        else:
            try:
                return step.call()
            except Exception as exc:
                fname = getattr(step.func, "__name__", repr(step.func))
                exc.add_note(f"(raised by {when} {fname} of electron {self.name})")
                raise
        return None

    def __repr__(self) -> str:
        return f"<{self.name} with its deps and calls>"


# ---------------------------------------------------------------------- helpers


class _PathScope:
    """Directories put first on ``sys.path`` for one task, and how to undo that."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.shadowed: dict[str, Any] = {}
        self.pythonpath = os.environ.get("PYTHONPATH")

    def activate(self, path: str) -> None:
        provided = _top_level_names(path)
        for name, mod in list(sys.modules.items()):
            if name.partition(".")[0] in provided and not _loaded_from(mod, path):
                self.shadowed[name] = sys.modules.pop(name)  # the set's version is imported
        sys.path.insert(0, path)
        self.paths.append(path)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
        )
        importlib.invalidate_caches()

    def undo(self) -> None:
        if not self.paths:
            return
        for path in self.paths:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)
            for name, mod in list(sys.modules.items()):
                if _loaded_from(mod, path):
                    del sys.modules[name]
        sys.modules.update(self.shadowed)
        if self.pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self.pythonpath
        importlib.invalidate_caches()


def _top_level_names(path: str) -> set[str]:
    names = set()
    for entry in os.listdir(path):
        if entry.endswith((".dist-info", ".egg-info", ".data")) or entry in ("bin", "__pycache__"):
            continue
        names.add(entry.split(".")[0])
    return names


def _loaded_from(mod: Any, path: str) -> bool:
    where = getattr(mod, "__file__", None)
    if where is None:
        spec_paths = getattr(mod, "__path__", None)
        where = next(iter(spec_paths), None) if spec_paths is not None else None
    return isinstance(where, str) and where.startswith(path + os.sep)


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "valent", "deps")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` across processes (released if the holder dies)."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, builds may repeat
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _echo(out: str, err: str) -> None:
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
    if err:
        sys.stderr.write(err)
        sys.stderr.flush()


def _tail(text: str, lines: int = 15) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return ":\n" + "\n".join(text.splitlines()[-lines:])


def _pip_failure(where: str, lines: list[str], proc: subprocess.CompletedProcess) -> str:
    import re

    text = proc.stderr or proc.stdout or ""
    names = re.findall(
        r"(?:No matching distribution found for|satisfies the requirement) ([^\s(]+)", text
    )
    culprit = names[0] if names else None
    if culprit is None:
        m = re.search(r"(?:Failed to build|Failed building wheel for) ([^\s,]+)", text)
        culprit = m.group(1) if m else None
    what = f"the package {culprit!r}" if culprit else f"the set {' '.join(lines)!r}"
    return (
        f"deps_pip of {where}: pip could not install {what} (exit status {proc.returncode}). "
        f"Check the name and version, and that an index or --find-links can reach it"
        f"{_tail(text)}"
    )
