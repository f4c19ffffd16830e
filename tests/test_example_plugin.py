"""The example third-party package in docs/examples/valent-subprocess, installed by tests/run.

It must be found through the ``valent`` entry-point group like any plugin, be selectable by
name from an electron, cancel for real, and pass the conformance suite.
"""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import pytest
import valent as ct
from valent._plugins.manager import get_plugins
from valent.testing import ExecutorConformance
from valent.testing.procs import alive

valent_subprocess = pytest.importorskip(
    "valent_subprocess",
    reason="pip install -e docs/examples/valent-subprocess (tests/run does it)",
)
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "valent-subprocess"


def test_installed_as_a_plugin_through_its_entry_point():
    eps = [ep for ep in metadata.entry_points(group="valent") if ep.name == "subprocess"]
    assert eps, "no 'subprocess' entry point in group 'valent'; is the package installed?"
    assert eps[0].value == "valent_subprocess"
    assert eps[0].dist.metadata["Name"] == "valent-subprocess"
    info = get_plugins().executors["subprocess"]
    assert info.cls is valent_subprocess.SubprocessExecutor
    assert (info.distribution, info.version) == ("valent-subprocess", "0.1.0")
    assert ct.executors.SubprocessExecutor is valent_subprocess.SubprocessExecutor
    assert Path(valent_subprocess.__file__).resolve().is_relative_to(EXAMPLE)


@ct.electron(executor="subprocess")
def square(x: int) -> int:
    return x * x


@ct.electron(executor="subprocess")
def total(values: list[int]) -> int:
    return sum(values)


@ct.lattice
def sum_of_squares(n: int) -> int:
    return total([square(i) for i in range(n)])


def test_workflow_selects_it_by_name():
    result = ct.dispatch_sync(sum_of_squares)(4)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 0 + 1 + 4 + 9
    nodes = result.get_all_node_results()
    assert {n["executor"] for n in nodes if n["node_name"] in ("square", "total")} == {
        "subprocess"
    }


@ct.electron(executor="subprocess")
def long_task(marker: str) -> str:
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(marker).write_text(f"{os.getpid()} {child.pid}")
    child.wait()
    return "finished"


@ct.electron(executor="subprocess")
def after(value: str) -> str:
    return value + " and after"


@ct.lattice
def cancellable(marker: str) -> str:
    return after(long_task(marker))


def test_cancel_kills_the_running_task_and_its_subprocess(tmp_path):
    marker = tmp_path / "pids"
    did = ct.dispatch(cancellable)(str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    task_pid, child_pid = map(int, marker.read_text().split())
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=30)
    assert result.status == ct.Status.CANCELLED
    long_node, after_node = (
        next(n for n in result.get_all_node_results() if n["node_name"] == name)
        for name in ("long_task", "after")
    )
    assert long_node["status"] == ct.Status.CANCELLED
    assert long_node["cancel_outcome"] == "killed"
    assert long_node["cancel_confirmed_at"] is not None
    assert after_node["status"] == ct.Status.CANCELLED
    for pid in (task_pid, child_pid):  # confirmed gone when get_result returns
        assert not alive(pid), f"process {pid} survived the cancel"


class TestSubprocessConformance(ExecutorConformance):
    """The example package passes the suite it tells plugin authors to use."""

    @pytest.fixture
    def executor(self):
        return valent_subprocess.SubprocessExecutor(max_parallel=2, grace=0.5)
