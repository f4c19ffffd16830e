"""What runs inside each Dask worker process: the task bodies and the cancel channel.

Dask ships :func:`run_killable` (kill mode) or :func:`run_native` (finish mode) as the task
function. Both register the task's key in a per-process registry that :func:`cancel_keys`,
broadcast by the client with ``client.run``, consults:

- kill mode: the body runs in a warm :class:`valent.plugin.ProcessPool` (one per worker
  process, sized to its threads; children started with ``subprocess`` in their own session,
  so daemonic workers are fine); a cancel kills the child's process group and the worker
  thread returns as soon as the group is confirmed gone.
- finish mode: the body runs in the worker thread; a cancel sets a flag that
  ``valent.cancel_requested()`` reads there.

A cancel that arrives before the task started leaves a tombstone: the task then returns
without running its body. A chained task gets its upstream tasks' result tuples as extra
arguments (Dask passes them worker to worker); its pickled arguments hold :class:`Up`
markers where those values go, and if an upstream task did not end ``ok`` the body never
runs. Results go back as small tuples whose values are already
cloudpickled, so nothing is pickled twice. This module imports no Dask at import time.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from typing import Any

import cloudpickle

MAX_REMEMBERED = 10_000
TOMBSTONE_TTL = 3600.0
FN_CACHE = 256

# result tuples: (kind, ...)
OK, ERR, CANCELLED, SKIPPED = "ok", "err", "cancelled", "skipped"

# answers of cancel_keys, per key ("dequeued": here, but its body never started and never will)
KILLED, RUNNING, FINISHED, ABSENT, DEQUEUED = "killed", "running", "finished", "absent", "dequeued"
CONFIRM_WAIT = 10.0
"""Seconds (after the grace) a killed task's thread waits for the pool to confirm the kill."""

_lock = threading.Lock()
_running: dict[str, Any] = {}
"""key -> (pool, job) (kill mode), None (kill mode, job starting), a _Flag (finish mode), or
_WAITING / _STOPPED (finish mode: in a batch here, before its turn)."""
_kill_pending: set[str] = set()
_kill_asked: dict[str, float] = {}
"""key -> time.time() when a cancel asked the pool to kill it (kill mode)."""
_started: dict[str, float] = {}
"""key -> time.time() when its body started here (finish mode; kill mode asks the pool)."""
_tombstones: collections.OrderedDict[str, float] = collections.OrderedDict()
_finished: collections.OrderedDict[str, None] = collections.OrderedDict()
_pools: dict[float, Any] = {}
_fns: collections.OrderedDict[str, Any] = collections.OrderedDict()
_calls: collections.OrderedDict[str, _Call] = collections.OrderedDict()
_batches: dict[str, list[str]] = {}
"""batch task key -> the keys of its tasks, while the batch runs in this worker process."""
_revoked: dict[str, dict[str, frozenset[str]]] = {}
"""record name -> {batch task key: keys of its tasks a cancel stopped before the batch
started}: the executor's record (:class:`valent_dask.reaper.Revoked`, a worker plugin, so
Dask also installs it on workers that join later). Unlike tombstones it is neither bounded
nor aged: the executor drops a batch from it once it has seen that batch end."""


_WAITING = "waiting"
"""``_running`` entry of a task of a finish-mode batch running here, before its turn."""
_STOPPED = "stopped"
"""... and of one a cancel stopped before its turn: it never starts."""


class _Flag:
    """A finish-mode task's cancel flag; its bound ``is_set`` is the thread's cancel token."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value


class Up:
    """Marks, in a chained task's pickled arguments, where upstream value ``i`` goes."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __reduce__(self) -> tuple:
        return (Up, (self.i,))


def _payloads(ups: tuple, picks: tuple | None = None) -> list[bytes] | None:
    """The pickled values of upstream result tuples; None if one did not end ``ok``.

    ``picks[i]`` (not None): upstream ``i`` ran in a batch, which returned a list of result
    tuples; its own is at that index."""
    if picks:
        ups = tuple(u if p is None else u[p] for u, p in zip(ups, picks, strict=True))
    out = []
    for up in ups:
        if not (isinstance(up, tuple) and up and up[0] == OK):
            return None
        out.append(up[1])
    return out


