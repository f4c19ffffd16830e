"""SSH cancel truth: ``killed`` means the task's function was called and its remote process
group is gone; a task stopped before its function was called is ``dequeued``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import ssh_tasks as T
import valent
import valent as ct
from ssh_support import task_processes, wait_until
from valent.status import CancelOutcome
from valent_ssh.handle import Phase

pytest_plugins = ["ssh_fixtures"]


@pytest.fixture
def shared_dir():
    """A folder both this process and the SSH login user can write (tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="valent-ssh-truth-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_cancel_while_the_task_is_loading_is_dequeued(ssh, submit, shared_dir):
    ex = ssh(grace=0.5)
    marker = os.path.join(shared_dir, "ran")
    s = submit(ex, T.write_marker, marker, T.SlowToLoad(3.0, "v"))
    assert wait_until(lambda: s.handle.phase is Phase.RUNNING, 30), s.handle
    time.sleep(0.3)  # the runner process exists and is unpickling the slow argument
    assert isinstance(s.state(), valent.Pending), s.state()  # not Running: no body yet
    ex.cancel(s.handle)
    st = s.wait(30)
    assert st == valent.Cancelled(CancelOutcome.DEQUEUED, ended_at=st.ended_at,
                                  stdout=st.stdout, stderr=st.stderr), st
    assert st.started_at is None
    assert not os.path.exists(marker)
    assert task_processes(s.handle) == []


def test_cancel_after_the_body_started_is_killed_with_its_start_time(ssh, submit, shared_dir):
    ex = ssh(grace=0.5)
    s = submit(ex, T.sleep_then, 60, "x")
    running = s.wait_running()
    assert running.started_at is not None
    assert ex.cancel(s.handle) == CancelOutcome.KILLED
    st = s.wait(30)
    assert st.outcome == CancelOutcome.KILLED and st.started_at == running.started_at
    assert task_processes(s.handle) == []


def test_a_dispatch_cancelled_while_its_ssh_task_loads_says_dequeued(ssh, shared_dir):
    remote = ssh(grace=0.5)
    marker = os.path.join(shared_dir, "ran")
    task = ct.electron(T.write_marker, executor=remote)

    @ct.lattice
    def flow(path, arg):
        return task(path, arg)

    did = ct.dispatch(flow)(marker, T.SlowToLoad(3.0, "v"))
    assert wait_until(
        lambda: any(rt.phase is Phase.RUNNING for rt in list(remote._handles)), 30
    )
    time.sleep(0.3)
    ct.cancel(did)
    result = ct.get_result(did, wait=True, timeout=60)
    node = [n for n in result.get_all_node_results() if n["node_name"] == "write_marker"][0]
    assert result.status == ct.Status.CANCELLED
    assert node["status"] == ct.Status.CANCELLED
    assert node["cancel_outcome"] == "dequeued" and node["start_time"] is None, node
    assert not os.path.exists(marker)


_SLOW_TO_CALL = b"""

_told = _mark_body


def _mark_body(taskdir, body_fd):  # the test's fake: 3 s between telling and the call
    _told(taskdir, body_fd)
    time.sleep(3)
"""


def test_a_cancel_that_lands_as_the_runner_says_the_body_starts_is_dequeued(
        ssh, submit, shared_dir, monkeypatch):
    """The SIGTERM comes after the runner told the agent its function starts, before it
    called it: the runner takes the start back (exit UNSTARTED_RC, marker removed) and the
    task is DEQUEUED with no start time (it was KILLED before). A window of microseconds
    on a real runner; a fake runner (uploaded in place of the real one, its own directory)
    holds it open for 3 s so the cancel lands in it every time."""
    import hashlib

    from valent_ssh import connection, registry

    source = connection.REMOTE_FILES["valent_ssh_runner.py"] + _SLOW_TO_CALL
    where = ".valent-runner-test-" + hashlib.sha256(source).hexdigest()[:12]
    monkeypatch.setattr(connection, "REMOTE_FILES",
                        {**connection.REMOTE_FILES, "valent_ssh_runner.py": source})
    monkeypatch.setattr(connection, "RUNNER_DIR", where)
    monkeypatch.setattr(connection, "AGENT", f"{where}/valent_ssh_agent.py")
    registry.close_all()  # no connection with the real runner is reused
    ex = ssh(grace=20)
    marker = os.path.join(shared_dir, "ran")
    s = submit(ex, T.write_marker, marker, "v")
    assert s.wait_running().started_at is not None  # the agent told us the body starts
    ex.cancel(s.handle)
    st = s.wait(60)
    assert not os.path.exists(marker), "the body ran: the cancel came too late for this test"
    assert isinstance(st, valent.Cancelled), st
    assert st.outcome == CancelOutcome.DEQUEUED and st.started_at is None, st
    assert task_processes(s.handle) == []


def _event(ev: str, value_kind: bytes, **extra) -> dict:
    import base64

    import cloudpickle

    payload = value_kind + cloudpickle.dumps("its value")
    return {"ev": ev, "key": "k", "rc": 0, "body": 1000.0,
            "result": base64.b64encode(payload).decode(), **extra}


@pytest.mark.parametrize("ev", ["exit", "gone"])
def test_a_task_that_returned_before_the_kill_reached_it_completed(ev):
    """The task returned in the moment between the kill being sent and reaching the host:
    it completed (the dispatcher then says ``too_late``) and its output is kept. That moment
    is too short to hit on demand, so this feeds the agent's real event format to the code
    that reads it; a cooperative return after SIGTERM (``stopped``) is still ``killed``."""
    from valent_ssh.handle import RemoteTask, final_state
    from valent_ssh.runner import RESULT_VALUE

    class _Host:  # only named in the handle's repr
        target = None

    task = valent.Task(dispatch_id="d", node_id=0, name="t", fn=T.noop, args=(), kwargs={})
    target = ct.executors.SSHExecutor(hostname="127.0.0.1").target

    def handle():
        rt = RemoteTask(task, lambda: None, 1.0, _Host())
        rt.cancel_requested = True
        return rt

    def fetch():
        raise AssertionError("inline result")

    done = final_state(handle(), _event(ev, RESULT_VALUE), target, fetch)
    assert isinstance(done, valent.Completed) and done.started_at == 1000.0
    stopped = final_state(handle(), _event(ev, RESULT_VALUE, stopped=True), target, fetch)
    assert stopped == valent.Cancelled(CancelOutcome.KILLED, started_at=1000.0,
                                       ended_at=stopped.ended_at)
