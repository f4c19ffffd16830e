"""``valent.executors``: the installed executor classes by class name.

``ct.executors.LocalExecutor``, ``ct.executors.DaskExecutor``, ``ct.executors.SSHExecutor``
and any third-party executor class resolve here, loading plugins on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)
    from .plugins import get_plugins

    for info in get_plugins().executors.values():
        if info.cls.__name__ == attr:
            return info.cls
    names = sorted(i.cls.__name__ for i in get_plugins().executors.values())
    raise AttributeError(
        f"valent.executors has no {attr!r}; installed executor classes: {', '.join(names)}"
    )


def __dir__() -> list[str]:
    from .plugins import get_plugins

    return sorted(i.cls.__name__ for i in get_plugins().executors.values())
