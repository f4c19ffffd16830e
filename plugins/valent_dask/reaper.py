"""Dask worker plugins: :class:`Reaper` stops a valent task whose key the scheduler let go
of; :class:`Revoked` carries the executor's record of batched tasks a cancel stopped before
their batch started (see :mod:`valent_dask.worker_side`, ``_revoked``).

Reaper: the scheduler releases a running task's key when no client wants it any more: the
client that submitted it died (``kill -9`` of the dispatching process), lost its connection,
or someone cancelled the future outside valent. Dask then lets the body run on (it cannot
stop a thread); the plugin sees the worker's ``executing -> released`` (or ``cancelled``)
transition and stops the task the way a valent cancel does: kill mode kills its process
group, finish mode sets its ``cancel_requested()`` flag. Registered by the executor with
``Client.register_plugin`` (idempotent: once per cluster); it acts only on keys of valent
tasks running in that worker.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import worker_side as ws


class Reaper(WorkerPlugin):
    """Stop a valent task body once the scheduler released its key (see the module doc)."""

    name = "valent-reaper"
    idempotent = True

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # executing -> released (or cancelled, by Dask version) while its body runs here
        if finish in ("cancelled", "released", "forgotten") and isinstance(key, str):
            ws.stop_released(key)


class Revoked(WorkerPlugin):
    """The tasks of not-yet-started batches that a cancel answered ``dequeued``: installed
    on every worker, and by Dask on every worker that joins later (before it is given any
    task), so such a task never starts wherever and whenever its batch runs.

    ``record``: ``{batch task key: keys of its stopped tasks}``. Each new record is a new
    plugin (``name`` carries a generation) registered before the older one is removed, so a
    worker always holds at least one of them (a batch reads their union).
    """

    def __init__(self, name: str, record: dict[str, frozenset[str]]):
        self.name = name
        self.record = record

    def setup(self, worker: Any) -> None:
        ws.set_revoked(self.name, self.record)

    def teardown(self, worker: Any) -> None:
        ws.drop_revoked(self.name)
