"""``valent.testing``: the executor conformance suite, for plugin authors (and valent itself).

Subclass :class:`ExecutorConformance` in your plugin's tests and override one fixture,
``executor``, to return a fresh instance of your executor::

    # tests/test_conformance.py of valent-slurm
    import pytest
    from valent.testing import ExecutorConformance
    from valent_slurm import SlurmExecutor

    class TestSlurmConformance(ExecutorConformance):
        @pytest.fixture
        def executor(self):
            return SlurmExecutor(partition="debug")   # the suite calls shutdown() after each test

pytest then runs every ``test_*`` method of the class against your executor: run returns
values, exceptions come back as ``Failed`` with a traceback, ``wake`` is called so a poll
sees the final state, cancel of a pending / running / finished task returns a truthful
outcome (a killed task's process tree is really gone), ``valent.cancel_requested()`` works
inside a task, a workflow dispatched on the executor runs and cancels, and no process is
left behind. Tests that need a capability your executor declares absent (``Capabilities``)
are skipped with the reason.

The tasks write marker files under pytest's ``tmp_path`` and the suite checks PIDs with
psutil, so run it against an executor whose tasks share this machine's filesystem and
process table (a local cluster, SSH to ``localhost``). Timing knobs are class attributes
(``task_timeout``, ``start_timeout``, ``settle``, ``max_blockers``, ``shutdown_timeout``).

valent runs the suite against its own executors the same way: see
``tests/test_conformance_local.py`` (a subclass and an ``executor`` fixture), which the Dask
and SSH executors copy. Importing ``valent.testing`` is cheap; pytest is imported only when
``ExecutorConformance`` or ``Harness`` is used. The task functions live in
``valent.testing.tasks`` (standard library only), so workers can import them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExecutorConformance", "Harness", "Started"]


def __getattr__(attr: str) -> Any:
    if attr in __all__:
        from . import _suite

        return getattr(_suite, attr)
    raise AttributeError(f"module 'valent.testing' has no attribute {attr!r}")
