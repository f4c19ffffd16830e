"""``valent.executors``: another name for :mod:`valent.executor` (the same namespace)."""

from __future__ import annotations

from typing import Any


def __getattr__(attr: str) -> Any:
    from . import executor

    return getattr(executor, attr)


def __dir__() -> list[str]:
    from . import executor

    return dir(executor)