def _substitute(args: tuple, kwargs: dict, payloads: list[bytes]) -> tuple[tuple, dict]:
    """Put the upstream values where the :class:`Up` markers are."""
    values: dict[int, Any] = {}

    def value(m: Up) -> Any:
        if m.i not in values:
            values[m.i] = cloudpickle.loads(payloads[m.i])
        return values[m.i]

    args = tuple(value(a) if isinstance(a, Up) else a for a in args)
    kwargs = {k: value(v) if isinstance(v, Up) else v for k, v in kwargs.items()}
    return args, kwargs


def _skip_upstream(key: str) -> tuple:
    """An upstream task did not complete: this one never runs (and never will)."""
    with _lock:
        _tombstones.pop(key, None)
        _remember(_finished, key, None)
    return (SKIPPED,)


class _Call:
    """The pool-side callable: unpickles the user's function once per child, then calls it.

    Pickles as its function's cloudpickle bytes, which the pool sends once per child.
    """

    __slots__ = ("blob", "fn")

    def __init__(self, blob: bytes):
        self.blob = blob
        self.fn: Any = None

    def __reduce__(self) -> tuple:
        return (_Call, (self.blob,))

    def __call__(self, args_blob: bytes, payloads: list[bytes] | None = None) -> Any:
        if self.fn is None:
            self.fn = cloudpickle.loads(self.blob)
        args, kwargs = cloudpickle.loads(args_blob)
        if payloads:
            args, kwargs = _substitute(args, kwargs, payloads)
        return self.fn(*args, **kwargs)


def _cached(cache: collections.OrderedDict, token: str, make: Any) -> Any:
    with _lock:
        obj = cache.get(token)
        if obj is not None:
            cache.move_to_end(token)
            return obj
    obj = make()
    with _lock:
        cache[token] = obj
        while len(cache) > FN_CACHE:
            cache.popitem(last=False)
    return obj


def _remember(od: collections.OrderedDict, key: str, value: Any) -> None:
    """Add to a bounded memory (lock held)."""
    od[key] = value
    while len(od) > MAX_REMEMBERED:
        od.popitem(last=False)


def _claim(key: str, entry: Any) -> bool:
    """Register ``key`` as here; False if a cancel already tombstoned or recorded it (lock
    held).

    A finish-mode body starts right after; a kill-mode one only when the pool says so.
    """
    if _tombstones.pop(key, None) is not None or key in _revoked_in(key):
        return False  # (a task sent alone is recorded as a batch of one, under its key)
    _running[key] = entry
    if entry is not None:
        _started[key] = time.time()
    return True


def _release(key: str) -> None:
    with _lock:
        _running.pop(key, None)
        _started.pop(key, None)
        _kill_pending.discard(key)
        _kill_asked.pop(key, None)
        _remember(_finished, key, None)


def set_revoked(name: str, record: dict[str, frozenset[str]]) -> None:
    """Install (or replace) the executor's record ``name`` (see ``_revoked``)."""
    with _lock:
        if record:
            _revoked[name] = record
        else:
            _revoked.pop(name, None)


def drop_revoked(name: str) -> None:
    """Forget the record ``name`` (its plugin was removed: a newer record replaced it)."""
    with _lock:
        _revoked.pop(name, None)


def _revoked_in(bkey: str) -> frozenset[str] | set[str]:
    """Keys of batch ``bkey`` an executor's record says never start (lock held)."""
    if not _revoked:
        return frozenset()
    out: set[str] = set()
    for record in _revoked.values():
        out.update(record.get(bkey, ()))
    return out


def _nthreads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except Exception:
        return max(1, os.cpu_count() or 1)


def _pool(grace: float) -> Any:
    pool = _pools.get(grace)
    if pool is not None:
        return pool
    from valent.plugin import ProcessPool

    with _lock:
        pool = _pools.get(grace)
        if pool is None:
            pool = ProcessPool(workers=_nthreads(), grace=grace, name="valent-dask")
            _pools[grace] = pool
    pool.start()  # idempotent; here, so that submitting (under the lock) never spawns
    return pool


def _pack_error(exc: BaseException, tb: str) -> tuple:
    text = f"{type(exc).__name__}: {exc}"
    try:
        blob: bytes | None = cloudpickle.dumps(exc)
    except Exception:
        blob = None
    return (ERR, blob, text, tb)


