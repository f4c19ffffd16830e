"""The plugin manager: built lazily, loads the ``valent`` entry-point group, checks plugins.

Everything else in valent goes through :class:`Plugins` (a small typed facade over pluggy),
never through ``pm.hook`` directly.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownExecutorError
from .executor import Executor, Wake, check_executor_class
from .status import CancelOutcome
from .task import Task, TaskState

ENTRY_POINT_GROUP = "valent"
BUILTINS = {"local": "valent_local", "dask": "valent_dask", "ssh": "valent_ssh"}
DISABLE_ENV = "VALENT_DISABLE_PLUGINS"

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)


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


@dataclass
class ExecutorInfo:
    """An installed executor class and where it came from."""

    name: str
    cls: type[Executor]
    plugin: str
    distribution: str | None = None
    version: str | None = None


@dataclass
class Plugins:
    """The loaded plugins and the executors they provide."""

    pm: pluggy.PluginManager
    executors: dict[str, ExecutorInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One line per plugin that could not be loaded (shown by ``valent plugins``)."""

    def executor_class(self, name: str) -> type[Executor]:
        """The class registered under ``name``; ``UnknownExecutorError`` if none."""
        try:
            return self.executors[name].cls
        except KeyError:
            raise UnknownExecutorError(name, list(self.executors)) from None

    def run(self, executor: Executor, task: Task, wake: Wake) -> Any:
        return self.pm.hook.valent_run(executor=executor, task=task, wake=wake)

    def poll(self, executor: Executor, handle: Any) -> TaskState:
        return self.pm.hook.valent_poll(executor=executor, handle=handle)

    def cancel(self, executor: Executor, handle: Any) -> CancelOutcome:
        return self.pm.hook.valent_cancel(executor=executor, handle=handle)

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

    def register(self, plugin: Any, name: str, dist: metadata.Distribution | None = None) -> None:
        """Register one plugin object and the executors it provides; raise ``PluginError``."""
        where = f"plugin {name!r}" + (
            f" (distribution {dist.metadata['Name']} {dist.version})" if dist else ""
        )
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{where}: {exc}") from exc
        try:
            classes = self._classes_of(plugin)
            new: dict[str, ExecutorInfo] = {}
            for cls in classes:
                check_executor_class(cls, where)
                if cls.name in self.executors or cls.name in new:
                    other = self.executors.get(cls.name) or new[cls.name]
                    raise PluginError(
                        f"{where}: executor name {cls.name!r} is already provided by plugin "
                        f"{other.plugin!r}; rename one of them (names must be unique)"
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

    def _classes_of(self, plugin: Any) -> list[type[Executor]]:
        impl = getattr(plugin, "valent_executors", None)
        if impl is None:
            return []
        try:
            got = impl()
        except Exception as exc:
            raise PluginError(f"valent_executors() of {plugin!r} raised {exc!r}") from exc
        if got is None:
            return []
        if not isinstance(got, list | tuple):
            raise PluginError(f"valent_executors() must return a list of classes, got {got!r}")
        return list(got)


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def build_plugins() -> Plugins:
    """Make a plugin manager with the hookspecs, the entry-point plugins and the built-ins.

    A plugin that fails to import, clashes or breaks the contract is left out and recorded in
    ``problems``; the rest keep working. (pluggy's own ``load_setuptools_entrypoints`` stops at
    the first broken plugin, so valent walks the entry points itself.)
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    pm.register(_Defaults(), name="valent.defaults")
    disabled = _disabled()
    seen: set[str] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        if ep.name in disabled:
            continue
        dist = ep.dist
        label = f"entry point {ep.name!r} = {ep.value!r}" + (
            f" of distribution {dist.metadata['Name']} {dist.version}" if dist else ""
        )
        try:
            module = ep.load()
        except Exception as exc:
            plugins.problems.append(f"{label}: failed to import: {exc!r}")
            continue
        try:
            plugins.register(module, ep.name, dist)
        except PluginError as exc:
            plugins.problems.append(f"{label}: {exc}")
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
    return plugins


_lock = threading.Lock()
_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process's plugins, built on first use."""
    global _plugins
    if _plugins is None:
        with _lock:
            if _plugins is None:
                _plugins = build_plugins()
    return _plugins


def reset_plugins() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in a running process)."""
    global _plugins
    with _lock:
        _plugins = None
