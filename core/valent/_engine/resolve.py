"""Which executor runs a node: decided here, once, for dispatch, the dispatcher and the CLI.

A node runs on its electron's executor, else its lattice's, else the config file's
``default_executor`` (``"local"``). A name means the process's shared instance of the class
registered under that name, made on first use with the config file's ``[executors.NAME]``
settings; an instance is used as it is, whether or not a plugin registered its class.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any

from .._plugins.contract import Executor
from .._plugins.manager import Plugins

ExecutorSpec = str | Executor


def executor_spec(
    electron: Any, lattice_executor: ExecutorSpec | None, default: str | None = None
) -> ExecutorSpec:
    """The executor a node asks for: its electron's, else its lattice's, else ``default``
    (read from the config file when not given)."""
    spec = electron.executor if electron is not None else None
    if spec is None:
        spec = lattice_executor
    if spec is None:
        if default is None:
            from ..config import default_executor_name

            default = default_executor_name()
        spec = default
    return spec


def executor_label(spec: ExecutorSpec) -> str:
    """The name the store and the CLI show for ``spec``."""
    return spec if isinstance(spec, str) else spec.name


def make_executor(plugins: Plugins, name: str) -> Executor:
    """A new executor of the class registered as ``name``, with the config's settings.

    Raises ``UnknownExecutorError``/``PluginError`` for a name no plugin provides and
    ``ConfigError`` for settings the class rejects.
    """
    from ..config import executor_from_config

    return executor_from_config(name, plugins.executor_class(name))


class Executors:
    """The executors one process uses: a shared instance per name and every instance seen.

    Thread-safe: ``dispatch`` resolves a graph's executors in the caller's thread (so a bad
    name or setting fails at once), the dispatcher's thread only reads what was resolved.
    """

    def __init__(self, plugins: Callable[[], Plugins]):
        self._plugins = plugins
        self._lock = threading.Lock()
        self._named: dict[str, Executor] = {}
        self._used: dict[int, Executor] = {}

    def resolve(self, spec: ExecutorSpec) -> Executor:
        """The executor for ``spec`` (a name or an instance), made on first use of a name."""
        if isinstance(spec, Executor):
            with self._lock:
                if id(spec) not in self._used:
                    from ..config import validate_executor

                    validate_executor(spec)  # finite settings within the class's bounds
                    self._used[id(spec)] = spec
            return spec
        with self._lock:
            ex = self._named.get(spec)
            if ex is not None:
                # made earlier: the config file may have changed since; a bad table still
                # fails this dispatch at once (the shared instance keeps its settings)
                from ..config import executor_settings

                executor_settings(spec, type(ex))
            else:
                ex = make_executor(self._plugins(), spec)
                self._named[spec] = ex
                self._used[id(ex)] = ex
            return ex

    def named(self, name: str) -> Executor | None:
        """The shared instance made for ``name``, if any was."""
        with self._lock:
            return self._named.get(name)

    def shutdown(self) -> None:
        """Shut down every executor used (at interpreter exit)."""
        with self._lock:
            used = list(self._used.values())
        for ex in used:
            try:
                ex.shutdown()
            except Exception:
                traceback.print_exc()