def run_killable(
    key: str, token: str, fn_blob: bytes, args_blob: bytes, grace: float, *ups: tuple,
    picks: tuple | None = None,
) -> tuple:
    """Dask task body in kill mode: run the function in this worker's warm process pool.

    ``ups``: a chained task's upstream result tuples, in the order of its :class:`Up` markers
    (``picks``: see :func:`_payloads`).
    """
    payloads = _payloads(ups, picks) if ups else None
    if ups and payloads is None:
        return _skip_upstream(key)
    with _lock:
        if not _claim(key, None):
            return (SKIPPED,)
    try:
        call = _cached(_calls, token, lambda: _Call(fn_blob))
        pool = _pool(grace)
        with _lock:  # a cancel that came while we prepared finds no job: its body never ran
            if key in _kill_pending:
                job = None
            else:
                job = pool.submit(
                    call, (args_blob, payloads) if payloads else (args_blob,), label=key
                )
                _running[key] = (pool, job)
    except BaseException as exc:
        _release(key)
        return _pack_error(exc, traceback.format_exc()) + (None, time.time(), "", "")
    if job is None:
        _release(key)
        return (CANCELLED, "dequeued", None, time.time(), "", "")
    state = job.wait()
    with _lock:
        asked = _kill_asked.get(key)
    state = _after_kill(pool, state, asked, grace)
    _release(key)
    return _pack_state(state)


def _after_kill(pool: Any, state: Any, asked: float | None, grace: float) -> Any:
    """The truth about a kill-mode task the pool ended.

    Cancelled before the pool saw its body start: ``dequeued``, whatever the pool said. Asked
    to be killed and then ended Failed (its SIGTERM handler exited, an error while stopping):
    stopped by the cancel, so ``Cancelled(killed)`` once the pool confirms its kill done. A
    failure that came before the cancel stays a failure."""
    from valent.plugin import Cancelled, CancelOutcome, Failed

    if isinstance(state, Cancelled) and state.started_at is None:
        # the pool never saw its body start (a warm child not up yet): it never ran
        return Cancelled(CancelOutcome.DEQUEUED, None, state.ended_at, state.stdout, state.stderr)
    if asked is None or not isinstance(state, Failed):
        return state
    ended = state.ended_at if state.ended_at is not None else time.time()
    if ended < asked:
        return state  # it failed on its own before the cancel came: too late
    deadline = time.monotonic() + grace + CONFIRM_WAIT
    while pool.stats()["dying"] and time.monotonic() < deadline:  # the kill is still going
        time.sleep(0.01)
    outcome = CancelOutcome.FAILED if pool.stats()["dying"] else CancelOutcome.KILLED
    return Cancelled(outcome, state.started_at, time.time(), state.stdout, state.stderr)


def _pack_state(state: Any) -> tuple:
    from valent.plugin import Cancelled, Completed, Failed

    if isinstance(state, Completed):
        return (OK, state.pickled, state.started_at, state.ended_at, state.stdout, state.stderr)
    if isinstance(state, Failed):
        err = state.error
        if isinstance(err, BaseException):
            packed = _pack_error(err, state.traceback)
        else:
            packed = (ERR, None, str(err), state.traceback)
        return packed + (state.started_at, state.ended_at, state.stdout, state.stderr)
    if isinstance(state, Cancelled):
        return (
            CANCELLED, str(state.outcome), state.started_at, state.ended_at,
            state.stdout, state.stderr,
        )
    return (ERR, None, f"the task ended in an unexpected state {state!r}", "", None, None, "", "")


def run_native(
    key: str, token: str, fn_blob: bytes, args_blob: bytes, *ups: tuple,
    picks: tuple | None = None,
) -> tuple:
    """Dask task body in finish mode: run the function in this worker thread.

    ``ups``: a chained task's upstream result tuples, in the order of its :class:`Up` markers
    (``picks``: see :func:`_payloads`).
    """
    payloads = _payloads(ups, picks) if ups else None
    if ups and payloads is None:
        return _skip_upstream(key)
    flag = _Flag()
    with _lock:
        if not _claim(key, flag):
            return (SKIPPED,)
    return _native_body(key, token, fn_blob, args_blob, payloads, flag)


def _native_body(
    key: str, token: str, fn_blob: bytes, args_blob: bytes, payloads: list[bytes] | None,
    flag: _Flag,
) -> tuple:
    """Run a claimed finish-mode task here; its result tuple."""
    from valent.plugin import thread_token

    started = time.time()
    try:
        fn = _cached(_fns, token, lambda: cloudpickle.loads(fn_blob))
        args, kwargs = cloudpickle.loads(args_blob)
        if payloads:
            args, kwargs = _substitute(args, kwargs, payloads)
        with thread_token(flag.is_set):
            value = fn(*args, **kwargs)
        try:
            payload = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            msg = (
                f"the return value ({type(value).__name__}) cannot be pickled, so it cannot "
                f"leave the worker: {exc}. Return plain data or write it to a file and "
                "return the path."
            )
            return (ERR, None, msg, traceback.format_exc(), started, time.time(), "", "")
        return (OK, payload, started, time.time(), "", "")
    except BaseException as exc:  # noqa: BLE001 - the task's own error, reported as Failed
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        return _pack_error(exc, tb) + (started, time.time(), "", "")
    finally:
        _release(key)


