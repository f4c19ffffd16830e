"""A built-in observer plugin: meters run/poll/cancel of every executor (pluggy wrappers).

Opt-in: ``valent.timing.enable()`` in a program, or ``VALENT_TIMING=1`` in the environment
(which also prints the table to stderr at exit). It shows how any plugin can wrap the
run/poll/cancel hooks of every executor, its own or another's::

    import valent.timing
    meter = valent.timing.enable()
    ... dispatch workflows ...
    print(meter.report())

Per executor name it counts calls of each hook and their time (how long the dispatcher
thread spent inside the executor: run and cancel must not block), and per task the wall
time from ``run`` to the poll that saw it final, by final state.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ._plugins.contract import Executor, Wake
from ._plugins.manager import get_plugins, hookimpl
from .status import CancelOutcome
from .task import Task, TaskState

ENV = "VALENT_TIMING"
PLUGIN_NAME = "valent.timing"


@dataclass
class Meter:
    """Count, total and maximum of some durations, in seconds."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class Timing:
    """The plugin object: wrappers around ``valent_run``, ``valent_poll``, ``valent_cancel``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[tuple[str, str], Meter] = {}
        """(executor name, "run" | "poll" | "cancel" | "cancel_many") -> time in the hook."""
        self.tasks: dict[tuple[str, str], Meter] = {}
        """(executor name, final state name) -> wall time from run to final."""
        self._open: dict[int, tuple[Any, float]] = {}

    def _add(self, table: dict[tuple[str, str], Meter], key: tuple[str, str], s: float) -> None:
        with self._lock:
            table.setdefault(key, Meter()).add(s)

    @hookimpl(wrapper=True)
    def valent_run(self, executor: Executor, task: Task, wake: Wake) -> Generator[None, Any, Any]:
        t0 = time.perf_counter()
        try:
            handle = yield
        finally:
            self._add(self.calls, (executor.name, "run"), time.perf_counter() - t0)
        with self._lock:
            self._open[id(handle)] = (handle, t0)  # keeps the handle, so its id stays unique
        return handle

    @hookimpl(wrapper=True)
    def valent_poll(self, executor: Executor, handle: Any) -> Generator[None, Any, TaskState]:
        t0 = time.perf_counter()
        try:
            state = yield
        finally:
            self._add(self.calls, (executor.name, "poll"), time.perf_counter() - t0)
        if state is not None and state.final:
            with self._lock:
                opened = self._open.pop(id(handle), None)
            if opened is not None and opened[0] is handle:
                self._add(self.tasks, (executor.name, type(state).__name__), t0 - opened[1])
        return state

    @hookimpl(wrapper=True)
    def valent_cancel(
        self, executor: Executor, handle: Any
    ) -> Generator[None, Any, CancelOutcome]:
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            self._add(self.calls, (executor.name, "cancel"), time.perf_counter() - t0)

    @hookimpl(wrapper=True)
    def valent_cancel_many(
        self, executor: Executor, handles: list[Any]
    ) -> Generator[None, Any, list[CancelOutcome]]:
        t0 = time.perf_counter()
        try:
            return (yield)
        finally:
            self._add(self.calls, (executor.name, "cancel_many"), time.perf_counter() - t0)

    def report(self) -> str:
        """The meters as a plain-text table."""
        with self._lock:
            calls = sorted(self.calls.items())
            tasks = sorted(self.tasks.items())
        lines = [f"{'executor':<12} {'hook':<10} {'calls':>7} {'mean ms':>9} {'max ms':>9}"]
        for (name, hook), m in calls:
            lines.append(
                f"{name:<12} {hook:<10} {m.count:>7} {m.mean * 1e3:>9.3f} {m.max * 1e3:>9.3f}"
            )
        lines.append(f"{'executor':<12} {'task end':<10} {'tasks':>7} {'mean s':>9} {'max s':>9}")
        for (name, end), m in tasks:
            lines.append(f"{name:<12} {end:<10} {m.count:>7} {m.mean:>9.3f} {m.max:>9.3f}")
        return "\n".join(lines)


def enable() -> Timing:
    """Register the timing plugin (once) in this process's plugin manager and return it."""
    pm = get_plugins().pm
    plugin = pm.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = Timing()
        pm.register(plugin, name=PLUGIN_NAME)
    return plugin


def disable() -> None:
    """Unregister the timing plugin, if it is registered."""
    pm = get_plugins().pm
    plugin = pm.get_plugin(PLUGIN_NAME)
    if plugin is not None:
        pm.unregister(plugin, PLUGIN_NAME)


def enabled_by_env() -> bool:
    """True when ``VALENT_TIMING`` is set to something other than ``""``/``0``/``false``."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def register_from_env(pm: Any) -> None:
    """Called while plugins load: with ``VALENT_TIMING=1``, meter and report at exit."""
    if not enabled_by_env() or pm.get_plugin(PLUGIN_NAME) is not None:
        return
    plugin = Timing()
    pm.register(plugin, name=PLUGIN_NAME)
    atexit.register(lambda: print(plugin.report(), file=sys.stderr) if plugin.calls else None)
