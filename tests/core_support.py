"""Process helpers for the core tests, importable by name from any test module.

(``from conftest import ...`` is ambiguous once tests/ssh and tests/dask have their own
conftest.py: whichever was imported last answers. conftest.py re-exports these.)
"""

from __future__ import annotations

import time

from valent.testing.procs import alive, live_descendants, wait_gone  # noqa: F401


def wait_for(predicate, timeout: float = 10.0, every: float = 0.02):
    """Poll ``predicate()`` until it returns something truthy (returned) or ``timeout`` passes
    (then None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def read_pid(path, timeout: float = 10.0) -> int:
    """The pid a task wrote to ``path`` (waiting for the file to appear)."""
    text = wait_for(lambda: path.exists() and path.read_text().strip(), timeout)
    assert text, f"the task never wrote {path}"
    return int(text)
