"""valent-pool: the plugin-author guide's executor, on valent's process pool."""

from __future__ import annotations

from valent.plugin import hookimpl

from .executor import PoolExecutor


@hookimpl
def valent_executors() -> list[type]:
    """The executors this plugin provides."""
    return [PoolExecutor]


__all__ = ["PoolExecutor"]
