"""valent-subprocess: a valent executor that runs each task in a fresh Python subprocess."""

from __future__ import annotations

import valent

from .executor import SubprocessExecutor


@valent.hookimpl
def valent_executors() -> list[type[valent.Executor]]:
    """The executors this plugin provides."""
    return [SubprocessExecutor]


__all__ = ["SubprocessExecutor"]
