"""SSHExecutor at the executor level (run / poll / cancel) against a real sshd on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import rig as rigmod
import ssh_tasks as T
import valent
from ssh_support import task_processes, wait_until
from valent.status import CancelOutcome
from valent.testing.procs import pgid as _pgid

pytest_plugins = ["ssh_fixtures"]


def test_result_and_output_come_back(ssh, submit):
    job = submit(ssh(), T.add, 2, 40)
    st = job.wait()
    assert isinstance(st, valent.Completed), st
    assert st.get_value() == 42
    assert st.stdout == "adding 2 and 40\n"
    assert st.stderr == "a warning\n"
    assert st.started_at is not None and st.ended_at >= st.started_at


def test_task_runs_detached_in_its_own_session(ssh, submit, rig):
    info = submit(ssh(), T.whoami).wait().get_value()
    assert info["pid"] == info["pgid"] == info["sid"]  # setsid: its own session and group
    assert info["cwd"] == rig.home


def test_rig_sees_the_remote_processes(ssh, submit, rig):
    """The leftover check after each test finds remote processes by the rig's marker."""
    job = submit(ssh(), T.sleep_then, 60, "x")
    job.wait_running()
    assert job.handle.pid in {p.pid for p in rig.processes()}
    job.ex.cancel(job.handle)
    job.wait()


def test_exception_comes_back_with_traceback(ssh, submit):
    st = submit(ssh(), T.boom, "no such thing").wait()
    assert isinstance(st, valent.Failed), st
    assert isinstance(st.error, ValueError) and str(st.error) == "no such thing"
    assert "in boom" in st.traceback and "ValueError: no such thing" in st.traceback


def test_big_result_is_fetched_over_sftp(ssh, submit):
    st = submit(ssh(), T.big, 3 << 20).wait()  # more than the agent sends inline
    assert isinstance(st, valent.Completed), st
    assert len(st.get_value()) == 3 << 20


def test_task_directories_are_cleaned_up(ssh, submit, rig):
    ex = ssh()
    jobs = [submit(ex, T.add, i, i) for i in range(3)]
    assert [j.wait().get_value() for j in jobs] == [0, 2, 4]
    dirs = {os.path.basename(j.handle.dir) for j in jobs}
    assert dirs

    def left():
        return dirs & set(os.listdir(rig.workdir()))

    # the clean command is sent after the result arrived: give the agent a moment
    assert wait_until(lambda: not left(), 10), left()


def test_unpicklable_argument_fails_the_task(ssh, submit):
    st = submit(ssh(), T.add, threading.Lock(), 1).wait()
    assert isinstance(st, valent.Failed)
    assert isinstance(st.error, valent.PicklingError)
    assert "add(0)" in str(st.error)


def test_runner_killed_from_outside_is_a_clear_failure(ssh, submit):
    job = submit(ssh(), T.sleep_then, 60, "never")
    job.wait_running()
    os.kill(job.handle.pid, signal.SIGKILL)  # as root: like the OOM killer would
    st = job.wait()
    assert isinstance(st, valent.Failed)
    from valent_ssh import RemoteTaskLostError

    assert isinstance(st.error, RemoteTaskLostError)
    assert "signal 9" in str(st.error) and "127.0.0.1:" in str(st.error)


def test_parallel_tasks_share_one_connection(ssh, submit, rig):
    ex = ssh(max_parallel=8)
    t0 = time.monotonic()
    jobs = [submit(ex, T.timed_sleep, 1.0) for _ in range(8)]
    results = [j.wait().get_value() for j in jobs]
    elapsed = time.monotonic() - t0
    assert len({pid for _, _, pid in results}) == 8
    # they overlapped: the latest start came before the earliest end
    assert max(s for s, _, _ in results) < min(e for _, e, _ in results)
    assert elapsed < 8.0 * 1.0  # far less than running them one after another
    sessions = rig.session_processes()
    assert len(sessions) == 1, [p.cmdline() for p in sessions]


