"""The Local executor plugin: tasks run in a warm pool of killable worker processes."""

from __future__ import annotations

import valent

from .executor import LocalExecutor


@valent.hookimpl
def valent_executors() -> list[type[valent.Executor]]:
    return [LocalExecutor]


__all__ = ["LocalExecutor"]
