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


# ---------------------------------------------------------------------- the suite can fail

pytest_plugins = ["pytester"]

LIARS = '''
import pytest
from valent import CancelOutcome
from valent.testing import ExecutorConformance
from valent_local import LocalExecutor


class NeverWakes(LocalExecutor):
    def run(self, task, wake):
        return super().run(task, lambda: None)


class FakeKill(LocalExecutor):
    def cancel(self, handle):
        if handle.worker is not None and not handle.state.final:
            return CancelOutcome.KILLED  # ...and does nothing
        return super().cancel(handle)


class TestNeverWakes(ExecutorConformance):
    task_timeout = start_timeout = 1.0

    @pytest.fixture
    def executor(self):
        return NeverWakes(workers=1)


class TestFakeKill(ExecutorConformance):
    task_timeout = 1.0

    @pytest.fixture
    def executor(self):
        return FakeKill(workers=1, grace=0.1)
'''


def test_suite_fails_executors_that_break_the_contract(pytester):
    pytester.makepyfile(test_liars=LIARS)
    # in a subprocess: an in-process run drops the modules it imported from sys.modules
    # afterwards, and the second copies imported later broke closing a Dask LocalCluster
    # in the tests that ran after this one (its close hung until pytest-timeout)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider",
        "-k", "(NeverWakes and (run_returns_value or wake_is_called)) or "
              "(FakeKill and kills_its_process_tree)",
    )
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "*reached Completed(*) without calling wake() after the change*",
        "*no final state reached through wake()*",
        "*not final 1.0 s after it started*",
    ], consecutive=False)
