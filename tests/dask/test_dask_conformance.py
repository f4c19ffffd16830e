"""The executor conformance suite (valent.testing) against the DaskExecutor, both modes.

Each test gets its own executor connected by address to the session's real LocalCluster
(2 worker processes x 1 thread); its ``shutdown()`` leaves that cluster up.
"""

from __future__ import annotations

import pytest
import valent
from valent.testing import ExecutorConformance


class _DaskConformance(ExecutorConformance):
    start_timeout = 60.0
    settle = 1.5  # the executor learns a task started from a poll of the workers every 0.5 s
    cancel_mode = "kill"

    @pytest.fixture
    def executor(self, dask_cluster, dask_client):
        return valent.executors.DaskExecutor(
            scheduler_address=dask_cluster.scheduler_address, cancel_mode=self.cancel_mode,
            grace=0.5,
        )


class TestDaskKillConformance(_DaskConformance):
    cancel_mode = "kill"


class TestDaskFinishConformance(_DaskConformance):
    cancel_mode = "finish"
