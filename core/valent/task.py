"""What the dispatcher hands an executor (a :class:`Task`) and what a poll returns (a state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .status import CancelOutcome


def node_label(name: str, node_id: int) -> str:
    """A node's display name, as Covalent prints it: ``task_1(0)``."""
    return f"{name}({node_id})"


@dataclass(slots=True)
class Task:
    """One attempt at running one node: the callable with its resolved arguments.

    Executors treat it as read-only. ``run()`` calls the function where it is called;
    an executor that ships work elsewhere pickles ``fn``, ``args`` and ``kwargs``
    (or the whole task) and calls ``run()`` (or ``fn(*args, **kwargs)``) there.
    """

    dispatch_id: str
    node_id: int
    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    timeout: float | None = None
    attempt: int = 1

    @property
    def key(self) -> str:
        """A string unique to this attempt, usable as a file or Dask key."""
        return f"{self.name}-{self.dispatch_id}-{self.node_id}-{self.attempt}"

    @property
    def label(self) -> str:
        """The node's display name, as Covalent prints it: ``task_1(0)``."""
        return node_label(self.name, self.node_id)

    @property
    def upstream(self) -> list[Upstream]:
        """The :class:`Upstream` markers among the arguments (empty unless chained)."""
        found = [a for a in self.args if isinstance(a, Upstream)]
        found += [v for v in self.kwargs.values() if isinstance(v, Upstream)]
        return found

    def run(self) -> Any:
        """Call the function with its arguments, here, and return its value."""
        if self.upstream:
            raise TypeError(
                f"{self.label} is chained: its arguments hold Upstream markers that only its "
                "executor can resolve"
            )
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    """Stands in a chained task's arguments for the value of an earlier task.

    The dispatcher hands these only to an executor whose capabilities say ``chain=True``, and
    only for tasks it started itself: ``handle`` is what its ``run`` returned for the
    upstream task. The executor substitutes the upstream value where it runs the task (for
    Dask: worker to worker), and must never run the body when an upstream task ends other
    than ``Completed``: the chained task then ends ``Cancelled(DEQUEUED)``.
    """

    handle: Any
    node_id: int


class TaskState:
    """Base of what ``Executor.poll`` returns."""

    __slots__ = ()
    final: bool = False


@dataclass(frozen=True, slots=True)
class Pending(TaskState):
    """Accepted by the executor, not started yet."""


@dataclass(frozen=True, slots=True)
class Running(TaskState):
    """Started; ``started_at`` is a ``time.time()`` stamp when known.

    ``stdout_path`` / ``stderr_path``: files on this machine that hold the task's output so
    far, when the executor captures it there (``valent logs`` shows them while it runs).
    """

    started_at: float | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None


@dataclass(frozen=True, slots=True)
class Completed(TaskState):
    """Finished with a value.

    Give ``value``, or ``pickled`` (its cloudpickle bytes, when the value arrived pickled:
    the dispatcher stores them as they are and unpickles only when it needs the value).
    """

    value: Any = None
    pickled: bytes | None = None
    started_at: float | None = None
    ended_at: float | None = None
    stdout: str = ""
    stderr: str = ""
    final = True

    def get_value(self) -> Any:
        """The value, unpickling ``pickled`` if that is what was given."""
        if self.pickled is not None:
            import cloudpickle

            return cloudpickle.loads(self.pickled)
        return self.value


@dataclass(frozen=True, slots=True)
class Failed(TaskState):
    """Finished with an error: the task raised, its process died, or it could not start.

    ``error`` is the exception (or a message); ``traceback`` the formatted traceback text.
    """

    error: BaseException | str
    traceback: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    stdout: str = ""
    stderr: str = ""
    final = True


@dataclass(frozen=True, slots=True)
class Cancelled(TaskState):
    """Stopped by a cancel; ``outcome`` says how (dequeued or killed)."""

    outcome: CancelOutcome
    started_at: float | None = None
    ended_at: float | None = None
    stdout: str = ""
    stderr: str = ""
    final = True


__all__ = [
    "Task", "Upstream", "TaskState", "Pending", "Running", "Completed", "Failed", "Cancelled",
]
