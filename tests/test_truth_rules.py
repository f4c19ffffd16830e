"""What happened first decides (DESIGN.md "Truth invariants"), decided by the dispatcher.

A task that failed before the cancel was requested is FAILED (``too_late``); whatever ends a
task after the request (its own SIGTERM handler, an error while stopping, a retry about to
start) is CANCELLED with a truthful outcome; no retry starts after a cancel. A dependent of a
node that failed because its executor could not start is CANCELLED "upstream". Which
executor runs a node is decided once, at dispatch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import valent as ct
from core_support import read_pid, wait_gone, wait_until
from valent_local import LocalExecutor


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


@ct.electron
def exits_on_sigterm(pid_file: str) -> str:
    """Installs a SIGTERM handler that ends the process with sys.exit(1)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, pid_file)
    time.sleep(60)
    return "never"


def test_a_task_whose_sigterm_handler_exits_is_cancelled_not_failed(tmp_path):
    """#2(a): its own handler ended it after the cancel: CANCELLED, and so is the dispatch."""

    @ct.lattice
    def wf(p):
        return exits_on_sigterm(p)

    pid_file = str(tmp_path / "pid")
    did = ct.dispatch(wf)(pid_file)
    pid = read_pid(Path(pid_file), 30)
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=60)
    node = result.get_node_result(0)
    assert node["status"] == "CANCELLED", (node["status"], node["error"])
    assert node["cancel_outcome"] == "killed"
    assert result.status == "CANCELLED", result.error
    assert wait_gone([pid], 10) == []


@ct.electron(retries=1000)
def keeps_failing(log: str) -> None:
    _append(log, f"{time.time()}")
    time.sleep(0.02)
    raise RuntimeError("failing on purpose")


def test_no_retry_starts_after_a_cancel_and_no_node_ends_failed(tmp_path):
    """#2(b): retries=1000 on a task that keeps failing, cancelled: every node CANCELLED."""

    @ct.lattice
    def wf(d):
        return [keeps_failing(f"{d}/{i}.log") for i in range(5)]

    did = ct.dispatch(wf)(str(tmp_path))
    assert wait_until(lambda: all((tmp_path / f"{i}.log").exists() for i in range(5)), 30)
    time.sleep(0.3)
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=60)
    assert result.status == "CANCELLED", result.error
    nodes = [n for n in result.get_all_node_results() if n["node_name"] == "keeps_failing"]
    assert len(nodes) == 5
    for node in nodes:
        assert node["status"] == "CANCELLED", (node["status"], node["cancel_outcome"])
        assert node["cancel_outcome"] in ("killed", "dequeued"), node["cancel_outcome"]
        assert "failing on purpose" in (node["error"] or ""), "the last error is kept"
    counts = [len((tmp_path / f"{i}.log").read_text().split()) for i in range(5)]
    time.sleep(0.5)
    assert [len((tmp_path / f"{i}.log").read_text().split()) for i in range(5)] == counts


@ct.electron
def raises_after(seconds: float) -> None:
    time.sleep(seconds)
    raise ValueError("raised on its own")


def test_a_task_that_raises_about_when_the_cancel_comes_is_told_truthfully():
    """#2(c): FAILED only if it failed before the request (then ``too_late``), else
    CANCELLED; never FAILED with ``killed``."""

    @ct.lattice
    def wf(s):
        return raises_after(s)

    seen = set()
    for i in range(16):
        did = ct.dispatch(wf)(0.3)
        assert wait_until(lambda did=did: ct.get_result(did).get_node_result(0)["status"]
                        == "RUNNING", 30)
        time.sleep(0.3 + (i % 4 - 2) * 0.01)
        ct.cancel(did)
        result = ct.get_result(did, wait=True, timeout=60)
        node = result.get_node_result(0)
        seen.add((node["status"], node["cancel_outcome"]))
        if node["status"] == "FAILED":
            assert node["cancel_outcome"] in (None, "too_late"), node
            assert result.status == "FAILED"
        else:
            assert node["status"] == "CANCELLED", node
            assert node["cancel_outcome"] == "killed", node
            assert result.status == "CANCELLED"
    assert ("FAILED", "killed") not in seen


class _CannotStart(ct.Executor):
    """An executor whose backend cannot start (as a Dask cluster that fails to come up):
    run() raises. Not registered by any plugin: used as an instance."""

    name = "cannot-start"
    capabilities = ct.Capabilities(cancel_pending=True, stop_running=True, kill_tree=True)

    def run(self, task, wake):
        raise ct.ExecutorError("the cluster could not start")

    def poll(self, handle):  # pragma: no cover - run() never returns a handle
        raise AssertionError

    def cancel(self, handle):  # pragma: no cover
        raise AssertionError


