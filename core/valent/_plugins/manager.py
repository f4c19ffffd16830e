"""The plugin manager: built lazily, loads the ``valent`` entry-point group, checks plugins.

Everything else in valent goes through :class:`Plugins` (a small typed facade over pluggy),
never through ``pm.hook`` directly.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..errors import PluginError, UnknownExecutorError
from ..status import CancelOutcome
from ..task import Task, TaskState
from . import hookspecs
from .contract import Executor, Wake, check_executor_class

ENTRY_POINT_GROUP = "valent"
BUILTINS = {"local": "valent_local", "dask": "valent_dask", "ssh": "valent_ssh"}
DISABLE_ENV = "VALENT_DISABLE_PLUGINS"

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)

try:  # pluggy's plain hook runner: another one in place means hook calls are traced
    from pluggy._callers import _multicall
except ImportError:  # another pluggy layout: always go through the hooks
    _multicall = None


class _Defaults:
    """valent's own last-resort implementations: call the executor's methods."""

    @hookimpl(trylast=True)
    def valent_run(self, executor: Executor, task: Task, wake: Wake) -> Any:
        return executor.run(task, wake)

    @hookimpl(trylast=True)
    def valent_poll(self, executor: Executor, handle: Any) -> TaskState:
        return executor.poll(handle)

    @hookimpl(trylast=True)
    def valent_cancel(self, executor: Executor, handle: Any) -> CancelOutcome:
        return executor.cancel(handle)

    @hookimpl(trylast=True)
    def valent_cancel_many(self, executor: Executor, handles: list[Any]) -> list[CancelOutcome]:
        return executor.cancel_many(handles)


@dataclass
class ExecutorInfo:
    """An installed executor class and where it came from."""

    name: str
    cls: type[Executor]
    plugin: str
    distribution: str | None = None
    version: str | None = None


class _DirectCalls:
    """The executor's own methods, called as valent's default hooks would call them."""

    @staticmethod
    def run(executor: Executor, task: Task, wake: Wake) -> Any:
        return executor.run(task, wake)

    @staticmethod
    def poll(executor: Executor, handle: Any) -> TaskState:
        return executor.poll(handle)

    @staticmethod
    def cancel_many(executor: Executor, handles: list[Any]) -> list[CancelOutcome]:
        return executor.cancel_many(handles)


_DIRECT = _DirectCalls()


@dataclass
class Plugins:
    """The loaded plugins and the executors they provide."""

    pm: pluggy.PluginManager
    executors: dict[str, ExecutorInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One line per plugin that could not be loaded (shown by ``valent plugins``)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Why a name (entry point or executor) is missing: its plugin's problem, or disabled."""

    def executor_class(self, name: str) -> type[Executor]:
        """The class registered under ``name``.

        Raises ``PluginError`` saying why when ``name`` belongs to a plugin that failed to
        load or is disabled, else ``UnknownExecutorError`` listing the installed names.
        """
        try:
            return self.executors[name].cls
        except KeyError:
            pass
        if name in self.unavailable:
            raise PluginError(f"executor {name!r} is not available: {self.unavailable[name]}")
        exc = UnknownExecutorError(name, list(self.executors))
        if self.problems:
            exc.add_note(
                f"{len(self.problems)} valent plugin(s) failed to load; `valent plugins` "
                "shows why."
            )
        raise exc

    def direct(self) -> bool:
        """True when valent's defaults are the only ``valent_run``/``valent_poll``/
        ``valent_cancel``/``valent_cancel_many`` implementations and nothing traces hook
        calls: calling the executor's own methods then does exactly what the hooks would,
        without pluggy's per-call cost (the dispatcher asks once per loop turn)."""
        if _multicall is None or getattr(self.pm, "_inner_hookexec", None) is not _multicall:
            return False  # hook calls are traced or monitored
        hook = self.pm.hook
        for caller in (
            hook.valent_run, hook.valent_poll, hook.valent_cancel, hook.valent_cancel_many
        ):
            impls = caller.get_hookimpls()
            if len(impls) != 1 or not isinstance(impls[0].plugin, _Defaults):
                return False
        return True

    def calls(self) -> Plugins | _DirectCalls:
        """What to call ``run``/``poll``/``cancel_many`` on: the executor's own methods when
        :meth:`direct` says the hooks would add nothing, else these hooks."""
        return _DIRECT if self.direct() else self

    def run(self, executor: Executor, task: Task, wake: Wake) -> Any:
        return self.pm.hook.valent_run(executor=executor, task=task, wake=wake)

    def poll(self, executor: Executor, handle: Any) -> TaskState:
        return self.pm.hook.valent_poll(executor=executor, handle=handle)

    def cancel(self, executor: Executor, handle: Any) -> CancelOutcome:
        return self.pm.hook.valent_cancel(executor=executor, handle=handle)

    def cancel_many(self, executor: Executor, handles: list[Any]) -> list[CancelOutcome]:
        """Cancel several tasks of one executor: through ``valent_cancel`` one by one, unless
        the executor batches (overrides ``cancel_many``): then one ``valent_cancel_many``."""
        if type(executor).cancel_many is Executor.cancel_many:
            return [self.cancel(executor, h) for h in handles]
        return self.pm.hook.valent_cancel_many(executor=executor, handles=handles)

    def node_status(self, dispatch_id: str, node_id: int, name: str, status: Any) -> None:
        self.pm.hook.valent_node_status(
            dispatch_id=dispatch_id, node_id=node_id, name=name, status=status
        )

    def dispatch_finished(self, dispatch_id: str, status: Any) -> None:
        self.pm.hook.valent_dispatch_finished(dispatch_id=dispatch_id, status=status)

    @property
    def has_observers(self) -> bool:
        """True when some plugin implements a lifecycle hook (else skip calling them)."""
        return bool(
            self.pm.hook.valent_node_status.get_hookimpls()
            or self.pm.hook.valent_dispatch_finished.get_hookimpls()
        )

    def register(
        self,
        plugin: Any,
        name: str,
        dist: metadata.Distribution | None = None,
        where: str | None = None,
    ) -> None:
        """Register one plugin object and the executors it provides.

        Raises ``PluginError`` (starting with ``where``, which names the plugin) when a hook
        has a wrong signature or an unknown name, ``valent_executors`` fails, or an executor
        class is incomplete or takes a name already in use; the plugin is then left out.
        """
        where = where or f"plugin {name!r}" + (
            f" (distribution {dist.metadata['Name']} {dist.version})" if dist else ""
        )
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            # pluggy leaves a half-registered plugin behind on a bad hook: take it out.
            if self.pm.get_plugin(name) is plugin:
                self.pm.unregister(plugin, name)
            raise PluginError(f"{where}: {_one_line(exc)}") from exc
        try:
            self._check_hook_names(plugin, where)
            classes = self._classes_of(plugin)
            new: dict[str, ExecutorInfo] = {}
            for cls in classes:
                check_executor_class(cls, where)
                if cls.name in self.executors or cls.name in new:
                    other = self.executors.get(cls.name) or new[cls.name]
                    raise PluginError(
                        f"{where}: executor name {cls.name!r} is already provided by plugin "
                        f"{other.plugin!r}"
                        + (f" of distribution {other.distribution}" if other.distribution else "")
                        + "; rename one of them (names must be unique); "
                        + "this plugin is left out"
                    )
                new[cls.name] = ExecutorInfo(
                    cls.name,
                    cls,
                    name,
                    dist.metadata["Name"] if dist else None,
                    dist.version if dist else None,
                )
        except BaseException:
            self.pm.unregister(plugin)
            raise
        self.executors.update(new)

    def _check_hook_names(self, plugin: Any, where: str) -> None:
        """A ``valent_*`` hookimpl that no hookspec declares is a typo: say which."""
        known = [n for n in dir(hookspecs) if n.startswith(f"{hookspecs.PROJECT}_")]
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.spec is None:
                close = difflib.get_close_matches(caller.name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PluginError(
                    f"{where}: implements {caller.name!r}, which is not a valent hook{hint}; "
                    f"the hooks are {', '.join(known)}"
                )

    def _classes_of(self, plugin: Any) -> list[type[Executor]]:
        impl = getattr(plugin, "valent_executors", None)
        if impl is None:
            return _covalent_module_classes(plugin)
        try:
            got = impl()
        except Exception as exc:
            raise PluginError(f"valent_executors() of {plugin!r} raised {exc!r}") from exc
        if got is None:
            return []
        if not isinstance(got, list | tuple):
            raise PluginError(f"valent_executors() must return a list of classes, got {got!r}")
        return [_as_executor_class(c) for c in got]


def _as_executor_class(cls: Any) -> Any:
    """A Covalent-style class (valent.executor.base) becomes its adapter class; others stay."""
    from ..executor.base import is_covalent_class

    if is_covalent_class(cls):
        from .._covalent_executor import adapter_class

        return adapter_class(cls)
    return cls


def _covalent_module_classes(module: Any) -> list[Any]:
    """A module laid out as a Covalent executor plugin (``executor_plugin_name = "Cls"``
    naming a Covalent-style class in it) provides that class."""
    name = getattr(module, "executor_plugin_name", None)
    if not isinstance(name, str):
        return []
    cls = getattr(module, name, None)
    if cls is None:
        raise PluginError(
            f"executor_plugin_name = {name!r} in {getattr(module, '__name__', module)!r}, but "
            "the module has no class of that name"
        )
    return [_as_executor_class(cls)]


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or repr(exc)


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.metadata["Name"] if ep.dist is not None else ""


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points, valent's own first, then by distribution and name.

    A fixed order makes "who wins a clash" (the first) the same on every machine.
    """
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: (_dist_name(ep) != "valent", _dist_name(ep), ep.name))


def build_plugins() -> Plugins:
    """Make a plugin manager with the hookspecs, the entry-point plugins and the built-ins.

    A plugin that fails to import, clashes or breaks the contract is left out and recorded in
    ``problems`` (naming its entry point and distribution); the rest keep working. (pluggy's
    own ``load_setuptools_entrypoints`` stops at the first broken plugin, so valent walks the
    entry points itself.) Names listed in ``VALENT_DISABLE_PLUGINS`` are not loaded.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    pm.register(_Defaults(), name="valent.defaults")
    disabled = _disabled()
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in _entry_points():
        dist = ep.dist
        label = f"entry point {ep.name!r} = {ep.value!r}" + (
            f" of distribution {dist.metadata['Name']} {dist.version}" if dist else ""
        )
        first = seen.get(ep.name)
        if first is not None:
            if (first.value, _dist_name(first)) != (ep.value, _dist_name(ep)):
                plugins.problems.append(
                    f"{label}: skipped, the name {ep.name!r} is already taken by entry point "
                    f"{first.value!r} of distribution {_dist_name(first) or '?'}; "
                    "entry-point names in group 'valent' must be unique"
                )
            continue  # (the same distribution found twice on sys.path is no problem)
        seen[ep.name] = ep
        if ep.name in disabled:
            plugins.unavailable[ep.name] = f"{label} is disabled by {DISABLE_ENV}"
            continue
        try:
            module = ep.load()
        except Exception as exc:
            problem = f"{label}: failed to import: {exc!r}"
            plugins.problems.append(problem)
            plugins.unavailable[ep.name] = problem
            continue
        before = set(plugins.executors)
        try:
            plugins.register(module, ep.name, dist, where=label)
        except PluginError as exc:
            problem = str(exc)
            plugins.problems.append(problem)
            plugins.unavailable.setdefault(ep.name, problem)
            for cls in _declared_classes(module):
                plugins.unavailable.setdefault(cls, problem)
            continue
        if not pm.get_hookcallers(module) and set(plugins.executors) == before:
            plugins.problems.append(
                f"{label}: module {getattr(module, '__name__', module)!r} has no "
                "@valent.hookimpl functions, so the plugin does nothing; does the entry "
                "point name the right module?"
            )
    # A checkout run without installing has no entry points: register the built-ins by name.
    for name, module_name in BUILTINS.items():
        if name in disabled or name in seen:
            continue
        try:
            module = importlib.import_module(module_name)
            plugins.register(module, name)
        except ImportError:
            continue
        except PluginError as exc:
            plugins.problems.append(str(exc))
    from ..timing import register_from_env  # the opt-in built-in observer (VALENT_TIMING=1)

    register_from_env(pm)
    return plugins


def _declared_classes(module: Any) -> list[str]:
    """Executor names a broken plugin's module declares (so selecting one says why)."""
    names = []
    for value in vars(module).values() if hasattr(module, "__dict__") else []:
        if isinstance(value, type) and issubclass(value, Executor) and value is not Executor:
            name = value.__dict__.get("name")
            if isinstance(name, str):
                names.append(name)
    return names


class PluginWarning(UserWarning):
    """Some installed valent plugin could not be loaded (the others work)."""


_lock = threading.Lock()
_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process's plugins, built on first use."""
    global _plugins
    if _plugins is None:
        with _lock:
            if _plugins is None:
                _plugins = build_plugins()
                if _plugins.problems:
                    warnings.warn(
                        PluginWarning(
                            f"{len(_plugins.problems)} valent plugin(s) left out: "
                            + "; ".join(_plugins.problems)
                            + " (`valent plugins` lists them)"
                        ),
                        stacklevel=2,
                    )
    return _plugins


def reset_plugins() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in a running process)."""
    global _plugins
    with _lock:
        _plugins = None
