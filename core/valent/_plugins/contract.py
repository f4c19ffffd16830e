"""The executor protocol a plugin implements: one ``Executor`` subclass per backend."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import PluginError
from ..status import CancelOutcome
from ..task import Task, TaskState

Wake = Callable[[], None]
"""Called by an executor, from any thread, when a task's state changed: "poll me now"."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an executor can do when asked to cancel; shown by ``valent plugins``.

    :param cancel_pending: can it drop work that has not started?
    :param stop_running: can it stop work that is running (else ``runs_to_completion``)?
    :param kill_tree: does stopping take the task's own subprocesses too?
    :param grace: seconds between the polite stop (SIGTERM) and the hard one (SIGKILL),
        or None when it does not apply.
    :param chain: can it start a task whose arguments include :class:`valent.task.Upstream`
        markers (results of its own earlier tasks, not back yet)? Then the dispatcher starts
        a dependent as soon as its parents are started on this executor, and values pass
        between tasks where they run, not through the dispatcher.
    """

    cancel_pending: bool
    stop_running: bool
    kill_tree: bool
    grace: float | None = None
    chain: bool = False


class Executor(abc.ABC):
    """Base class of every executor.

    A subclass sets ``name`` (unique among installed executors) and ``capabilities``, and
    implements three methods that the dispatcher calls from its own thread:

    - ``run(task, wake) -> handle``: start the task without blocking; call ``wake()``
      (from any thread) whenever its state changes.
    - ``poll(handle) -> TaskState``: ``Pending``, ``Running``, ``Completed``, ``Failed``
      or ``Cancelled``; must not block for long.
    - ``cancel(handle) -> CancelOutcome``: start stopping it and say what will happen:
      ``DEQUEUED`` / ``KILLED`` (poll then reports ``Cancelled`` once the stop is
      confirmed), ``RUNS_TO_COMPLETION`` (poll later reports ``Completed``), ``TOO_LATE``,
      or ``FAILED``. Must not block for long; the dispatcher confirms by polling.

    The keyword arguments of ``__init__`` are the executor's settings: the config file's
    ``[executors.NAME]`` table is checked against them and passed in.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    poll_interval: ClassVar[float | None] = None
    """Seconds between safety-net polls of a running task; None: rely on ``wake`` alone."""

    @abc.abstractmethod
    def run(self, task: Task, wake: Wake) -> Any:
        """Start ``task`` without blocking and return a handle for poll and cancel."""

    @abc.abstractmethod
    def poll(self, handle: Any) -> TaskState:
        """Return the task's current state."""

    @abc.abstractmethod
    def cancel(self, handle: Any) -> CancelOutcome:
        """Start stopping the task; return what will happen to it."""

    def cancel_many(self, handles: list[Any]) -> list[CancelOutcome]:
        """Cancel several tasks at once (the dispatcher cancels in batches); one outcome each.

        The default calls ``cancel`` for each. Override it when one round trip can cancel
        many tasks (a broadcast, one remote command).
        """
        return [self.cancel(h) for h in handles]

    def shutdown(self) -> None:
        """Release what the executor holds (processes, connections); called at exit."""

    def close_dispatch(self, dispatch_id: str) -> None:
        """Called when a dispatch ends: drop per-dispatch state (optional)."""

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """The settings this executor accepts: its ``__init__`` keyword parameters
        (``inspect.Parameter`` objects by name)."""
        import inspect

        sig = inspect.signature(cls.__init__)
        return {
            n: p
            for n, p in sig.parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_executor_class(cls: Any, where: str) -> None:
    """Raise ``PluginError`` unless ``cls`` is a complete, well-declared executor class."""
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise PluginError(f"{where}: {cls!r} is not a subclass of valent.Executor")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(
            f"{where}: {cls.__qualname__}.name must be a short identifier string, got {name!r}"
        )
    caps = getattr(cls, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise PluginError(
            f"{where}: {cls.__qualname__}.capabilities must be a valent.Capabilities, "
            f"got {caps!r}"
        )
    if caps.grace is not None and caps.grace < 0:
        raise PluginError(f"{where}: {cls.__qualname__}.capabilities.grace must be >= 0")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise PluginError(
            f"{where}: {cls.__qualname__} does not implement {', '.join(missing)}"
        )
