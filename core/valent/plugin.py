"""The plugin-author API: everything a third-party executor package may import.

Write one :class:`Executor` subclass (``run``/``poll``/``cancel``), return it from a
``valent_executors`` hook implemented with :data:`hookimpl`, and declare the module in the
entry-point group ``valent``; check it with ``valent.testing.ExecutorConformance``.
docs/writing-executors.md walks through it. Names here are kept stable; the rest of the
``valent`` package (modules starting with ``_`` above all) may change without notice.
"""

from __future__ import annotations

from ._plugins.contract import Capabilities, Executor, Wake
from ._plugins.manager import PluginWarning, get_plugins, hookimpl
from ._pool.pool import Job, ProcessPool, RemoteError
from ._pool.proctree import (
    alive_escapees,
    group_members,
    live_groups,
    signal_escapees,
    signal_group,
    signal_name,
    snapshot_tree,
)
from ._pool.worker import Up as PoolUp
from .cancel_token import cancel_requested, set_process_token, thread_token
from .checks import MAX_SECONDS, Count, Ge, Gt, Le, PositiveSeconds, Seconds, require
from .errors import (
    ConfigError,
    ExecutorError,
    PicklingError,
    TaskTimeoutError,
    ValentError,
    WorkerDiedError,
)
from .pickling import dumps
from .status import CancelOutcome, Status
from .task import (
    Cancelled,
    Completed,
    Failed,
    Pending,
    Running,
    Task,
    TaskState,
    Upstream,
)

__all__ = [
    "MAX_SECONDS",
    "CancelOutcome",
    "Cancelled",
    "Capabilities",
    "Completed",
    "ConfigError",
    "Count",
    "Executor",
    "ExecutorError",
    "Failed",
    "Ge",
    "Gt",
    "Job",
    "Le",
    "Pending",
    "PicklingError",
    "PluginWarning",
    "PoolUp",
    "PositiveSeconds",
    "ProcessPool",
    "RemoteError",
    "Running",
    "Seconds",
    "Status",
    "Task",
    "TaskState",
    "TaskTimeoutError",
    "Upstream",
    "ValentError",
    "Wake",
    "WorkerDiedError",
    "alive_escapees",
    "cancel_requested",
    "dumps",
    "get_plugins",
    "group_members",
    "hookimpl",
    "live_groups",
    "require",
    "set_process_token",
    "signal_escapees",
    "signal_group",
    "signal_name",
    "snapshot_tree",
    "thread_token",
]
