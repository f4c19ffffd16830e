"""``valent.executor``: the installed executor classes by class name, as Covalent has them.

``ct.executor.LocalExecutor``, ``ct.executor.DaskExecutor``, ``ct.executor.SSHExecutor`` and
every third-party executor class resolve here by class name, loaded on first use (no Dask or
paramiko import until one is asked for). ``ct.executors`` is the same namespace.
``valent.executor.base`` holds Covalent's base classes for writing executors
(``BaseExecutor``, ``AsyncBaseExecutor``).
"""

from __future__ import annotations

from typing import Any


def _classes() -> dict[str, type]:
    from .._plugins.manager import get_plugins

    # a Covalent-style class published as a plugin is found under its own name, as itself
    return {
        info.cls.__name__: getattr(info.cls, "covalent_class", None) or info.cls
        for info in get_plugins().executors.values()
    }


def __getattr__(attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)
    if attr in ("base", "BaseExecutor", "AsyncBaseExecutor"):
        # Covalent's base classes, for executors written for Covalent
        import importlib

        module = importlib.import_module(f"{__name__}.base")
        return module if attr == "base" else getattr(module, attr)
    classes = _classes()
    if attr in classes:
        return classes[attr]
    raise AttributeError(
        f"valent.executor has no {attr!r}; installed executor classes: "
        f"{', '.join(sorted(classes))} (`valent plugins` lists them with their plugins)"
    )


def __dir__() -> list[str]:
    return sorted(_classes())