def run_native_batch(
    bkey: str, keys: list[str], tokens: list[str], fn_blobs: list[bytes], args_blobs: list[bytes]
) -> list[tuple]:
    """Dask task body of a batch in finish mode: run its tasks one after the other in this
    worker thread; one result tuple per task, in order.

    All its tasks are registered here as waiting when the batch starts; each is claimed under
    the registry's lock right before its body starts. A cancel (:func:`cancel_keys`) of a
    waiting one marks it stopped (answer ``dequeued``) and it never starts (``SKIPPED``), so a
    task's cancel answer is as true inside a batch as alone. One task's error is its own
    result; the next ones still run.
    """
    n = len(keys)
    out: list[tuple | None] = [None] * n
    with _lock:
        _batches[bkey] = keys
        stopped = _revoked_in(bkey)  # see run_killable_batch: why both are read here
        for i, key in enumerate(keys):
            if _tombstones.pop(key, None) is not None or key in stopped:
                out[i] = (SKIPPED,)
            else:
                _running[key] = _WAITING
    try:
        for i, key in enumerate(keys):
            if out[i] is not None:
                continue
            flag = _Flag()
            with _lock:
                if _running.get(key) is not _WAITING or not _claim(key, flag):
                    _running.pop(key, None)  # a cancel stopped it before its turn: never runs
                    out[i] = (SKIPPED,)
                    continue
            out[i] = _native_body(key, tokens[i], fn_blobs[i], args_blobs[i], None, flag)
    finally:
        with _lock:
            _batches.pop(bkey, None)
            for i, key in enumerate(keys):
                if out[i] is None:  # only if the loop itself broke (it does not raise)
                    _running.pop(key, None)
    return out  # type: ignore[return-value]


def run_killable_batch(
    bkey: str, keys: list[str], tokens: list[str], fn_blobs: list[bytes],
    args_blobs: list[bytes], grace: float,
) -> list[tuple]:
    """Dask task body of a batch in kill mode: hand all its tasks to this worker's warm pool
    at once (the pool sends them ahead to its busy children), wait for each; one result
    tuple per task, in order. A cancel kills or dequeues each task in the pool as it would a
    lone one; a task tombstoned before the batch got here never reaches the pool."""
    n = len(keys)
    out: list[tuple | None] = [None] * n
    with _lock:
        _batches[bkey] = keys
        # A task the client answered ``dequeued`` while this batch was not running anywhere
        # is stopped by one of two things, whichever worker runs the batch and however late:
        # the client installs its record (``_revoked``) on the scheduler and on every worker
        # (a worker plugin; one that joins later gets it before it is given any task) BEFORE
        # it broadcasts the cancel. So a batch that registers its tasks here (this lock)
        # before the record arrived is still registered when the broadcast comes, which
        # stops them; one that registers after reads the record now. Tombstones alone were
        # not enough: only workers present at the broadcast get them, and they are bounded
        # (MAX_REMEMBERED) and aged (TOMBSTONE_TTL).
        stopped = _revoked_in(bkey)
        for i, key in enumerate(keys):
            if key in stopped:
                _tombstones.pop(key, None)
                out[i] = (SKIPPED,)
            elif not _claim(key, None):
                out[i] = (SKIPPED,)
    jobs: list[tuple[int, str, Any]] = []
    pool = None
    try:
        pool = _pool(grace)
        calls = {
            i: _cached(_calls, tokens[i], lambda i=i: _Call(fn_blobs[i]))
            for i in range(n) if out[i] is None
        }
        with _lock:  # a cancel that came while we prepared finds no job: its body never ran
            for i, call in calls.items():
                if keys[i] not in _kill_pending:
                    job = pool.submit(call, (args_blobs[i],), label=keys[i])
                    _running[keys[i]] = (pool, job)
                    jobs.append((i, keys[i], job))
    except BaseException as exc:  # no pool here: every task not in it yet fails with that
        err = _pack_error(exc, traceback.format_exc()) + (None, time.time(), "", "")
        sent = {j[0] for j in jobs}
        for i in range(n):
            if out[i] is None and i not in sent:
                out[i] = err
                _release(keys[i])
    sent = {j[0] for j in jobs}
    for i in range(n):  # claimed, then cancelled before it reached the pool: it never ran
        if out[i] is None and i not in sent:
            out[i] = (CANCELLED, "dequeued", None, time.time(), "", "")
            _release(keys[i])
    for i, key, job in jobs:
        state = job.wait()
        with _lock:
            asked = _kill_asked.get(key)
        out[i] = _pack_state(_after_kill(pool, state, asked, grace))
        _release(key)
    with _lock:
        _batches.pop(bkey, None)
    return out  # type: ignore[return-value]


