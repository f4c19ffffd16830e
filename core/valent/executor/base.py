"""Covalent-style executors: ``BaseExecutor`` and ``AsyncBaseExecutor``.

A class written for Covalent (``from covalent.executor.base import BaseExecutor``) runs here
with only that import changed (``from valent.executor.base import BaseExecutor``). Use an
instance as ``@ct.electron(executor=MyExecutor(...))``, or publish the class in a package
through the ``valent`` entry-point group (docs/writing-executors.md, "Coming from Covalent").

What the class implements decides where its ``run`` runs and what a cancel promises
(:mod:`valent._covalent_executor` is the adapter that does it):

- no ``cancel``: ``run`` runs in a worker process of a killable pool. If it calls the task's
  function there, a cancel kills the worker with everything it started: ``killed``. If it
  hands the function elsewhere (pickles it for a remote backend) before the cancel, the work
  may go on: ``runs_to_completion``, and the worker is left to collect the result.
- ``cancel(task_metadata, job_handle)``: ``run`` runs in a thread of the dispatching process
  (it is expected to submit elsewhere and wait). A cancel answers ``runs_to_completion`` at
  once and calls your ``cancel`` in a thread; when it returns True and ``run`` then ends with
  an exception (``TaskCancelledError`` or any), the node ends ``killed``. False, or an
  exception from ``cancel``, leaves the outcome ``runs_to_completion``.

``task_metadata`` holds ``dispatch_id``, ``node_id`` and ``results_dir``, as in Covalent.
``setup(task_metadata)`` and ``teardown(task_metadata)`` run around every ``run``, in the
same process or thread.
"""

from __future__ import annotations

import abc
import contextvars
import copy
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TypeJSON = str | int | float | bool | None | dict[str, Any] | list[Any]

__all__ = ["AsyncBaseExecutor", "BaseExecutor", "TaskCancelledError", "as_executor"]


class TaskCancelledError(Exception):
    """Raise it from ``run`` when the job stopped because it was cancelled."""


class _JobContext:
    """What ``set_job_handle`` / ``get_cancel_requested`` / ``task_stdout`` reach while a
    ``run`` is running; the adapter provides one per task (a thread's job, or a worker's)."""

    def set_job_handle(self, handle: Any) -> bool:  # pragma: no cover - overridden
        return False

    def cancel_requested(self) -> bool:  # pragma: no cover - overridden
        return False

    @property
    def stdout(self) -> Any:
        return sys.stdout

    @property
    def stderr(self) -> Any:
        return sys.stderr


_current: contextvars.ContextVar[_JobContext | None] = contextvars.ContextVar(
    "valent_covalent_job", default=None
)


def _jsonable(handle: Any) -> Any:
    try:
        return json.loads(json.dumps(handle))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"set_job_handle: the handle must be JSON-serialisable (an id, a dict of ids), "
            f"got {handle!r}: {exc}"
        ) from None


