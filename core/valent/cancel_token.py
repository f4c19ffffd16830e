"""The cooperative cancel token: ``valent.cancel_requested()`` inside a running task."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()
_process_token: Callable[[], bool] | None = None


def cancel_requested() -> bool:
    """True once a cancel was requested for the task that calls it.

    Call it in long loops and return (or raise) when it is True: the task then stops
    cleanly before the hard kill arrives. Outside a task it returns False.
    """
    token = getattr(_local, "token", None) or _process_token
    return bool(token and token())


def set_process_token(token: Callable[[], bool] | None) -> None:
    """Executor-side: make ``token`` answer ``cancel_requested()`` in this process."""
    global _process_token
    _process_token = token


@contextmanager
def thread_token(token: Callable[[], bool]) -> Iterator[None]:
    """Executor-side: make ``token`` answer ``cancel_requested()`` in this thread, for a block."""
    old = getattr(_local, "token", None)
    _local.token = token
    try:
        yield
    finally:
        _local.token = old
