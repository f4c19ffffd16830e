"""valent's exceptions: one root, specific subclasses that say how to fix the problem."""

from __future__ import annotations


class ValentError(Exception):
    """Root of every error valent raises on purpose."""


class UnknownExecutorError(ValentError, LookupError):
    """An executor name that no installed plugin provides."""

    def __init__(self, name: str, installed: list[str]):
        self.name = name
        self.installed = sorted(installed)
        names = ", ".join(repr(n) for n in self.installed) or "none"
        super().__init__(
            f"unknown executor {name!r}; installed executors: {names}. "
            "Check the spelling, or install the plugin package that provides it "
            "(`valent plugins` lists what is installed)."
        )


class UnknownDispatchError(ValentError, LookupError):
    """A dispatch id (or id prefix) that the results store does not hold."""

    def __init__(self, dispatch_id: str, where: str, detail: str = ""):
        self.dispatch_id = dispatch_id
        msg = f"no dispatch {dispatch_id!r} in the results store at {where}"
        if detail:
            msg += f" ({detail})"
        msg += "; check the id (`valent list` shows recent ones) or VALENT_RESULTS_DIR."
        super().__init__(msg)


class PicklingError(ValentError):
    """A value that must cross a process boundary cannot be pickled."""


class TracingError(ValentError, TypeError):
    """Something done to an electron's output while building a lattice that cannot work then."""


class ConfigError(ValentError):
    """A bad configuration file, section, key or value."""


class PluginError(ValentError):
    """A plugin that fails to load, clashes with another, or breaks the hook contract."""


class ExecutorError(ValentError):
    """An executor could not do what was asked (start, reach its host, ...)."""


class TaskTimeoutError(ValentError, TimeoutError):
    """A task ran longer than its electron's ``timeout``; it was stopped."""


class WorkerDiedError(ValentError):
    """The process running a task died before the task finished."""


class StoreError(ValentError):
    """The results store cannot be opened or written."""


class DispatchTimeoutError(ValentError, TimeoutError):
    """``get_result(wait=True, timeout=...)`` ran out of time; the dispatch goes on."""
