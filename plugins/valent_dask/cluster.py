"""The executor's side of a Dask cluster: one client, and the cluster it may own.

A cluster valent owns is :class:`~valent_dask.programs.ClusterPrograms` (scheduler and workers
as their own programs), or with ``processes=False`` a LocalCluster of threads in this process.

Finished futures are followed on the client's event loop: a coroutine per future waits for
it; values are fetched one ``gather`` at a time (what finishes meanwhile goes in the next)
and handed to ``settle``, so ``poll`` never waits on the network, no thread hop is added
per task, and a burst costs a few round trips, not one per task.
Submissions go through one submitter thread, which sends whatever waits as one graph update.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("valent.dask")

FETCH_WAIT = 0.1
"""Seconds at most the fetcher waits after a multi-task gather, so that the next one takes more.

A lone task's value is fetched at once. During a burst each gather costs a scheduler round trip
and a ``get_data`` call on every worker that holds a value (on the event loops that also run
the tasks), so the next gather waits until every followed task is done or this long has
passed: a 1,000 no-op fan-out makes a handful of gathers instead of one per 25 ms (cluster CPU
~15% lower), and the last value is fetched as soon as the last task ends."""
EXIT_TIMEOUT = 3.0
"""Seconds each closing step may take at interpreter exit (exit must not hang)."""
_open: weakref.WeakSet[Connection] = weakref.WeakSet()
_atexit_registered = False
_atexit_lock = threading.Lock()


def _close_all_at_exit() -> None:
    for conn in list(_open):
        try:
            conn.close(timeout=EXIT_TIMEOUT)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def _register_atexit() -> None:
    """Register after ``distributed`` is imported, so ours runs before its own exit hooks."""
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_close_all_at_exit)
            _atexit_registered = True


def _forget_after_fork() -> None:
    """A forked child never closes its parent's connections (pid checked in close, too)."""
    global _open
    _open = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_after_fork)


def _ignore(future: Any) -> None:
    """A done-callback that does nothing (the follower continues after it)."""