class _ChainCannotStart(ct.Executor):
    """A chaining executor whose backend never comes up: every task it was given fails
    (as Dask futures do when the cluster could not start), dependents included."""

    name = "chain-cannot-start"
    capabilities = ct.Capabilities(
        cancel_pending=True, stop_running=True, kill_tree=True, chain=True
    )

    def run(self, task, wake):
        wake()
        return task.node_id

    def poll(self, handle):
        return ct.Failed(ct.ExecutorError("the cluster could not start"), "")

    def cancel(self, handle):
        return ct.CancelOutcome.DEQUEUED


@ct.electron
def one() -> int:
    return 1


@ct.electron
def plus_one(x: int) -> int:
    return x + 1


def test_dependent_of_a_node_whose_executor_failed_to_start_is_cancelled_upstream():
    """#4: the node that could not start is FAILED; its dependents CANCELLED "upstream"."""
    broken = _CannotStart()
    head = ct.electron(executor=broken)(one.fn)

    @ct.lattice
    def wf():
        return plus_one(plus_one(head()))

    result = ct.dispatch_sync(wf)()
    assert result.status == "FAILED"
    assert result.get_node_result(0)["status"] == "FAILED"
    assert "could not start" in result.get_node_result(0)["error"]
    for n in (1, 2):
        node = result.get_node_result(n)
        assert (node["status"], node["reason"]) == ("CANCELLED", "upstream"), node


def test_chained_dependents_of_a_node_whose_executor_never_started_are_cancelled_upstream():
    """#4 on a chaining executor: the dependents were handed to it already, and it fails
    them too; they are still CANCELLED "upstream", not FAILED."""
    ex = _ChainCannotStart()
    head = ct.electron(executor=ex)(one.fn)
    dep = ct.electron(executor=ex)(plus_one.fn)

    @ct.lattice
    def wf():
        return dep(dep(head()))

    result = ct.dispatch_sync(wf)()
    assert result.status == "FAILED"
    assert result.get_node_result(0)["status"] == "FAILED"
    for n in (1, 2):
        node = result.get_node_result(n)
        assert (node["status"], node["reason"]) == ("CANCELLED", "upstream"), node


class _MyLocal(LocalExecutor):
    """A subclass no plugin registers, under its own name."""

    name = "my-local"


def test_lattice_executor_instance_of_an_unregistered_class_runs_every_node():
    """#19: the same instance works on @lattice as on @electron (one resolver)."""
    ex = _MyLocal(workers=1)
    try:

        @ct.lattice(executor=ex)
        def wf():
            return plus_one(one())

        result = ct.dispatch_sync(wf)()
        assert result.status == "COMPLETED", result.error
        assert result.result == 2
        assert {n["executor"] for n in result.get_all_node_results() if n["executor"]} == {
            "my-local"
        }
    finally:
        ex.shutdown()


@ct.electron
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_bad_task_ids_get_the_same_answer_in_the_owner_and_from_another_process(tmp_path):
    """#20: in the owner and through the store, ``task_ids=[999]`` names the bad id."""
    import subprocess

    @ct.lattice
    def wf():
        return slow(30)

    did = ct.dispatch(wf)()
    try:
        here = ct.cancel(did, task_ids=[999])
        there = subprocess.run(
            [sys.executable, "-c",
             f"import valent as ct; print(ct.cancel({did!r}, task_ids=[999]))"],
            capture_output=True, text=True, timeout=60,
        )
        assert there.returncode == 0, there.stderr
        assert "no task id(s) [999]" in here and "valid ids are 0..1" in here, here
        assert there.stdout.strip() == here
        assert ct.get_result(did).status == "RUNNING"  # nothing was cancelled
    finally:
        ct.cancel(did)
        ct.get_result(did, wait=True, timeout=60)


@ct.electron
def quick(i: int) -> int:
    return i


@ct.lattice
def tiny(i: int) -> int:
    return quick(i)


def test_many_threads_dispatching_at_once_do_not_race_the_dispatcher(capfd):
    """#21: only the dispatcher's thread touches run state; callers only send messages."""
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        try:
            for i in range(40):
                did = ct.dispatch(tiny)(k * 1000 + i)
                with lock:
                    ids.append(did)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    results = [ct.get_result(did, wait=True, timeout=120) for did in ids]
    assert [r.status for r in results] == ["COMPLETED"] * len(ids)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