def test_max_parallel_queues_the_rest(ssh, submit):
    ex = ssh(max_parallel=2)
    jobs = [submit(ex, T.timed_sleep, 0.5) for _ in range(4)]
    spans = sorted(j.wait().get_value()[:2] for j in jobs)
    for i, (start, _) in enumerate(spans):
        running = sum(1 for s, e in spans if s <= start < e)
        assert running <= 2, (i, spans)


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_running_task_kills_its_subprocesses(ssh, submit, rig):
    job = submit(ssh(grace=5.0), T.spawn_and_wait, 300)
    job.wait_running()
    assert wait_until(lambda: len(task_processes(job.handle)) >= 3, 10)  # runner, sh, sleep
    pgid = job.handle.pid
    t0 = time.monotonic()
    assert job.ex.cancel(job.handle) == CancelOutcome.KILLED
    st = job.wait()
    elapsed = time.monotonic() - t0
    assert st == valent.Cancelled(
        CancelOutcome.KILLED, started_at=st.started_at, ended_at=st.ended_at, stdout="", stderr=""
    )
    # the task never asked cancel_requested(): SIGTERM ended it at once, not after the grace
    assert elapsed < 5.0
    assert task_processes(job.handle) == []
    group = [p for p in rig.processes() if _pgid(p.pid) == pgid]
    assert group == []
    assert job.ex.cancel(job.handle) == CancelOutcome.KILLED  # idempotent


def test_cancel_kills_a_subprocess_that_left_the_group(ssh, submit):
    job = submit(ssh(grace=0.5), T.spawn_escapee_and_wait, 300)
    job.wait_running()
    token = job.handle.token
    # the runner and the sleep in its group, the sleep that left it (carrying the token)
    assert wait_until(lambda: len(task_processes(job.handle)) >= 3, 10)
    assert wait_until(lambda: len(rigmod.token_processes(token)) >= 2, 10)
    job.ex.cancel(job.handle)
    assert job.wait().outcome == CancelOutcome.KILLED
    assert task_processes(job.handle) == []


def test_cancel_waits_for_the_group_to_be_gone(ssh, submit):
    """A task ignoring SIGTERM: poll says Running through the grace, then SIGKILL lands."""
    job = submit(ssh(grace=0.5), T.ignore_sigterm, 300)
    job.wait_running()
    time.sleep(0.3)  # let it install its handler
    t0 = time.monotonic()
    assert job.ex.cancel(job.handle) == CancelOutcome.KILLED
    assert isinstance(job.state(), valent.Running)
    st = job.wait()
    elapsed = time.monotonic() - t0
    assert st.outcome == CancelOutcome.KILLED
    assert 0.5 <= elapsed < 5.0
    assert task_processes(job.handle) == []


def test_cancel_requested_works_inside_an_ssh_task(ssh, submit):
    marker = f"/tmp/valent-ssh-marker-{uuid.uuid4().hex}"
    try:
        job = submit(ssh(grace=10.0), T.cooperative, marker, 120)
        job.wait_running()
        time.sleep(0.3)
        t0 = time.monotonic()
        job.ex.cancel(job.handle)
        st = job.wait()
        assert st.outcome == CancelOutcome.KILLED
        assert time.monotonic() - t0 < 5.0  # it stopped itself, long before the 10 s grace
        with open(marker) as f:
            assert f.read() == "stopped cleanly"
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def test_cancel_requested_imported_by_name(ssh, submit):
    job = submit(ssh(grace=10.0), T.cooperative_imported, 120)
    job.wait_running()
    time.sleep(0.3)
    t0 = time.monotonic()
    job.ex.cancel(job.handle)
    assert job.wait().outcome == CancelOutcome.KILLED
    assert time.monotonic() - t0 < 5.0


def test_cancel_before_start_dequeues(ssh, submit):
    ex = ssh(max_parallel=1)
    first = submit(ex, T.sleep_then, 60, "first")
    second = submit(ex, T.add, 1, 2)
    first.wait_running()
    assert isinstance(second.state(), valent.Pending)
    assert ex.cancel(second.handle) == CancelOutcome.DEQUEUED
    assert second.state() == valent.Cancelled(CancelOutcome.DEQUEUED)
    assert ex.cancel(first.handle) == CancelOutcome.KILLED
    assert first.wait().outcome == CancelOutcome.KILLED


def test_cancel_after_finish_is_too_late(ssh, submit):
    job = submit(ssh(), T.add, 1, 1)
    assert job.wait().get_value() == 2
    assert job.ex.cancel(job.handle) == CancelOutcome.TOO_LATE
    assert isinstance(job.state(), valent.Completed)


def test_background_child_of_a_finished_task_is_stopped(ssh, submit):
    job = submit(ssh(), T.leave_background_child, 300)
    assert job.wait().get_value() == "returned"
    assert wait_until(lambda: task_processes(job.handle) == [], 10)


def test_shutdown_stops_running_tasks(ssh, submit):
    ex = ssh(grace=0.5)
    job = submit(ex, T.sleep_then, 300, "never")
    job.wait_running()
    ex.shutdown()
    assert job.state().outcome == CancelOutcome.KILLED
    assert task_processes(job.handle) == []


