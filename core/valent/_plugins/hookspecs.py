"""Every hook valent calls, declared and documented here.

A plugin implements any of them with ``@valent.hookimpl``. The run/poll/cancel hooks are
``firstresult``: valent's own ``trylast`` implementation calls the executor's methods, so a
plugin author usually writes one ``Executor`` subclass and one ``valent_executors`` hook, and
other plugins may wrap (``@hookimpl(wrapper=True)``) run/poll/cancel of every executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ..status import CancelOutcome, Status
    from ..task import Task, TaskState
    from .contract import Executor, Wake

PROJECT = "valent"
hookspec = pluggy.HookspecMarker(PROJECT)

# -------------------------------------------------------------------------
# registering executors
# -------------------------------------------------------------------------


@hookspec
def valent_executors() -> list[type[Executor]]:
    """Return the executor classes this plugin provides.

    Each class subclasses :class:`valent.Executor` and has a unique ``name``; valent checks
    each one when the plugin registers (name, capabilities, abstract methods).

    :return: a list of executor classes (may be empty).
    """


# -------------------------------------------------------------------------
# running, polling and cancelling a task
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def valent_run(executor: Executor, task: Task, wake: Wake) -> Any:
    """Start ``task`` on ``executor`` without blocking and return its handle.

    :param executor: the executor instance the electron selected.
    :param task: the task to run (callable, resolved arguments, ids).
    :param wake: call it from any thread when the task's state changes.
    :return: an opaque handle, passed back to poll and cancel.

    Stops at first non-None result. The default calls ``executor.run(task, wake)``.
    """


@hookspec(firstresult=True)
def valent_poll(executor: Executor, handle: Any) -> TaskState:
    """Return the current state of the task behind ``handle``.

    :param executor: the executor that started the task.
    :param handle: what ``valent_run`` returned.
    :return: a ``Pending``, ``Running``, ``Completed``, ``Failed`` or ``Cancelled`` state.

    Stops at first non-None result. The default calls ``executor.poll(handle)``.
    """


@hookspec(firstresult=True)
def valent_cancel(executor: Executor, handle: Any) -> CancelOutcome:
    """Start cancelling the task behind ``handle``; do not block for long.

    :param executor: the executor that started the task.
    :param handle: what ``valent_run`` returned.
    :return: the outcome the executor commits to (``dequeued``, ``killed``,
        ``runs_to_completion``, ``too_late`` or ``failed``); the dispatcher confirms it by
        polling until the task is final.

    Stops at first non-None result. The default calls ``executor.cancel(handle)``.
    """


@hookspec(firstresult=True)
def valent_cancel_many(executor: Executor, handles: list[Any]) -> list[CancelOutcome]:
    """Start cancelling several tasks of one executor at once; do not block for long.

    Called instead of ``valent_cancel`` only for executors that override
    ``Executor.cancel_many`` (they cancel a batch in one round trip, e.g. Dask's broadcast);
    a plugin that wraps ``valent_cancel`` to see every cancel wraps this one too.

    :param executor: the executor that started the tasks.
    :param handles: what ``valent_run`` returned for each.
    :return: one outcome per handle, in order (as ``valent_cancel``).

    Stops at first non-None result. The default calls ``executor.cancel_many(handles)``.
    """


# -------------------------------------------------------------------------
# observing
# -------------------------------------------------------------------------


@hookspec
def valent_node_status(dispatch_id: str, node_id: int, name: str, status: Status) -> None:
    """Called by the dispatcher thread whenever a node changes status.

    :param dispatch_id: the dispatch.
    :param node_id: the node's number.
    :param name: the node's name (``task_1``).
    :param status: its new status.

    Keep it quick: it runs on the dispatcher's thread.
    """


@hookspec
def valent_dispatch_finished(dispatch_id: str, status: Status) -> None:
    """Called once when a dispatch reaches its final status and every executor confirmed.

    :param dispatch_id: the dispatch.
    :param status: COMPLETED, FAILED or CANCELLED.
    """
