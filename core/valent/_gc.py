"""Pausing Python's cyclic garbage collector while big graphs are built."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (tracing a lattice or writing its dispatch makes
    tens of thousands of objects that all stay alive: a collection meanwhile would only walk
    them, and tracing a 100,000-node lattice took twice as long). Cyclic garbage made
    meanwhile is collected after. Nested pauses resume at the outermost one's end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