# -- dropped connections --------------------------------------------------------------------


def test_sshd_killed_and_restarted_mid_task(ssh, submit, rig):
    ex = ssh()
    job = submit(ex, T.sleep_then, 3.0, "survived")
    job.wait_running()
    agent_before = job.handle.host._conn.hello["pid"]
    rig.kill()  # listener and connection processes: our connection drops
    time.sleep(0.5)
    assert isinstance(job.state(), valent.Running)
    rig.start()
    st = job.wait(60)
    assert isinstance(st, valent.Completed), st
    assert st.get_value() == "survived"
    assert job.handle.host._conn.hello["pid"] != agent_before  # it did reconnect


def test_cancel_during_a_dropped_connection_is_delivered_after_reconnect(ssh, submit, rig):
    ex = ssh(grace=0.5)
    job = submit(ex, T.sleep_then, 300, "never")
    job.wait_running()
    rig.kill()
    assert ex.cancel(job.handle) == CancelOutcome.KILLED
    time.sleep(0.3)
    assert isinstance(job.state(), valent.Running)  # not confirmed: the host is down
    rig.start()
    assert job.wait(60).outcome == CancelOutcome.KILLED
    assert task_processes(job.handle) == []


def test_host_unreachable_past_reconnect_timeout_fails_the_task(ssh, submit, rig):
    ex = ssh(reconnect_timeout=1.0)
    job = submit(ex, T.sleep_then, 300, "never")
    job.wait_running()
    rig.kill()
    try:
        st = job.wait(30)
        assert isinstance(st, valent.Failed)
        from valent_ssh import SSHUnreachableError

        assert isinstance(st.error, SSHUnreachableError)
        msg = str(st.error)
        assert f"127.0.0.1:{rig.port}" in msg and "reconnect_timeout" in msg
        # The remote task outlived the connection; the next connection to the host reaps it.
        assert task_processes(job.handle)
        rig.start()
        assert submit(ex, T.add, 1, 1).wait().get_value() == 2
        assert wait_until(lambda: not task_processes(job.handle), 10)
        assert wait_until(lambda: not os.path.exists(job.handle.dir), 10)
    finally:
        if rig.proc is None:
            rig.start()
        for pid in task_processes(job.handle):  # a safety net if the reaping failed
            os.kill(pid, signal.SIGKILL)


def test_cancel_fails_when_host_stays_unreachable(ssh, submit, rig):
    ex = ssh(reconnect_timeout=1.0)
    job = submit(ex, T.sleep_then, 300, "never")
    job.wait_running()
    rig.kill()
    try:
        assert ex.cancel(job.handle) == CancelOutcome.KILLED
        st = job.wait(30)
        assert st == valent.Cancelled(CancelOutcome.FAILED, started_at=st.started_at)
    finally:
        if rig.proc is None:
            rig.start()
        for pid in task_processes(job.handle):
            os.kill(pid, signal.SIGKILL)


# -- the plugin -----------------------------------------------------------------------------


def test_import_is_cheap_and_registers_the_executor():
    code = (
        "import sys, valent_ssh, valent\n"
        "from valent._plugins.manager import get_plugins\n"
        "assert 'paramiko' not in sys.modules, 'paramiko imported'\n"
        "assert get_plugins().executors['ssh'].cls is valent_ssh.SSHExecutor\n"
        "assert valent.executors.SSHExecutor is valent_ssh.SSHExecutor\n"
        "assert 'paramiko' not in sys.modules, 'paramiko imported by loading plugins'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_are_checked():
    from valent.config import check_settings
    from valent_ssh import SSHExecutor

    with pytest.raises(valent.ConfigError):
        SSHExecutor(hostname="h", port=0)
    with pytest.raises(valent.ConfigError):
        SSHExecutor(hostname="h", max_parallel=0)
    with pytest.raises(valent.ConfigError):
        check_settings(SSHExecutor, {"hostname": "h", "accept_unknown_host_key": "yes"}, "t")
    with pytest.raises(valent.ConfigError):
        check_settings(SSHExecutor, {"hostname": "h", "keyfile": "x"}, "t")
    check_settings(SSHExecutor, {"hostname": "h", "port": 2222, "grace": 2}, "t")


def test_executor_pickles_without_connections(ssh):
    import cloudpickle

    ex = ssh()
    copy = cloudpickle.loads(cloudpickle.dumps(ex))
    assert copy.target == ex.target and repr(copy) == repr(ex)