def cancel_keys(keys: list[str]) -> dict[str, str]:
    """Broadcast target of a cancel: stop or flag each key running here, tombstone the rest.

    Returns ``{key: "killed" | "running" | "finished" | "absent"}``. Never blocks: kills are
    started here and confirmed by the task's own thread.
    """
    out: dict[str, str] = {}
    to_kill: list[Any] = []
    now = time.monotonic()
    with _lock:
        _prune_tombstones(now)
        for key in keys:
            if key in _running:
                entry = _running[key]
                if isinstance(entry, _Flag):
                    entry.value = True
                    out[key] = RUNNING
                elif entry is _WAITING or entry is _STOPPED:  # in a batch, not started
                    _running[key] = _STOPPED
                    out[key] = DEQUEUED
                elif entry is not None:
                    to_kill.append((key, *entry))
                else:  # claimed, not handed to the pool yet: it will not be
                    _kill_pending.add(key)
                    out[key] = DEQUEUED
            elif key in _finished:
                out[key] = FINISHED
            else:
                _tombstones[key] = now
                out[key] = ABSENT
    for key, pool, job in to_kill:
        with _lock:
            _kill_asked.setdefault(key, time.time())
        said = str(pool.cancel(job))
        out[key] = {"too_late": FINISHED, "dequeued": DEQUEUED}.get(said, KILLED)
    return out


def stop_released(key: str) -> None:
    """The scheduler let go of ``key`` while it ran here (its client died or cancelled it
    outside valent): stop it as a cancel would. Called by :class:`valent_dask.reaper.Reaper`
    on the worker's event loop; never blocks."""
    with _lock:
        keys = _batches.get(key)
        if keys is not None:
            keys = list(keys)  # a batch: stop its running task, tombstone the ones to come
        elif key not in _running:
            return
        else:
            keys = [key]
    cancel_keys(keys)


def _prune_tombstones(now: float) -> None:
    while _tombstones:
        key, t = next(iter(_tombstones.items()))
        if now - t < TOMBSTONE_TTL and len(_tombstones) <= MAX_REMEMBERED:
            break
        _tombstones.popitem(last=False)


def running_keys() -> dict[str, tuple]:
    """``{key: (started_at, host, stdout_path, stderr_path)}`` of every valent task body
    running in this worker process; the paths (kill mode: the pool child's capture files,
    on ``host``) are None in finish mode."""
    import socket

    from valent.plugin import Running

    host = socket.gethostname()
    with _lock:
        out: dict[str, tuple] = {}
        for key, t in _started.items():  # finish mode
            out[key] = (t, host, None, None)
        for key, entry in _running.items():  # kill mode: started when the pool says so
            if isinstance(entry, tuple):
                state = entry[1].state
                if isinstance(state, Running) and state.started_at is not None:
                    out[key] = (state.started_at, host, state.stdout_path, state.stderr_path)
        return out


def pool_pids() -> list[int]:
    """PIDs of this worker process's warm pool children (tests, diagnostics)."""
    return [pid for pool in list(_pools.values()) for pid in pool.own_pids()]


async def close_pools(only_idle: bool = True, wait: float = 5.0) -> int:
    """Shut this worker's pools down; with ``only_idle``, only once no task of ours runs here
    (waiting up to ``wait`` seconds for the last ones to end).

    A coroutine so that ``client.run`` awaits it without blocking the worker's event loop.
    Returns the number of pools closed.
    """
    import asyncio

    deadline = time.monotonic() + wait
    while only_idle and _running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    with _lock:
        if only_idle and _running:
            return 0
        pools = list(_pools.values())
        _pools.clear()
    loop = asyncio.get_running_loop()
    for pool in pools:
        await loop.run_in_executor(None, pool.shutdown)
    return len(pools)
