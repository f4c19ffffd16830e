"""The Local executor against valent's executor conformance suite (``valent.testing``)."""

from __future__ import annotations

import pytest
from valent.testing import ExecutorConformance
from valent_local import LocalExecutor


class TestLocalConformance(ExecutorConformance):
    """Two fixed workers, so the pending-cancel test can fill them."""

    @pytest.fixture
    def executor(self) -> LocalExecutor:
        return LocalExecutor(workers=2, grace=0.5)