class Connection:
    """A connected ``distributed.Client`` (and the cluster we started, if any).

    :param settle: ``settle(items)`` is called on the event loop with a list of
        ``((future, tag), value)``: what the task returned, the future's exception, or when
        it was cancelled the cancel error Dask gives (with its ``reason``) or None. It must
        not block.
    :param pump: ``pump(self)`` is called on the submitter thread after ``kick()``.
    """

    def __init__(
        self,
        *,
        scheduler_address: str | None,
        n_workers: int,
        threads_per_worker: int,
        processes: bool,
        connect_timeout: float,
        settle: Callable[[list[tuple[Any, Any]]], None],
        pump: Callable[[Connection], None],
    ):
        self.cluster: Any = None
        """What this connection started: ClusterPrograms, or a threads-only LocalCluster."""
        self.owner = os.getpid()
        if scheduler_address is None and processes:
            from .programs import ClusterPrograms

            # its programs boot while this process imports Dask (both take ~0.6 s)
            self.cluster = ClusterPrograms(n_workers, threads_per_worker)
        try:
            import distributed
        except BaseException:
            if self.cluster is not None:
                self.cluster.close()
            raise

        if scheduler_address is not None:
            self.client = distributed.Client(
                scheduler_address, set_as_default=False, timeout=connect_timeout
            )
        elif processes:
            try:
                self.client = distributed.Client(
                    self.cluster.wait_for_address(connect_timeout),
                    set_as_default=False,
                    timeout=connect_timeout,
                )
                self.cluster.wait_for_workers(self.client, connect_timeout)
            except BaseException:
                client = getattr(self, "client", None)
                if client is not None:
                    client.close(timeout=2.0)
                self.cluster.close()
                raise
        else:  # threads in this process: nothing is spawned, so nothing re-runs the script
            self.cluster = distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                processes=False,
                host="127.0.0.1",
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                scheduler_port=0,
            )
            try:
                self.client = distributed.Client(self.cluster, set_as_default=False)
            except BaseException:
                self.cluster.close()
                raise
        self.address: str = self.client.scheduler.address
        self.threads = 1
        """Worker threads of the cluster (all workers), as last asked (``refresh_threads``)."""
        self.refresh_threads()
        try:
            from .reaper import Reaper

            # a task whose key the scheduler lets go of (this process died, ...) is stopped
            self.client.register_plugin(Reaper(), name=Reaper.name)
        except Exception as exc:  # noqa: BLE001 - tasks still run; only that safety net is off
            log.warning("valent-dask: could not register the worker plugin: %r", exc)
        self._settle = settle
        self._pump = pump
        self._kick = threading.Event()
        self._followers: set[Any] = set()
        self._to_fetch: list[tuple[Any, Any]] = []
        self._fetching = False
        self._unfinished = 0
        """Followed futures not done yet (event loop only)."""
        self._all_done: Any = None
        """An asyncio.Event set when ``_unfinished`` drops to 0 (made on the loop)."""
        self._closed = False
        self._submitter = threading.Thread(
            target=self._submit_loop, name="valent-dask-submitter", daemon=True
        )
        self._submitter.start()
        _register_atexit()
        _open.add(self)

    def refresh_threads(self) -> None:
        """Ask the scheduler how many worker threads the cluster has (one round trip)."""
        try:
            info = self.client.scheduler_info(n_workers=0)
            total = info.get("total_threads") or sum(
                w.get("nthreads", 0) for w in info.get("workers", {}).values()
            )
        except Exception as exc:  # noqa: BLE001 - keep the last answer
            log.debug("valent-dask: asking the cluster's size failed: %r", exc)
            return
        self.threads = max(1, int(total or 1))

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def owns_cluster(self) -> bool:
        """True when this connection started the cluster (and will close it)."""
        return self.cluster is not None

    # ------------------------------------------------------------ submitting

    def kick(self) -> None:
        """Tell the submitter thread that tasks wait: it calls ``pump(self)``."""
        self._kick.set()

    def _submit_loop(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._closed:
                return
            try:
                self._pump(self)
            except Exception:  # noqa: BLE001 - never let the submitter die
                log.exception("valent-dask: submitting tasks failed")

    def submit_many(self, fn: Callable[..., Any], columns: list[list], keys: list[str]) -> list:
        """Submit ``fn(*row)`` for each row of ``columns`` under ``keys``: one graph update."""
        if len(keys) == 1:
            return [self.client.submit(fn, *(c[0] for c in columns), key=keys[0], pure=False)]
        return self.client.map(fn, *columns, key=keys, pure=False)

    def watch(self, pairs: list[tuple[Any, Any]]) -> None:
        """Follow each ``(future, tag)``: ``settle`` gets its value when it is done.

        One event-loop callback per batch (``Future.add_done_callback`` costs a loop wake-up
        and a hop through Dask's callback thread per future).
        """
        self.client.loop.add_callback(self._watch_in_loop, pairs)

    def _watch_in_loop(self, pairs: list[tuple[Any, Any]]) -> None:
        for future, tag in pairs:
            self._refollow(future, tag)

    def _refollow(self, future: Any, tag: Any) -> None:
        """Follow ``future`` on the loop (loop thread only)."""
        self._unfinished += 1
        self._keep(self._follow(future, tag))

    async def _follow(self, future: Any, tag: Any) -> None:
        from distributed.client import done_callback

        try:
            while True:
                await done_callback(future, _ignore)
                status = future.status
                if status == "finished":
                    self._to_fetch.append((future, tag))
                    if not self._fetching:
                        self._fetching = True
                        self._keep(self._fetch_loop())
                    return
                if status == "error":
                    value = await future.exception(asynchronous=True)
                elif status == "cancelled":
                    value = await self._cancel_reason(future)
                else:  # lost with a worker and recomputed by Dask: follow it again
                    continue
                self._settle([((future, tag), value)])
                return
        except Exception:  # noqa: BLE001 - a follower must never die silently
            log.exception("valent-dask: following %s failed", getattr(future, "key", future))
        finally:
            self._unfinished -= 1
            if not self._unfinished and self._all_done is not None:
                self._all_done.set()

    async def _cancel_reason(self, future: Any) -> Any:
        """Why Dask cancelled ``future``: the ``FutureCancelledError`` that ``gather`` raises
        for it (its ``reason``: ``scheduler-connection-lost``, ...), or None."""
        try:
            await self.client.gather(future, asynchronous=True)
        except BaseException as exc:
            if getattr(exc, "key", None) != future.key or not hasattr(exc, "reason"):
                raise  # not the future's own cancellation (this follower is being cancelled)
            return exc
        return None

    async def _fetch_loop(self) -> None:
        """Fetch finished values, one ``gather`` at a time: what finishes meanwhile waits and
        goes in the next one (a lone task is fetched at once; a burst in few round trips)."""

        try:
            while self._to_fetch:
                batch, self._to_fetch = self._to_fetch, []
                try:
                    values = await self.client.gather([f for f, _ in batch], asynchronous=True)
                    out = list(zip(batch, values, strict=True))
                except Exception:  # noqa: BLE001 - one lost value must not hide the others
                    out = []
                    for item in batch:
                        try:
                            out.append((item, await self.client.gather(item[0], asynchronous=True)))
                        except Exception as exc:  # noqa: BLE001
                            if item[0].status == "pending":  # recomputed: follow it again
                                self._refollow(*item)
                            else:
                                out.append((item, exc))
                self._settle(out)
                if len(batch) > 1 and self._unfinished:  # a burst: let the next gather take more
                    await self._until_all_done(FETCH_WAIT)
        except Exception:  # noqa: BLE001
            log.exception("valent-dask: fetching results failed")
        finally:
            self._fetching = False

    async def _until_all_done(self, timeout: float) -> None:
        """Wait until no followed future is unfinished, at most ``timeout`` seconds."""
        import asyncio

        if self._all_done is None:
            self._all_done = asyncio.Event()
        self._all_done.clear()
        if not self._unfinished:
            return
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
        except TimeoutError:
            pass

    def _keep(self, coro: Any) -> None:
        """Run ``coro`` on the loop, holding a reference until it ends (lock-free: loop only)."""
        import asyncio

        t = asyncio.ensure_future(coro)
        self._followers.add(t)
        t.add_done_callback(self._followers.discard)

    # ------------------------------------------------------------ closing

    def broadcast(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> dict:
        """``client.run(fn, *args)`` on every worker; a worker's exception is its answer."""
        return self.client.run(fn, *args, on_error="return", callback_timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Close the client; end the cluster if we started it (never a user's cluster).

        Bounded: each step waits at most ``timeout`` seconds. In a forked child of the
        process that connected, nothing is touched (the client and cluster are the parent's).
        """
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        if os.getpid() != self.owner:
            return
        from .worker_side import close_pools

        try:
            # a user's cluster keeps its workers; only idle pools of ours are retired there
            self.broadcast(close_pools, not self.owns_cluster, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            log.debug("valent-dask: closing worker pools failed: %r", exc)
        self._kick.set()
        self._submitter.join(timeout)
        try:
            self.client.close(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the cluster still has to go
            log.debug("valent-dask: closing the client failed: %r", exc)
        finally:
            if self.cluster is not None:
                self.cluster.close(timeout=min(timeout, 5.0))
