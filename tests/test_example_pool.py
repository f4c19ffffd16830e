"""The guide's ~40-line executor (docs/examples/valent-pool), installed by tests/run.

The snippet in docs/writing-executors.md is that exact file; the package is found through
the ``valent`` entry-point group and passes the conformance suite.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import valent as ct
from valent.testing import ExecutorConformance

valent_pool = pytest.importorskip(
    "valent_pool", reason="pip install -e docs/examples/valent-pool (tests/run does it)"
)
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "examples" / "valent-pool" / "src" / "valent_pool" / "executor.py"


def test_the_guide_shows_exactly_the_shipped_file():
    guide = (ROOT / "docs" / "writing-executors.md").read_text()
    code = SOURCE.read_text()
    assert f"```python\n{code}```" in guide, "docs/writing-executors.md and the example differ"
    assert len(code.splitlines()) <= 55


def test_found_through_its_entry_point_and_used_by_name():
    (ep,) = [ep for ep in metadata.entry_points(group="valent") if ep.name == "pool"]
    assert ep.value == "valent_pool"
    assert ct.executor.PoolExecutor is valent_pool.PoolExecutor

    @ct.electron(executor="pool")
    def square(x: int) -> int:
        return x * x

    @ct.lattice
    def squares(n: int) -> list[int]:
        return [square(i) for i in range(n)]

    result = ct.dispatch_sync(squares)(4)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [0, 1, 4, 9]


class TestPoolExampleConformance(ExecutorConformance):
    @pytest.fixture
    def executor(self):
        return valent_pool.PoolExecutor(workers=2, grace=0.5)