class _AbstractBaseExecutor(abc.ABC):  # noqa: B024 - as Covalent's: abstract by intent
    """What both kinds share: Covalent's common settings, names and task streams.

    :param log_stdout: a file the task's stdout is appended to as well (relative paths are
        under ``results_dir/dispatch_id``).
    :param log_stderr: the same for stderr.
    :param cache_dir: a directory the executor may use for its files.
    :param time_limit: kept for Covalent code that reads it; valent's limit is
        ``@ct.electron(timeout=...)``.
    :param retries: kept likewise; valent's is ``@ct.electron(retries=...)``.
    """

    SUPPORTS_MANAGED_EXECUTION = False

    def __init__(
        self,
        log_stdout: str = "",
        log_stderr: str = "",
        cache_dir: str = "",
        time_limit: int = -1,
        retries: int = 0,
        *args: Any,
        **kwargs: Any,
    ):
        self.log_stdout = log_stdout
        self.log_stderr = log_stderr
        self.cache_dir = cache_dir
        self.time_limit = time_limit
        self.retries = retries

    def short_name(self) -> str:
        """The last part of the class's module name, as Covalent names executors."""
        return type(self).__module__.split("/")[-1].split(".")[-1]

    def to_dict(self) -> dict:
        """A JSON-friendly description: type, short name and attributes."""
        return {
            "type": str(type(self)),
            "short_name": self.short_name(),
            "attributes": {k: v for k, v in self.__dict__.items() if not k.startswith("_")},
        }

    def from_dict(self, object_dict: dict) -> _AbstractBaseExecutor:
        """Set the attributes from :meth:`to_dict`'s output; returns self."""
        if object_dict:
            self.__dict__.update(copy.deepcopy(object_dict["attributes"]))
        return self

    @property
    def task_stdout(self) -> Any:
        """Where the running task's own messages go (stored as the node's stdout)."""
        ctx = _current.get()
        return ctx.stdout if ctx is not None else sys.stdout

    @property
    def task_stderr(self) -> Any:
        """Where the running task's own error messages go (the node's stderr)."""
        ctx = _current.get()
        return ctx.stderr if ctx is not None else sys.stderr

    def _log_file(self, path: str, task_metadata: dict) -> Path | None:
        if not path:
            return None
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = Path(task_metadata.get("results_dir", ".")) / task_metadata["dispatch_id"] / p
        return p

    def _write_streams(self, streams: Iterable[str], paths: Iterable[str], meta: dict) -> None:
        for text, path in zip(streams, paths, strict=False):
            target = self._log_file(path, meta)
            if target is not None and text:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a") as f:
                    f.write(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BaseExecutor(_AbstractBaseExecutor):
    """Subclass it and implement ``run(function, args, kwargs, task_metadata)``; optionally
    ``setup``, ``teardown`` and ``cancel`` (see this module's docstring for what each
    choice means for cancellation)."""

    def setup(self, task_metadata: dict) -> Any:
        """Called before each ``run``, where ``run`` runs."""

    @abc.abstractmethod
    def run(self, function: Callable, args: list, kwargs: dict, task_metadata: dict) -> Any:
        """Run ``function(*args, **kwargs)`` (here or elsewhere) and return its value."""

    def cancel(self, task_metadata: dict, job_handle: Any) -> bool:
        """Stop the job ``job_handle`` names (what ``run`` gave ``set_job_handle``); return
        True once it is stopped. Not implemented here: override it to make cancel stop
        work you submitted elsewhere."""
        return False

    def teardown(self, task_metadata: dict) -> Any:
        """Called after each ``run`` (also when it raised), where ``run`` runs."""

    def set_job_handle(self, handle: TypeJSON) -> bool:
        """From inside ``run``: remember the backend's id of this task's job (JSON-friendly),
        passed back to ``cancel``. Returns True when it was recorded."""
        ctx = _current.get()
        return ctx.set_job_handle(_jsonable(handle)) if ctx is not None else False

    def get_cancel_requested(self) -> bool:
        """From inside ``run``: has a cancel of this task been requested?"""
        ctx = _current.get()
        return ctx.cancel_requested() if ctx is not None else False

    def get_version_info(self) -> dict:
        """The Python version and the valent version (as Covalent's ``covalent`` key)."""
        from .. import __version__

        return {"python": sys.version.split()[0], "covalent": __version__}

    def write_streams_to_file(
        self, stream_strings: Iterable[str], filepaths: Iterable[str], dispatch_id: str,
        results_dir: str,
    ) -> None:
        """Append each string to its file (relative paths under ``results_dir/dispatch_id``)."""
        self._write_streams(
            stream_strings, filepaths, {"dispatch_id": dispatch_id, "results_dir": results_dir}
        )


class AsyncBaseExecutor(_AbstractBaseExecutor):
    """As :class:`BaseExecutor`, with ``run`` (and ``setup``, ``teardown``, ``cancel``,
    ``set_job_handle``, ``get_cancel_requested``) as coroutines."""

    async def setup(self, task_metadata: dict) -> Any:
        """Awaited before each ``run``."""

    @abc.abstractmethod
    async def run(
        self, function: Callable, args: list, kwargs: dict, task_metadata: dict
    ) -> Any:
        """Run ``function(*args, **kwargs)`` (here or elsewhere) and return its value."""

    async def cancel(self, task_metadata: dict, job_handle: Any) -> bool:
        """As :meth:`BaseExecutor.cancel`, awaited."""
        return False

    async def teardown(self, task_metadata: dict) -> Any:
        """Awaited after each ``run``."""

    async def set_job_handle(self, handle: TypeJSON) -> bool:
        """As :meth:`BaseExecutor.set_job_handle`."""
        ctx = _current.get()
        return ctx.set_job_handle(_jsonable(handle)) if ctx is not None else False

    async def get_cancel_requested(self) -> bool:
        """As :meth:`BaseExecutor.get_cancel_requested`."""
        ctx = _current.get()
        return ctx.cancel_requested() if ctx is not None else False

    async def get_version_info(self) -> dict:
        """As :meth:`BaseExecutor.get_version_info`."""
        from .. import __version__

        return {"python": sys.version.split()[0], "covalent": __version__}

    async def write_streams_to_file(
        self, stream_strings: Iterable[str], filepaths: Iterable[str], dispatch_id: str,
        results_dir: str,
    ) -> None:
        """As :meth:`BaseExecutor.write_streams_to_file`."""
        self._write_streams(
            stream_strings, filepaths, {"dispatch_id": dispatch_id, "results_dir": results_dir}
        )


def implements_cancel(cls: type) -> bool:
    """Does a Covalent-style class override ``cancel``?"""
    base = AsyncBaseExecutor if issubclass(cls, AsyncBaseExecutor) else BaseExecutor
    return getattr(cls, "cancel", None) is not base.cancel


def is_covalent_class(obj: Any) -> bool:
    """Is ``obj`` a Covalent-style executor class (a subclass of either base)?"""
    return isinstance(obj, type) and issubclass(obj, _AbstractBaseExecutor)


def as_executor(
    executor: _AbstractBaseExecutor, *, workers: int | None = None, grace: float = 1.0,
    cancel_wait: float = 30.0,
) -> Any:
    """The valent :class:`~valent.Executor` that runs this Covalent-style ``executor``
    (what ``@ct.electron(executor=...)`` uses; give it to ``valent.testing``'s conformance
    suite to check the class). Options: ``workers`` (at most this many ``run`` calls at once
    in the pool; default elastic), ``grace`` (seconds from SIGTERM to SIGKILL on cancel),
    ``cancel_wait`` (seconds ``run`` may take to end after your ``cancel`` returned True)."""
    from .._covalent_executor import CovalentExecutor, adapter_class

    adapter = CovalentExecutor.__new__(adapter_class(type(executor)))
    CovalentExecutor.__init__(adapter, executor, workers, grace, cancel_wait)
    return adapter
