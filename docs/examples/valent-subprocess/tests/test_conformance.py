"""SubprocessExecutor against valent's executor conformance suite."""

from __future__ import annotations

import pytest
from valent.testing import ExecutorConformance
from valent_subprocess import SubprocessExecutor


class TestSubprocessConformance(ExecutorConformance):
    @pytest.fixture
    def executor(self) -> SubprocessExecutor:
        # Two slots, so the pending-cancel test can fill them; the suite calls shutdown().
        return SubprocessExecutor(max_parallel=2, grace=0.5)
