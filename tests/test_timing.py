"""valent.timing: a wrapper plugin that meters run/poll/cancel of every executor."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import valent as ct
from valent import timing
from valent._plugins.manager import get_plugins


@ct.electron(executor="local")
def inc(x: int) -> int:
    return x + 1


@ct.electron(executor="local")
def boom(x: int) -> int:
    raise RuntimeError("no")


@ct.electron(executor="local")
def nap(x: int) -> int:
    time.sleep(30)
    return x


@ct.lattice
def flow(x: int) -> int:
    return inc(inc(x))


@ct.lattice
def failing(x: int) -> int:
    return boom(x)


@ct.lattice
def sleepy(x: int) -> int:
    return nap(inc(x))


@pytest.fixture
def meter():
    m = timing.enable()
    assert timing.enable() is m  # idempotent
    yield m
    timing.disable()
    assert get_plugins().pm.get_plugin(timing.PLUGIN_NAME) is None


def test_meters_every_hook_and_task_per_executor(meter):
    assert ct.dispatch_sync(flow)(1).result == 3
    assert ct.dispatch_sync(failing)(1).status == ct.Status.FAILED
    did = ct.dispatch(sleepy)(1)
    deadline = time.monotonic() + 20
    while ct.get_result(did).get_node_result(2)["status"] != ct.Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ct.cancel(did)
    assert ct.get_result(did, wait=True, timeout=30).status == ct.Status.CANCELLED
    assert meter.calls[("local", "run")].count == 5  # inc x3, boom, nap
    assert meter.calls[("local", "poll")].count >= 5
    # one task's cancel: through cancel, or cancel_many (LocalExecutor stops a batch at once)
    assert sum(meter.calls[("local", h)].count for h in ("cancel", "cancel_many")
               if ("local", h) in meter.calls) == 1
    assert meter.tasks[("local", "Completed")].count == 3
    assert meter.tasks[("local", "Failed")].count == 1
    assert meter.tasks[("local", "Cancelled")].count == 1
    assert meter.tasks[("local", "Cancelled")].max < 20  # the 30 s nap was cut short
    assert not meter._open  # every task it saw start, it saw end
    report = meter.report()
    assert "local" in report and "cancel" in report and "Completed" in report


def test_wrapper_sees_errors_and_passes_them_on(meter):
    class Broken(ct.Executor):
        name = "broken"
        capabilities = ct.Capabilities(False, False, False)

        def run(self, task, wake):
            raise ct.ExecutorError("cannot start")

        def poll(self, handle):
            return ct.Pending()

        def cancel(self, handle):
            return ct.CancelOutcome.FAILED

    with pytest.raises(ct.ExecutorError, match="cannot start"):
        get_plugins().run(Broken(), ct.Task("d", 0, "t", inc.fn), lambda: None)
    assert meter.calls[("broken", "run")].count == 1


def test_disabled_by_default_and_enabled_by_env(tmp_path):
    assert get_plugins().pm.get_plugin(timing.PLUGIN_NAME) is None or os.environ.get(timing.ENV)
    script = textwrap.dedent("""
        import valent as ct

        @ct.electron
        def inc(x):
            return x + 1

        @ct.lattice
        def flow(x):
            return inc(x)

        print(ct.dispatch_sync(flow)(1).result)
    """)
    env = {**os.environ, "VALENT_RESULTS_DIR": str(tmp_path), timing.ENV: "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert "executor" in out.stderr and "local" in out.stderr and "Completed" in out.stderr
