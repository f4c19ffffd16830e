"""The Dask executor plugin: run electrons on a Dask cluster and really stop them.

Registered through the ``valent`` entry point ``dask = "valent_dask"``. Importing it does
not import Dask: the cluster is started (or connected to) on the first task.
"""

from __future__ import annotations

import valent

from .executor import DaskExecutor


@valent.hookimpl
def valent_executors() -> list[type[valent.Executor]]:
    """Provide :class:`DaskExecutor` under the name ``"dask"``."""
    return [DaskExecutor]


__all__ = ["DaskExecutor", "valent_executors"]
