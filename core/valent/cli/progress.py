"""A dispatch's progress read from the store: node counts, and a rich progress bar.

Shared by ``get_result(wait=True, progress=True)`` and ``valent watch``. Reads only the
store, so it works in the owning process and in any other.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..status import FINAL_VALUES


def node_counts(nodes: Sequence[Any]) -> tuple[int, int, Counter[str]]:
    """``(done, total, count per status)`` for a dispatch's node rows."""
    counts = Counter(n["status"] for n in nodes)
    done = sum(v for k, v in counts.items() if k in FINAL_VALUES)
    return done, len(nodes), counts


def fmt_secs(secs: float | None) -> str:
    """``4.2s``, ``3m07s``, ``2h05m``; ``-`` for None."""
    if secs is None:
        return "-"
    if secs < 60:
        return f"{secs:.1f}s"
    m, s = divmod(int(secs), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def dispatch_seconds(row: Any) -> float | None:
    """How long a dispatch ran (so far, while it is not final)."""
    start, end = row["start_time"], row["end_time"]
    if start is None:
        return None
    if end is None:
        return time.time() - start if row["status"] not in FINAL_VALUES else None
    return max(0.0, end - start)


def make_bar(console: Any = None) -> Any:
    """A rich ``Progress``: description, bar, done/total nodes, the dispatch's run time.

    Update it with ``completed``, ``total``, ``description`` and ``elapsed`` (a string).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("nodes  {task.fields[elapsed]}"),
        console=console,
    )


def update_bar(bar: Any, task: Any, row: Any, nodes: Sequence[Any]) -> None:
    """Move ``bar``'s ``task`` to the dispatch's current state."""
    done, total, _ = node_counts(nodes)
    bar.update(
        task, completed=done, total=total, description=describe(row),
        elapsed=fmt_secs(dispatch_seconds(row)),
    )


def describe(row: Any) -> str:
    """``lattice_name 1a2b3c4d RUNNING`` for a progress bar."""
    return f"{row['lattice_name']} {row['dispatch_id'][:8]} {row['status']}"


class StoreProgress:
    """A progress bar (on stderr) that follows a dispatch in the store while a block runs.

        with StoreProgress(store, dispatch_id):
            wait_somehow()
    """

    def __init__(self, store: Any, dispatch_id: str, interval: float = 0.2):
        from rich.console import Console

        self.store = store
        self.dispatch_id = dispatch_id
        self.interval = interval
        self.bar = make_bar(Console(stderr=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="valent-progress", daemon=True)
        self._task: Any = None

    def __enter__(self) -> StoreProgress:
        self._task = self.bar.add_task(self.dispatch_id[:8], total=None, elapsed="")
        self.update()
        self.bar.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.update()
        finally:
            self.bar.stop()

    def update(self) -> None:
        """Read the store once and move the bar."""
        row = self.store.dispatch_row(self.dispatch_id)
        nodes = self.store.node_rows(self.dispatch_id, with_outputs=False)
        update_bar(self.bar, self._task, row, nodes)

    def _follow(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.update()
        except Exception:  # a display problem must never break the wait it decorates
            pass
        finally:
            self.store.close()
