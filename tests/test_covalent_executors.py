"""Covalent-style executors (valent.executor.base) run through the adapter: the TimingExecutor
how-to, the choosing-executors how-to, the three kinds cancelled while running, publishing a
class as a plugin, and the conformance suite where it applies."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import valent as ct
from core_support import alive, read_pid, wait_gone, wait_until
from covex_support import (
    AsyncInProcess,
    AsyncSubmitting,
    FireAndWait,
    InProcess,
    Submitting,
    pid_and_sleep,
)
from valent._covalent_executor import CovalentExecutor, adapter_class
from valent.testing import ExecutorConformance

TIMING_PLUGIN = '''
"""Timing executor plugin (the how-to's, with only the import changed)."""

import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from valent.executor.base import BaseExecutor

executor_plugin_name = "TimingExecutor"  # Required by covalent.executors

_EXECUTOR_PLUGIN_DEFAULTS = {"timing_filepath": ""}


class TimingExecutor(BaseExecutor):
    """Executor that times the execution time."""

    def __init__(self, timing_filepath: str = "", **kwargs):
        self.timing_filepath = str(Path(timing_filepath).resolve())
        super().__init__(**kwargs)

    def run(self, function: Callable, args: List, kwargs: Dict, task_metadata: Dict) -> Any:
        start = time.process_time()
        result = function(*args, **kwargs)
        time_taken = time.process_time() - start
        with open(f"{self.timing_filepath}", "w") as f:
            f.write(
                f"Node {task_metadata['node_id']} in dispatch {task_metadata['dispatch_id']} "
                f"took {time_taken}s of CPU time.\\n"
            )
        return result
'''


@pytest.fixture
def custom_executors(tmp_path, monkeypatch):
    """The how-to's custom_executors package, importable (as its sys.path.append does)."""
    pkg = tmp_path / "nb" / "custom_executors"
    pkg.mkdir(parents=True)
    (pkg / "timing_plugin.py").write_text(TIMING_PLUGIN)
    (pkg / "__init__.py").write_text("from .timing_plugin import TimingExecutor\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("custom_executors")]:
        del sys.modules[name]


def _shutdown(*executors):
    from valent._covalent_executor import wrap

    for ex in executors:
        wrap(ex).shutdown()


def test_creating_custom_executors_howto(custom_executors, tmp_path):
    """The TimingExecutor how-to: the lattice COMPLETES with e's series value, and the timing
    file names node 0 and the dispatch id with a CPU time."""
    from custom_executors import TimingExecutor

    timing_log = str(tmp_path / "cpu_timing.log")
    timing_executor = TimingExecutor(timing_log)

    @ct.electron(executor=timing_executor)
    def e_ser(x):
        e_est = 1
        fact = 1
        for i in range(1, x):
            fact *= i
            e_est += 1 / fact
        return e_est

    @ct.lattice(executor=timing_executor)
    def workflow(x):
        return e_ser(x)

    try:
        dispatch_id = ct.dispatch(workflow)(10)
        result = ct.get_result(dispatch_id, wait=True, timeout=120)
        assert result.status == ct.Status.COMPLETED, result.error
        assert result.result == pytest.approx(2.7182815255731922)
        lines = open(timing_log).read().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"Node 0 in dispatch {dispatch_id} took ")
        assert lines[0].endswith("s of CPU time.")
        assert "e_ser(0): 2.718281525573192" in str(result)
        node = result.get_node_result(0)
        assert node["executor"] == "timing_plugin"  # Covalent's short name of the class
    finally:
        _shutdown(timing_executor)


def test_choosing_executors_howto():
    """The choosing-executors how-to: an executor instance from ct.executor and one by
    short name; the result is 4 and the nodes print as Covalent's."""
    executor1 = ct.executor.LocalExecutor()

    @ct.electron(executor=executor1)
    def identity(x):
        return x

    @ct.electron(executor="local")
    def square(x):
        return x * x

    @ct.lattice
    def workflow(a):
        val_1 = identity(x=a)
        return square(x=val_1)

    try:
        dispatch_id = ct.dispatch(workflow)(a=2)
        output = ct.get_result(dispatch_id=dispatch_id, wait=True, timeout=120)
        assert output.status == ct.Status.COMPLETED
        assert output.result == 4
        text = str(output)
        for line in ("identity(0): 2", ":parameter:2(1): 2", "square(2): 4"):
            assert line in text
    finally:
        executor1.shutdown()


def test_base_module_and_names():
    """ct.executor.base imports; task_metadata, setup and teardown as Covalent has them."""
    assert ct.executor.base.BaseExecutor is __import__(
        "valent.executor.base", fromlist=["x"]
    ).BaseExecutor
    assert ct.executor.BaseExecutor is ct.executor.base.BaseExecutor
    assert ct.executors.AsyncBaseExecutor is ct.executor.base.AsyncBaseExecutor
    ex = InProcess()
    assert ex.short_name() == "covex_support"
    assert ex.to_dict()["short_name"] == "covex_support"
    with pytest.raises(TypeError, match="abstract"):
        ct.executor.base.BaseExecutor()
    with pytest.raises(ct.ValentError, match="Covalent-style executor from"):
        ct.electron(executor=object())(lambda: 1)


def test_setup_run_teardown_with_task_metadata(tmp_path, results_dir):
    ex = InProcess(note_dir=str(tmp_path))
    task = ct.electron(executor=ex)(pid_and_sleep)
    d = tmp_path / "t"
    d.mkdir()

    @ct.lattice
    def flow():
        return task(str(d), 0)

    try:
        did = ct.dispatch(flow)()
        r = ct.get_result(did, wait=True, timeout=60)
        assert r.status == ct.Status.COMPLETED and r.result == "finished"
        meta = json.loads((tmp_path / "setup-0").read_text())
        assert meta == {"dispatch_id": did, "node_id": 0, "results_dir": str(results_dir)}
        assert (tmp_path / "teardown-0").read_text() == "done"
        assert "in-process run of node 0" in r.get_node_result(0)["stdout"]
    finally:
        _shutdown(ex)


def _dispatch_long(ex, tmp_path):
    d = tmp_path / "job"
    d.mkdir()
    task = ct.electron(executor=ex)(pid_and_sleep)

    @ct.lattice
    def flow():
        return task(str(d), 60)

    did = ct.dispatch(flow)()
    pid = read_pid(d / "pid", timeout=60)
    child = read_pid(d / "child.pid", timeout=10)
    return did, pid, child


@pytest.mark.parametrize("cls", [InProcess, AsyncInProcess])
def test_in_process_kind_is_killed_with_its_tree(cls, tmp_path):
    """run() calls the function itself: it runs in a pool worker; cancel kills the worker,
    the function's subprocess too, and says killed."""
    ex = cls()
    try:
        did, pid, child = _dispatch_long(ex, tmp_path)
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
        node = r.get_node_result(0)
        assert r.status == ct.Status.CANCELLED
        assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
        assert wait_gone([pid, child]) == [], "a process of the killed task still runs"
    finally:
        _shutdown(ex)


@pytest.mark.parametrize("cls", [Submitting, AsyncSubmitting])
def test_submitting_kind_with_cancel_is_killed(cls, tmp_path):
    """run() submits to a backend job and records its handle; cancel(task_metadata,
    job_handle) kills the job and says True: the node ends killed, the job's processes are
    gone."""
    ex = cls()
    try:
        did, pid, child = _dispatch_long(ex, tmp_path)
        ct.cancel(did)
        r = ct.get_result(did, wait=True, timeout=60)
        node = r.get_node_result(0)
        assert r.status == ct.Status.CANCELLED
        assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
        assert wait_gone([pid, child], 1) == []
    finally:
        _shutdown(ex)


def test_submitting_kind_whose_cancel_fails_runs_to_completion(tmp_path):
    """The executor's cancel returns False: the job goes on, its output is kept, and the
    outcome says so (never killed)."""
    ex = Submitting(cancel_works=False)
    d = tmp_path / "job"
    d.mkdir()
    task = ct.electron(executor=ex)(pid_and_sleep)

    @ct.lattice
    def flow():
        return task(str(d), 2)

    try:
        did = ct.dispatch(flow)()
        pid = read_pid(d / "pid", timeout=60)
        ct.cancel(did)
        assert alive(pid)
        r = ct.get_result(did, wait=True, timeout=60)
        node = r.get_node_result(0)
        assert node["status"] == ct.Status.COMPLETED and node["output"] == "finished"
        assert node["cancel_outcome"] == "runs_to_completion"
        assert r.status == ct.Status.CANCELLED
    finally:
        _shutdown(ex)


def test_submitting_kind_without_cancel_runs_to_completion(tmp_path):
    """run() pickles the function for a backend and implements no cancel: the work may go
    on, so the cancel says runs_to_completion, the job is not killed, and its output is
    kept."""
    ex = FireAndWait()
    d = tmp_path / "job"
    d.mkdir()
    task = ct.electron(executor=ex)(pid_and_sleep)

    @ct.lattice
    def flow():
        return task(str(d), 2)

    try:
        did = ct.dispatch(flow)()
        pid = read_pid(d / "pid", timeout=60)
        ct.cancel(did)
        time.sleep(0.5)
        assert alive(pid), "the backend job was killed, but the outcome promises it runs on"
        r = ct.get_result(did, wait=True, timeout=60)
        node = r.get_node_result(0)
        assert node["cancel_outcome"] == "runs_to_completion", node
        assert node["status"] == ct.Status.COMPLETED and node["output"] == "finished"
    finally:
        _shutdown(ex)


def test_failure_in_run_is_failed(tmp_path):
    ex = Submitting()

    @ct.electron(executor=ex)
    def boom():
        raise ValueError("covalent-style boom")

    @ct.lattice
    def flow():
        return boom()

    try:
        r = ct.get_result(ct.dispatch(flow)(), wait=True, timeout=60)
        assert r.status == ct.Status.FAILED
        assert "covalent-style boom" in r.get_node_result(0)["error"]
    finally:
        _shutdown(ex)


# ---------------------------------------------------------------------- publishing


def test_published_through_a_valent_executors_hook(custom_executors, tmp_path):
    """A plugin's valent_executors hook may return a Covalent-style class: it is selectable
    by name, its settings come from the config, and ct.executor finds the class itself."""
    import types

    from custom_executors import TimingExecutor
    from valent._plugins.manager import get_plugins, reset_plugins

    plugin = types.ModuleType("valent_timing_test")
    plugin.valent_executors = ct.hookimpl(lambda: [TimingExecutor])
    log = tmp_path / "named.log"
    try:
        get_plugins().register(plugin, "timing-test")
        ct.set_config({"executors.timing_plugin.timing_filepath": str(log)})
        assert ct.executor.TimingExecutor is TimingExecutor
        info = get_plugins().executors["timing_plugin"]
        assert issubclass(info.cls, CovalentExecutor)
        assert "timing_filepath" in info.cls.settings()

        @ct.electron(executor="timing_plugin")
        def one():
            return 1

        @ct.lattice
        def flow():
            return one()

        did = ct.dispatch(flow)()
        r = ct.get_result(did, wait=True, timeout=60)
        assert r.status == ct.Status.COMPLETED and r.result == 1
        assert log.read_text().startswith(f"Node 0 in dispatch {did}")
    finally:
        from valent import api

        if api._dispatcher is not None:
            ex = api._dispatcher.executors.named("timing_plugin")
            if ex is not None:
                ex.shutdown()
        reset_plugins()


def test_published_as_a_covalent_plugin_module(custom_executors):
    """A module laid out as Covalent's plugins are (executor_plugin_name) registers too."""
    import custom_executors.timing_plugin as module
    from valent._plugins.manager import build_plugins

    plugins = build_plugins()
    plugins.register(module, "timing-module")
    assert plugins.executors["timing_plugin"].cls is adapter_class(module.TimingExecutor)


def test_published_by_an_installed_distribution(tmp_path):
    """A tiny package with a `valent` entry point naming a Covalent-style plugin module,
    installed into a temp dir: a fresh interpreter finds and runs it by name."""
    import subprocess

    site = tmp_path / "site"
    pkg = site / "valent_timing_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(TIMING_PLUGIN)
    dist = site / "valent_timing_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: valent-timing-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[valent]\ntiming = valent_timing_pkg\n")
    log = tmp_path / "t.log"
    script = textwrap.dedent(f"""
        import valent as ct
        assert ct.executor.TimingExecutor.__module__ == "valent_timing_pkg"
        ex = ct.executor.TimingExecutor({str(log)!r})

        @ct.electron(executor=ex)
        def two():
            return 2

        @ct.lattice
        def flow():
            return two()

        r = ct.get_result(ct.dispatch(flow)(), wait=True, timeout=60)
        print(r.status, r.result)
    """)
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["COMPLETED", "2"]
    assert log.read_text().startswith("Node 0 in dispatch ")


# ---------------------------------------------------------------------- conformance


class TestInProcessConformance(ExecutorConformance):
    """Pool mode (run() calls the function): every promise of a killing executor."""

    @pytest.fixture
    def executor(self):
        return ct.executor.base.as_executor(InProcess(), workers=2, grace=0.5)


class TestNoCancelSubmittingConformance(ExecutorConformance):
    """Thread mode whose cancel cannot stop anything: a runs-to-completion executor."""

    @pytest.fixture
    def executor(self):
        return ct.executor.base.as_executor(Submitting(cancel_works=False))

    def test_cancel_requested_is_seen_by_a_running_task(self, valent_harness):
        pytest.skip("the function runs in a backend job: valent.cancel_requested() is the "
                    "executor's get_cancel_requested() there, tested in this file")


def test_adapter_reports_dequeued_when_run_stops_before_submitting(tmp_path):
    """run() sees the cancel before it submitted anything (no job handle): dequeued."""
    from valent.executor.base import TaskCancelledError
    from valent.task import Task

    class Careful(Submitting):
        def run(self, function, args, kwargs, task_metadata):
            while not self.get_cancel_requested():
                time.sleep(0.01)
            raise TaskCancelledError("stopped before submitting")

    ex = CovalentExecutor(Careful())
    woke = []
    job = ex.run(Task("d", 0, "t", pid_and_sleep, (str(tmp_path), 1)), lambda: woke.append(1))
    assert wait_until(lambda: not isinstance(ex.poll(job), ct.Pending), 10)
    assert ex.cancel(job) == ct.CancelOutcome.RUNS_TO_COMPLETION
    state = wait_until(lambda: ex.poll(job).final and ex.poll(job), 10)
    assert isinstance(state, ct.Cancelled) and state.outcome == ct.CancelOutcome.DEQUEUED
    assert woke
    assert not (Path(tmp_path) / "pid").exists()


def test_an_executor_that_cannot_travel_to_the_worker_is_named():
    """Pool mode pickles the executor to its worker: one holding a lock fails the node with
    an error that names the class and what to do."""
    import threading

    class Locky(InProcess):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()

    ex = Locky()

    @ct.electron(executor=ex)
    def f(x):
        return x

    @ct.lattice
    def flow():
        return f(1)

    try:
        r = ct.get_result(ct.dispatch(flow)(), wait=True, timeout=60)
        assert r.status == ct.Status.FAILED
        err = r.get_node_result(0)["error"]
        assert "Covalent-style executor Locky cannot be pickled" in err
        assert "setup() or run()" in err
    finally:
        _shutdown(ex)


def test_thread_mode_outcomes_follow_what_happened_first(tmp_path):
    """After the executor's cancel returned True: a run() that still returns a value
    completed (its output is kept); one that never ends is reported killed after
    cancel_wait (the backend confirmed the stop)."""
    import threading

    from valent.executor.base import BaseExecutor, as_executor
    from valent.task import Task

    release = threading.Event()

    class Late(BaseExecutor):
        def run(self, function, args, kwargs, task_metadata):
            release.wait(30)
            return function(*args, **kwargs)

        def cancel(self, task_metadata, job_handle):
            return True

    class Stuck(Late):
        def run(self, function, args, kwargs, task_metadata):
            release.wait(30)
            raise TimeoutError("never got an answer")

    def final(ex, job):
        return wait_until(lambda: ex.poll(job).final and ex.poll(job), 20)

    late = as_executor(Late())
    job = late.run(Task("d", 0, "t", int, ("7",)), lambda: None)
    assert late.cancel(job) == ct.CancelOutcome.RUNS_TO_COMPLETION
    time.sleep(0.2)
    release.set()
    state = final(late, job)
    assert isinstance(state, ct.Completed) and state.get_value() == 7
    assert late.cancel(job) == ct.CancelOutcome.TOO_LATE

    release.clear()
    stuck = as_executor(Stuck(), cancel_wait=0.5)
    job = stuck.run(Task("d", 1, "t", int, ("7",)), lambda: None)
    t0 = time.monotonic()
    stuck.cancel(job)
    state = final(stuck, job)
    assert isinstance(state, ct.Cancelled) and state.outcome == ct.CancelOutcome.KILLED
    assert 0.4 < time.monotonic() - t0 < 10
    release.set()
    late.shutdown()
    stuck.shutdown()
