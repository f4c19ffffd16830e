"""valent: run Python workflows on pluggable executors, and stop them for real.

``import valent as ct`` and write ``@ct.electron`` tasks and a ``@ct.lattice`` workflow; then
``ct.dispatch``, ``ct.get_result``, ``ct.cancel``. Plugin authors subclass ``ct.Executor``
and implement hooks with ``@ct.hookimpl``.
"""

from typing import TYPE_CHECKING, Any

from ._plugins.contract import Capabilities, Executor, Wake
from .cancel_token import cancel_requested
from .errors import (
    ConfigError,
    DispatchTimeoutError,
    ExecutorError,
    PicklingError,
    PluginError,
    StoreError,
    TaskTimeoutError,
    TracingError,
    UnknownDispatchError,
    UnknownExecutorError,
    ValentError,
    WorkerDiedError,
)
from .graph import electron, lattice, wait
from .status import CancelOutcome, Status
from .task import Cancelled, Completed, Failed, Pending, Running, Task, TaskState, Upstream

if TYPE_CHECKING:
    from . import executor, executors, fs, triggers
    from ._plugins.manager import hookimpl
    from ._redispatch import redispatch
    from .api import cancel, dispatch, dispatch_sync, get_result
    from .config import get_config, reload_config, set_config
    from .deps import DependencyError, DepsBash, DepsCall, DepsPip
    from .fs import strategies as fs_strategies
    from .lepton import Lepton, LeptonError
    from .result import Result
    from .triggers import stop_triggers

__version__ = "0.1.0"

# Loaded on first use, so that `import valent` stays fast (and cheap in worker processes).
_LAZY = {
    "cancel": "api",
    "dispatch": "api",
    "dispatch_sync": "api",
    "get_result": "api",
    "redispatch": "_redispatch",
    "stop_triggers": "triggers",
    "get_config": "config",
    "reload_config": "config",
    "set_config": "config",
    "hookimpl": "_plugins.manager",
    "Result": "result",
    "DepsBash": "deps",
    "DepsCall": "deps",
    "DepsPip": "deps",
    "DependencyError": "deps",
    "Lepton": "lepton",
    "LeptonError": "lepton",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in ("executor", "executors", "plugin", "fs", "triggers"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "fs_strategies":  # Covalent's name for the transfer strategies
        return importlib.import_module(f"{__name__}.fs.strategies")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'valent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

__all__ = [
    "Cancelled",
    "CancelOutcome",
    "Capabilities",
    "Completed",
    "ConfigError",
    "DependencyError",
    "DepsBash",
    "DepsCall",
    "DepsPip",
    "DispatchTimeoutError",
    "Executor",
    "ExecutorError",
    "Failed",
    "Lepton",
    "LeptonError",
    "Pending",
    "PicklingError",
    "PluginError",
    "Result",
    "Running",
    "Status",
    "StoreError",
    "Task",
    "TaskState",
    "TaskTimeoutError",
    "TracingError",
    "UnknownDispatchError",
    "UnknownExecutorError",
    "Upstream",
    "ValentError",
    "Wake",
    "WorkerDiedError",
    "cancel",
    "cancel_requested",
    "dispatch",
    "dispatch_sync",
    "electron",
    "executor",
    "executors",
    "fs",
    "fs_strategies",
    "get_config",
    "get_result",
    "hookimpl",
    "lattice",
    "redispatch",
    "reload_config",
    "set_config",
    "stop_triggers",
    "triggers",
    "wait",
]
