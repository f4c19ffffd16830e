"""PoolExecutor against valent's executor conformance suite."""

from __future__ import annotations

import pytest
from valent.testing import ExecutorConformance
from valent_pool import PoolExecutor


class TestPoolConformance(ExecutorConformance):
    @pytest.fixture
    def executor(self) -> PoolExecutor:
        # Two workers, so the pending-cancel test can fill them; the suite calls shutdown().
        return PoolExecutor(workers=2, grace=0.5)
