"""Which host worker serves which settings, and tasks left behind on unreachable hosts.

One :class:`~valent_ssh.host.HostWorker` (thread + connection) per host and connection
settings, shared by every executor with those settings, created on first use.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Target
    from .host import HostWorker

_registry: dict[tuple, HostWorker] = {}
_orphans: dict[Target, list[dict[str, Any]]] = {}  # "reap" commands for the next connection
_lock = threading.Lock()


def remember_orphan(target: Target, reap: dict[str, Any]) -> None:
    """A task given up on (host unreachable): reap it when ``target`` is reached again."""
    with _lock:
        _orphans.setdefault(target, []).append(reap)


def take_orphans(target: Target) -> list[dict[str, Any]]:
    """The reap commands waiting for ``target`` (and forget them)."""
    with _lock:
        return _orphans.pop(target, [])


def get_worker(target: Target, max_parallel: int, reconnect_timeout: float) -> HostWorker:
    """The worker for these settings, created on first use."""
    from .host import HostWorker

    key = (target, max_parallel, reconnect_timeout)
    with _lock:
        worker = _registry.get(key)
        if worker is None:
            if not _registry:
                atexit.register(close_idle)
            worker = _registry[key] = HostWorker(target, max_parallel, reconnect_timeout)
        return worker


def close_all() -> None:
    """Close every host connection (remote tasks are not touched; tests call it)."""
    with _lock:
        workers = list(_registry.values())
        _registry.clear()
    for w in workers:
        w.close(timeout=2.0)


def close_idle() -> None:
    """Close the connections that serve no task (at exit, and after an executor's shutdown).

    A connection with tasks stays open: at interpreter exit valent's dispatcher may still be
    waiting for them, then shuts the executors down (which cancels what is left).
    """
    with _lock:
        idle = [k for k, w in _registry.items() if w.active_count() == 0]
        workers = [_registry.pop(k) for k in idle]
    for w in workers:
        w.close(timeout=2.0)
