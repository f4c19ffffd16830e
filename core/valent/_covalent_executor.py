"""The adapter that runs a Covalent-style executor (:mod:`valent.executor.base`) as a valent
:class:`~valent.Executor`.

Two ways to run a Covalent ``run()``, chosen by what the class implements:

- **pool** (no ``cancel``): the whole ``setup``/``run``/``teardown`` runs in a worker of a
  killable :class:`~valent.plugin.ProcessPool`. ``run`` receives the task's function wrapped
  so that the adapter learns, through marker files, whether it was *called* in the worker
  (then a cancel kills the worker, subprocesses and all: ``killed``) or *pickled* to be sent
  elsewhere (then the work may go on: ``runs_to_completion``, and the worker is left to
  collect the result). A cancel is written down first, and the wrapper refuses to be pickled
  after it, so the two cannot cross.
- **thread** (``cancel`` implemented): ``run`` runs in a thread of this process. A cancel
  answers ``runs_to_completion`` at once (the conservative promise) and calls the class's
  ``cancel(task_metadata, job_handle)`` in a thread of its own. When that returns True and
  ``run`` then ends by raising, the task ends ``Cancelled(KILLED)``; when ``run`` returns a
  value, it completed (output kept). If ``run`` has not ended ``cancel_wait`` seconds after a
  True, the task ends ``Cancelled(KILLED)`` anyway (the backend confirmed the stop; the
  thread that waited on it is abandoned).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from ._plugins.contract import Capabilities, Executor, Wake
from .errors import PicklingError, PluginError
from .executor import base as cbase
from .status import CancelOutcome
from .task import Cancelled, Completed, Failed, Pending, Running, Task, TaskState

POOL_CAPS = Capabilities(cancel_pending=True, stop_running=True, kill_tree=True, grace=1.0)
THREAD_CAPS = Capabilities(cancel_pending=False, stop_running=False, kill_tree=False)
CANCEL_WAIT = 30.0


def executor_name(cls: type) -> str:
    """The valent name of a Covalent-style class: a ``name`` string it declares, else its
    Covalent short name (its module's last part), else (for ``__main__``) its class name,
    lowercased."""
    declared = cls.__dict__.get("name")
    if isinstance(declared, str) and declared.isidentifier():
        return declared
    short = cls.__module__.split(".")[-1]
    if short in ("__main__", "__mp_main__") or not short.isidentifier():
        short = cls.__name__
    return short.lower()


def task_metadata(task: Task) -> dict[str, Any]:
    from .config import results_dir

    return {
        "dispatch_id": task.dispatch_id,
        "node_id": task.node_id,
        "results_dir": str(results_dir()),
    }


# ---------------------------------------------------------------------- the pool side


class _Body:
    """The function ``run`` receives in a pool worker: notes where it went (marker files)."""

    def __init__(self, fn: Callable[..., Any], marker: str, tree: str):
        functools.update_wrapper(self, fn)  # first: it copies fn's __dict__ in
        self.fn = fn
        self.marker = marker
        self.tree = tree

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get("VALENT_COVALENT_TREE") == self.tree:
            _touch(self.marker + ".here")  # in the worker or a subprocess it started
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> Any:
        # run() ships the function elsewhere: say so first, and never after a cancel
        _touch(self.marker + ".shipped")
        if os.path.exists(self.marker + ".cancel"):
            raise cbase.TaskCancelledError("cancelled before the task was sent")
        return (functools.partial, (self.fn,))


def _touch(path: str) -> None:
    with open(path, "a"):
        pass


class _WorkerContext(cbase._JobContext):
    def __init__(self, marker: str):
        self.marker = marker

    def set_job_handle(self, handle: Any) -> bool:
        import json

        tmp = f"{self.marker}.handle.tmp"
        with open(tmp, "w") as f:
            json.dump(handle, f)
        os.replace(tmp, self.marker + ".handle")
        return True

    def cancel_requested(self) -> bool:
        from .cancel_token import cancel_requested

        return os.path.exists(self.marker + ".cancel") or cancel_requested()


def _pool_run(
    executor: Any, function: Callable, args: list, kwargs: dict, meta: dict, marker: str
) -> Any:
    """Runs in the pool worker: setup, run, teardown, with the context for the executor."""
    tree = uuid.uuid4().hex
    os.environ["VALENT_COVALENT_TREE"] = tree
    token = cbase._current.set(_WorkerContext(marker))
    try:
        return _call_run(executor, _Body(function, marker, tree), list(args), kwargs, meta)
    finally:
        cbase._current.reset(token)
        os.environ.pop("VALENT_COVALENT_TREE", None)


def _call_run(executor: Any, function: Callable, args: list, kwargs: dict, meta: dict) -> Any:
    """``setup``, ``run``, ``teardown`` (awaited for an async executor)."""
    if isinstance(executor, cbase.AsyncBaseExecutor):

        async def whole() -> Any:
            await executor.setup(task_metadata=meta)
            try:
                return await executor.run(function, args, kwargs, meta)
            finally:
                await executor.teardown(task_metadata=meta)

        return asyncio.run(whole())
    executor.setup(task_metadata=meta)
    try:
        return executor.run(function, args, kwargs, meta)
    finally:
        executor.teardown(task_metadata=meta)


# ---------------------------------------------------------------------- the thread side


class _ThreadJob(cbase._JobContext):
    """A ``run`` in a thread of this process, and what its cancel achieved."""

    def __init__(self, task: Task, wake: Wake, meta: dict[str, Any]):
        self.task = task
        self.wake = wake
        self.meta = meta
        self.lock = threading.Lock()
        self.state: TaskState = Pending()
        self.handle: Any = None
        self.handle_set = False
        self.cancel_asked = False
        self.cancel_result: bool | None = None  # what the executor's cancel returned
        self.cancel_done = threading.Event()
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.started_at: float | None = None

    def set_job_handle(self, handle: Any) -> bool:
        with self.lock:
            self.handle = handle
            self.handle_set = True
        return True

    def cancel_requested(self) -> bool:
        return self.cancel_asked

    @property
    def stdout(self) -> Any:
        return self.out

    @property
    def stderr(self) -> Any:
        return self.err

    def finish(self, state: TaskState) -> bool:
        with self.lock:
            if self.state.final:
                return False
            self.state = state
        self.wake()
        return True


class _PoolJob:
    __slots__ = ("job", "marker", "rtc", "cleaned")

    def __init__(self, job: Any, marker: str):
        self.job = job
        self.marker = marker
        self.rtc = False
        self.cleaned = False

    def clean(self) -> None:
        """Remove the job's marker files (once it is final: nothing writes them any more)."""
        if not self.cleaned:
            self.cleaned = True
            for suffix in (".here", ".shipped", ".cancel", ".handle"):
                with contextlib.suppress(OSError):
                    os.unlink(self.marker + suffix)


# ---------------------------------------------------------------------- the adapter


class CovalentExecutor(Executor):
    """A Covalent-style executor instance, run through valent's executor protocol.

    :param inner: the ``BaseExecutor`` / ``AsyncBaseExecutor`` instance.
    :param workers: (pool mode) at most this many ``run`` calls at once (default: elastic).
    :param grace: (pool mode) seconds between SIGTERM and SIGKILL on cancel.
    :param cancel_wait: (thread mode) seconds to wait for ``run`` to end after the executor's
        ``cancel`` returned True, before reporting ``Cancelled(KILLED)`` regardless.
    """

    name = "covalent"
    capabilities = POOL_CAPS
    covalent_class: type | None = None

    def __init__(
        self, inner: Any, workers: int | None = None, grace: float = 1.0,
        cancel_wait: float = CANCEL_WAIT,
    ):
        if not isinstance(inner, cbase._AbstractBaseExecutor):
            raise PluginError(
                f"{inner!r} is not a Covalent-style executor (a subclass of "
                "valent.executor.base.BaseExecutor or AsyncBaseExecutor)"
            )
        self.__dict__["inner"] = inner
        self.name = executor_name(type(inner))
        self.mode = "thread" if cbase.implements_cancel(type(inner)) else "pool"
        self.capabilities = (
            THREAD_CAPS if self.mode == "thread"
            else Capabilities(True, True, True, float(grace))
        )
        self.workers = workers
        self.grace = float(grace)
        self.cancel_wait = float(cancel_wait)
        self._lock = threading.Lock()
        self._pool: Any = None
        self._dir: str | None = None
        self._threads: set[threading.Thread] = set()

    # attributes of the Covalent instance read through the adapter (settings checks, users)
    def __getattr__(self, attr: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(inner, attr)

    def __repr__(self) -> str:
        return f"{type(self.inner).__name__} (Covalent-style, {self.mode} mode)"

    # -------------------------------------------------------------- run

    def run(self, task: Task, wake: Wake) -> Any:
        meta = task_metadata(task)
        if self.mode == "thread":
            job = _ThreadJob(task, wake, meta)
            t = threading.Thread(
                target=self._thread_main, args=(job,), daemon=True,
                name=f"valent-covalent-{task.label}",
            )
            with self._lock:
                self._threads.add(t)
            t.start()
            return job
        pool, directory = self._pool_and_dir()
        marker = os.path.join(directory, uuid.uuid4().hex)
        try:
            job = pool.submit(
                _pool_run,
                (self.inner, task.fn, list(task.args), dict(task.kwargs), meta, marker),
                on_change=lambda _job: wake(), label=task.label,
            )
        except PicklingError as exc:
            self._explain_pickling(exc)
            raise
        return _PoolJob(job, marker)

    def _explain_pickling(self, exc: PicklingError) -> None:
        """Say so when it is the executor itself that cannot travel to the worker."""
        from .pickling import dumps

        try:
            dumps(self.inner)
        except Exception as own:
            cls = type(self.inner).__name__
            raise PicklingError(
                f"the Covalent-style executor {cls} cannot be pickled to run in a worker "
                f"process ({own}); its run() runs there because it implements no cancel(). "
                "Make such objects (locks, clients, connections) in setup() or run() instead "
                "of __init__, or implement cancel() (then run() runs in a thread here)"
            ) from exc

    def _pool_and_dir(self) -> tuple[Any, str]:
        with self._lock:
            if self._pool is None:
                from ._pool.pool import ProcessPool

                self._dir = tempfile.mkdtemp(prefix="valent-covalent-")
                self._pool = ProcessPool(
                    self.workers,
                    min_workers=None if self.workers else 1,
                    grace=self.grace,
                    name=f"valent-{self.name}",
                )
                self._pool.start()
            return self._pool, self._dir  # type: ignore[return-value]

    def _thread_main(self, job: _ThreadJob) -> None:
        from .cancel_token import thread_token

        job.started_at = time.time()
        with job.lock:
            if job.state.final:
                return
            job.state = Running(started_at=job.started_at)
        job.wake()
        token = cbase._current.set(job)
        try:
            with thread_token(job.cancel_requested):
                value = _call_run(
                    self.inner, job.task.fn, list(job.task.args), dict(job.task.kwargs), job.meta
                )
        except BaseException as exc:  # noqa: BLE001 - every end of run() is reported
            tb = traceback.format_exc()
            job.finish(self._after_raise(job, exc, tb))
        else:
            job.finish(Completed(
                value=value, started_at=job.started_at, ended_at=time.time(),
                stdout=job.out.getvalue(), stderr=job.err.getvalue(),
            ))
        finally:
            cbase._current.reset(token)
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._append_logs(job)

    def _after_raise(self, job: _ThreadJob, exc: BaseException, tb: str) -> TaskState:
        ended = time.time()
        common = {"started_at": job.started_at, "ended_at": ended,
                  "stdout": job.out.getvalue(), "stderr": job.err.getvalue()}
        if job.cancel_asked:
            job.cancel_done.wait(self.cancel_wait)  # what the cancel achieved decides
            if job.cancel_result:
                return Cancelled(CancelOutcome.KILLED, **common)
            if not job.handle_set and isinstance(exc, cbase.TaskCancelledError):
                # it saw the request before it submitted anything: the body never started
                return Cancelled(CancelOutcome.DEQUEUED, **common)
        return Failed(exc, tb, **common)

    def _append_logs(self, job: _ThreadJob) -> None:
        try:
            self.inner._write_streams(
                (job.out.getvalue(), job.err.getvalue()),
                (self.inner.log_stdout, self.inner.log_stderr), job.meta,
            )
        except Exception:  # noqa: BLE001 - a log file is not worth failing the task
            traceback.print_exc()

    # -------------------------------------------------------------- poll

    def poll(self, handle: Any) -> TaskState:
        if isinstance(handle, _ThreadJob):
            return handle.state
        state = handle.job.state
        if state.final:
            handle.clean()
        return state

    # -------------------------------------------------------------- cancel

    def cancel(self, handle: Any) -> CancelOutcome:
        if isinstance(handle, _ThreadJob):
            return self._cancel_thread(handle)
        state = handle.job.state
        if isinstance(state, Cancelled):
            return state.outcome
        if state.final:
            return CancelOutcome.TOO_LATE
        if handle.rtc:
            return CancelOutcome.RUNS_TO_COMPLETION
        _touch(handle.marker + ".cancel")  # first: the wrapper refuses to ship after this
        if os.path.exists(handle.marker + ".shipped") and not os.path.exists(
            handle.marker + ".here"
        ):
            handle.rtc = True  # the function went elsewhere: killing the waiter stops nothing
            return CancelOutcome.RUNS_TO_COMPLETION
        return self._pool.cancel(handle.job)

    def _cancel_thread(self, job: _ThreadJob) -> CancelOutcome:
        with job.lock:
            state = job.state
            if isinstance(state, Cancelled):
                return state.outcome
            if state.final:
                return CancelOutcome.TOO_LATE
            first = not job.cancel_asked
            job.cancel_asked = True
        if first:
            threading.Thread(
                target=self._call_cancel, args=(job,), daemon=True,
                name=f"valent-covalent-cancel-{job.task.label}",
            ).start()
        # the conservative promise; the final state says killed once the backend confirmed it
        return CancelOutcome.RUNS_TO_COMPLETION

    def _call_cancel(self, job: _ThreadJob) -> None:
        try:
            with job.lock:
                handle = job.handle
            if isinstance(self.inner, cbase.AsyncBaseExecutor):
                ok = asyncio.run(self.inner.cancel(job.meta, handle))
            else:
                ok = self.inner.cancel(job.meta, handle)
            job.cancel_result = bool(ok)
        except Exception as exc:  # noqa: BLE001 - the cancel failed: the work may go on
            job.cancel_result = False
            job.err.write(f"valent: {type(self.inner).__name__}.cancel raised {exc!r}\n")
        finally:
            job.cancel_done.set()
        if job.cancel_result:
            timer = threading.Timer(self.cancel_wait, self._confirm_killed, args=(job,))
            timer.daemon = True
            timer.start()

    def _confirm_killed(self, job: _ThreadJob) -> None:
        """``run`` did not end ``cancel_wait`` s after the backend confirmed the stop."""
        job.finish(Cancelled(
            CancelOutcome.KILLED, started_at=job.started_at, ended_at=time.time(),
            stdout=job.out.getvalue(), stderr=job.err.getvalue(),
        ))

    # -------------------------------------------------------------- the rest

    def shutdown(self) -> None:
        """Stop the pool (killing what runs there); wait up to ``cancel_wait`` seconds for
        ``run`` calls running in threads (their work is elsewhere, not ours to kill)."""
        with self._lock:
            pool, self._pool = self._pool, None
            directory, self._dir = self._dir, None
            threads = list(self._threads)
        deadline = time.monotonic() + self.cancel_wait
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if pool is not None:
            pool.shutdown()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __reduce__(self) -> Any:
        return (CovalentExecutor, (self.inner, self.workers, self.grace, self.cancel_wait))


# ---------------------------------------------------------------------- classes by name


def adapter_class(cls: type) -> type[CovalentExecutor]:
    """A valent executor class for a Covalent-style class, so a plugin can provide it by
    name: made with the class's own settings (its ``__init__`` keywords, checked against the
    config's ``[executors.NAME]`` table), it wraps a new instance."""
    cached = _CLASSES.get(cls)
    if cached is not None:
        return cached
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(
            f"Covalent-style executor {cls.__qualname__} does not implement {missing}"
        )
    mode_caps = THREAD_CAPS if cbase.implements_cancel(cls) else POOL_CAPS

    @functools.wraps(cls.__init__)
    def __init__(self: CovalentExecutor, *args: Any, **kwargs: Any) -> None:
        CovalentExecutor.__init__(self, cls(*args, **kwargs))

    def settings(klass: type) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {
            n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def __reduce__(self: CovalentExecutor) -> Any:
        return (_rebuild, (cls, self.inner, self.workers, self.grace, self.cancel_wait))

    new = type(cls.__name__, (CovalentExecutor,), {
        "__init__": __init__,
        "__reduce__": __reduce__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "name": executor_name(cls),
        "capabilities": mode_caps,
        "covalent_class": cls,
        "settings": classmethod(settings),
    })
    _CLASSES[cls] = new
    return new


def _rebuild(cls: type, inner: Any, *options: Any) -> CovalentExecutor:
    ex = CovalentExecutor.__new__(adapter_class(cls))
    CovalentExecutor.__init__(ex, inner, *options)
    return ex


def wrap(spec: Any) -> Any:
    """``spec`` as a valent executor: a Covalent-style instance gets an adapter (the same
    one each time for the same instance); anything else is returned as it is."""
    if isinstance(spec, cbase._AbstractBaseExecutor):
        with _wrap_lock:
            found = _ADAPTERS.get(id(spec))
            if found is not None and found[0]() is spec:
                return found[1]
            adapter = CovalentExecutor.__new__(adapter_class(type(spec)))
            CovalentExecutor.__init__(adapter, spec)
            try:
                ref = weakref.ref(spec, lambda _r, key=id(spec): _ADAPTERS.pop(key, None))
            except TypeError:  # no weak references (__slots__): keep it for the process
                ref = (lambda obj: lambda: obj)(spec)
            _ADAPTERS[id(spec)] = (ref, adapter)
        return adapter
    return spec


_CLASSES: weakref.WeakKeyDictionary[type, type[CovalentExecutor]] = weakref.WeakKeyDictionary()
_ADAPTERS: dict[int, tuple[Callable[[], Any], CovalentExecutor]] = {}
_wrap_lock = threading.Lock()
