"""The conformance tests and the harness they drive an executor with."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import valent as ct
from valent._plugins.contract import Executor, check_executor_class
from valent._plugins.manager import get_plugins
from valent.status import CancelOutcome, Status
from valent.task import (
    Cancelled,
    Completed,
    Failed,
    Pending,
    Running,
    Task,
    TaskState,
    Upstream,
)

from . import tasks
from .procs import alive, live_descendants, wait_gone


@dataclass
class Started:
    """A task the harness handed to the executor, with its handle and wake counter."""

    task: Task
    handle: Any
    woken: threading.Event = field(default_factory=threading.Event)
    wakes: int = 0

    def wake(self) -> None:
        """The ``wake`` given to ``run``: counts calls and sets ``woken``."""
        self.wakes += 1
        self.woken.set()


class Harness:
    """Drives one executor the way the dispatcher does: through the plugin hooks.

    run/poll/cancel go through ``valent_run`` / ``valent_poll`` / ``valent_cancel`` (so hook
    implementations and wrappers take part); waiting is event-driven on ``wake``, with the
    executor's ``poll_interval`` as the only fallback, like the dispatcher.
    """

    def __init__(self, executor: Executor, tmp_path: Path, task_timeout: float = 30.0):
        self.executor = executor
        self.tmp_path = tmp_path
        self.task_timeout = task_timeout
        self.dispatch_id = f"conformance-{uuid.uuid4().hex[:8]}"
        self.started: list[Started] = []
        self._ids = itertools.count()
        self._plugins = get_plugins()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Started:
        """Start ``fn(*args, **kwargs)`` on the executor; return at once."""
        task = Task(self.dispatch_id, next(self._ids), fn.__name__, fn, args, kwargs)
        s = Started(task, None)
        s.handle = self._plugins.run(self.executor, task, s.wake)
        self.started.append(s)
        return s

    def poll(self, s: Started) -> TaskState:
        """The task's state, as the executor reports it now."""
        state = self._plugins.poll(self.executor, s.handle)
        assert isinstance(state, ct.TaskState), (
            f"poll() must return a valent TaskState (Pending, Running, Completed, Failed, "
            f"Cancelled), got {state!r}"
        )
        return state

    def cancel(self, s: Started) -> CancelOutcome:
        """Ask the executor to cancel; the outcome it commits to (timed: must not block)."""
        t0 = time.monotonic()
        outcome = self._plugins.cancel(self.executor, s.handle)
        took = time.monotonic() - t0
        assert took < 5.0, f"cancel() blocked for {took:.1f} s; it must return quickly"
        assert outcome is not None, "cancel() returned None; return a valent.CancelOutcome"
        return CancelOutcome(outcome)

    def cancel_many(self, started: list[Started]) -> list[CancelOutcome]:
        """Cancel a batch, as the dispatcher does (``Plugins.cancel_many``); one outcome each."""
        t0 = time.monotonic()
        outcomes = self._plugins.cancel_many(self.executor, [s.handle for s in started])
        took = time.monotonic() - t0
        assert took < 5.0, f"cancel_many() blocked for {took:.1f} s; it must return quickly"
        assert len(outcomes) == len(started), (
            f"cancel_many() returned {len(outcomes)} outcomes for {len(started)} tasks"
        )
        return [CancelOutcome(o) for o in outcomes]

    def upstream(self, s: Started) -> Upstream:
        """The marker that stands for ``s``'s value in a chained task's arguments."""
        return Upstream(s.handle, s.task.node_id)

    def wait_until(
        self, s: Started, done: Callable[[TaskState], bool], timeout: float | None = None
    ) -> TaskState:
        """Poll after each ``wake`` until ``done(state)`` or ``timeout``; the last state."""
        timeout = self.task_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        interval = self.executor.poll_interval
        while True:
            s.woken.clear()
            state = self.poll(s)
            left = deadline - time.monotonic()
            if done(state) or left <= 0:
                return state
            woke = s.woken.wait(left if interval is None else min(left, interval))
            if not woke and interval is None:
                state = self.poll(s)
                assert not done(state), (
                    f"{s.task.label} reached {state!r} without calling wake() after the "
                    f"change (wake() was called {s.wakes} times), so the dispatcher would "
                    "never see it; call wake() whenever a task's state changes"
                )
                return state

    def wait_final(self, s: Started, timeout: float | None = None) -> TaskState:
        """Wait for a final state; fail with a clear message when none comes."""
        timeout = self.task_timeout if timeout is None else timeout
        state = self.wait_until(s, lambda st: st.final, timeout)
        assert state.final, (
            f"{s.task.label} not final {timeout} s after it started (last poll: {state!r}; "
            f"wake() was called {s.wakes} times). If the task did finish, the executor did "
            "not call wake() after the change, so the dispatcher would never poll it."
        )
        return state

    def wait_file(self, s: Started, path: Path, timeout: float | None = None) -> str:
        """Wait for a marker file a task writes; fail early if the task ended without it."""
        timeout = self.task_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{s.task.label} did not write {path.name} within {timeout} s "
                    f"(state: {self.poll(s)!r}); did it start?"
                )
            if s.woken.is_set():
                state = self.poll(s)
                if state.final and not path.exists():
                    raise AssertionError(f"{s.task.label} ended before writing {path.name}: "
                                         f"{state!r}")
            time.sleep(0.01)
        return path.read_text()

    def task_dir(self, name: str) -> Path:
        """A fresh directory for one task's marker files."""
        d = self.tmp_path / f"{name}-{next(self._ids)}"
        d.mkdir()
        return d


# ---------------------------------------------------------------------- processes


def _descendants() -> dict[int, float]:
    """{pid: create_time} of the live (non-zombie) descendants of this process."""
    out: dict[int, float] = {}
    for p in live_descendants():
        try:
            out[p.pid] = p.create_time()
        except psutil.Error:
            continue
    return out


def _kill(pids: list[int]) -> None:
    """Clean up after a failed check: SIGKILL exactly these PIDs (never this process)."""
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------- the suite


class ExecutorConformance:
    """The executor contract as pytest tests; subclass it and override ``executor``.

    Class attributes tune the waits for slow backends.
    """

    task_timeout: float = 30.0
    """Seconds a task may take to reach a final state."""
    start_timeout: float = 30.0
    """Seconds a task may take to start (a cluster or connection may start on first use)."""
    settle: float = 0.5
    """Seconds a task must stay ``Pending`` to count as queued behind busy slots."""
    max_blockers: int = 16
    """How many long tasks the pending-cancel test starts, at most, to fill the executor."""
    shutdown_timeout: float = 15.0
    """Seconds after ``shutdown()`` within which every process the test gained must be gone."""

    @pytest.fixture
    def executor(self) -> Executor:
        """Override: return (or yield) a fresh instance of the executor under test."""
        pytest.fail(
            f"{type(self).__name__} must override the `executor` fixture to return an instance "
            "of the executor under test (see valent.testing's docstring)"
        )

    @pytest.fixture
    def valent_harness(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
        """The executor in a harness; shut down afterwards, leaving no process behind."""
        ex = request.getfixturevalue("executor")
        assert isinstance(ex, Executor), f"the executor fixture returned {ex!r}, not an Executor"
        # after the fixture: what it started (a test cluster, a server) is not the executor's
        before = _descendants()
        h = Harness(ex, tmp_path, self.task_timeout)
        yield h
        try:
            ex.close_dispatch(h.dispatch_id)
        finally:
            ex.shutdown()
        new = [p for p, t in _descendants().items() if before.get(p) != t]
        left = wait_gone(new, self.shutdown_timeout)
        if left:
            desc = ", ".join(f"{p} {_cmdline(p)}" for p in left)
            _kill(left)
            pytest.fail(
                f"{type(ex).__name__} left processes running {self.shutdown_timeout} s after "
                f"shutdown(): {desc}"
            )

    # ------------------------------------------------------------------ declaring

    def test_declares_name_and_capabilities(self, valent_harness: Harness) -> None:
        ex = valent_harness.executor
        check_executor_class(type(ex), f"executor {type(ex).__name__}")
        assert isinstance(ex.capabilities, ct.Capabilities)
        assert isinstance(ex.settings(), dict)

    # ------------------------------------------------------------------ running

    def test_run_returns_value(self, valent_harness: Harness) -> None:
        s = valent_harness.run(tasks.add, 2, 3)
        state = valent_harness.wait_final(s, self.start_timeout + self.task_timeout)
        assert isinstance(state, Completed), f"expected Completed(5), got {state!r}"
        assert state.get_value() == 5

    def test_runs_several_tasks_and_keeps_them_apart(self, valent_harness: Harness) -> None:
        started = [valent_harness.run(tasks.add, i, 100) for i in range(6)]
        for i, s in enumerate(started):
            state = valent_harness.wait_final(s, self.start_timeout + self.task_timeout)
            assert isinstance(state, Completed), f"{s.task.label}: {state!r}"
            assert state.get_value() == i + 100

    def test_exception_comes_back_as_failed(self, valent_harness: Harness) -> None:
        s = valent_harness.run(tasks.fail_with, "conformance boom")
        state = valent_harness.wait_final(s, self.start_timeout + self.task_timeout)
        assert isinstance(state, Failed), f"a task that raises must end Failed, got {state!r}"
        assert "conformance boom" in str(state.error), f"error lost its message: {state.error!r}"
        if isinstance(state.error, BaseException):
            assert isinstance(state.error, ValueError), f"wrong exception: {state.error!r}"
        assert "fail_with" in state.traceback, (
            f"Failed.traceback must hold the task's traceback, got {state.traceback!r}"
        )

    def test_wake_is_called_when_a_task_ends(self, valent_harness: Harness) -> None:
        if valent_harness.executor.poll_interval is not None:
            pytest.skip("the executor declares poll_interval: the dispatcher polls it anyway")
        s = valent_harness.run(tasks.hold, str(valent_harness.task_dir("wake")), 0.3)
        deadline = time.monotonic() + self.start_timeout + self.task_timeout
        # Poll only after a wake, never on a timer: that is all the dispatcher does.
        state = valent_harness.poll(s)
        while not state.final and time.monotonic() < deadline:
            s.woken.clear()
            state = valent_harness.poll(s)
            if state.final:
                break
            if not s.woken.wait(max(0.0, deadline - time.monotonic())):
                break
        assert state.final, (
            f"no final state reached through wake(): last poll {state!r}, wake() called "
            f"{s.wakes} times; call wake() from any thread whenever the task's state changes"
        )
        assert isinstance(state, Completed) and state.get_value() == "timeout", state

    # ------------------------------------------------------------------ cancelling

    def test_cancel_pending_task_is_dequeued(self, valent_harness: Harness) -> None:
        h = valent_harness
        if not h.executor.capabilities.cancel_pending:
            pytest.skip("capabilities.cancel_pending is False")
        blockers: list[tuple[Started, Path]] = []
        candidate: tuple[Started, Path] | None = None
        try:
            for _ in range(self.max_blockers):
                d = h.task_dir("queue")
                s = h.run(tasks.hold, str(d), 60.0)
                state = h.wait_until(s, lambda st: not isinstance(st, Pending), self.settle)
                if isinstance(state, Pending):
                    candidate = (s, d)
                    break
                blockers.append((s, d))
            if candidate is None:
                pytest.skip(
                    f"{self.max_blockers} long tasks all started at once, so none stayed "
                    "pending; give the executor fewer slots in the fixture or raise max_blockers"
                )
            s, d = candidate
            outcome = h.cancel(s)
            caps = h.executor.capabilities
            allowed = {CancelOutcome.DEQUEUED} | ({CancelOutcome.KILLED} if caps.stop_running
                                                  else set())
            assert outcome in allowed, (
                f"cancel of a task reported Pending returned {outcome.value!r}; expected "
                "'dequeued' (or 'killed' if it had in fact started)"
            )
            state = h.wait_final(s)
            assert isinstance(state, Cancelled), (
                f"cancel said {outcome.value!r} but the task ended {state!r}")
            if state.outcome != outcome:
                # its body started while the executor's word of it was on its way: the answer
                # said dequeued, the end says killed with its start time (the truth wins)
                assert (outcome == CancelOutcome.DEQUEUED and caps.stop_running
                        and state.outcome == CancelOutcome.KILLED
                        and state.started_at is not None), (
                    f"cancel said {outcome.value!r} but the task ended {state!r}")
                outcome = state.outcome
        finally:
            for _b, bd in blockers:
                tasks.write_atomic(bd / tasks.RELEASE, "")
            for b, _ in blockers:
                h.wait_final(b)
        if outcome == CancelOutcome.DEQUEUED:
            time.sleep(self.settle)
            assert not (d / tasks.STARTED).exists(), "a task reported 'dequeued' ran anyway"

    def test_cancel_running_task_kills_its_process_tree(self, valent_harness: Harness) -> None:
        h = valent_harness
        caps = h.executor.capabilities
        if not caps.stop_running:
            pytest.skip("capabilities.stop_running is False (cancel lets tasks finish)")
        d = h.task_dir("kill")
        s = h.run(tasks.spawn_and_wait, str(d), 120.0)
        task_pid = int(h.wait_file(s, d / tasks.STARTED, self.start_timeout))
        child_pid = int((d / tasks.CHILD).read_text())
        assert task_pid != os.getpid(), (
            "capabilities.stop_running is True but the task runs inside the test's own process"
        )
        try:
            # the test may see the task's file before a remote executor hears of the start:
            # until it says Running, its answer may still be 'dequeued' (its end must not)
            heard = isinstance(h.poll(s), Running)
            outcome = h.cancel(s)
            assert outcome == CancelOutcome.KILLED or (
                    not heard and outcome == CancelOutcome.DEQUEUED), (
                f"cancel of a running task returned {outcome.value!r}; an executor with "
                "stop_running must return 'killed'"
            )
            state = h.wait_final(s)
            assert isinstance(state, Cancelled), f"expected Cancelled(KILLED), got {state!r}"
            assert state.outcome == CancelOutcome.KILLED, state
            # Cancelled(KILLED) means the stop is confirmed: the process is gone by now.
            assert not alive(task_pid), (
                f"poll reported {state!r} but the task's process {task_pid} still runs"
            )
            if caps.kill_tree:
                assert not alive(child_pid), (
                    f"capabilities.kill_tree is True but the task's subprocess {child_pid} "
                    f"survived the kill ({_cmdline(child_pid)})"
                )
        finally:
            _kill([p for p in (child_pid,) if alive(p)])

    def test_cancel_running_task_runs_to_completion(self, valent_harness: Harness) -> None:
        h = valent_harness
        if h.executor.capabilities.stop_running:
            pytest.skip("capabilities.stop_running is True (covered by the kill test)")
        d = h.task_dir("rtc")
        s = h.run(tasks.spawn_and_wait, str(d), 1.5)
        h.wait_file(s, d / tasks.STARTED, self.start_timeout)
        outcome = h.cancel(s)
        assert outcome == CancelOutcome.RUNS_TO_COMPLETION, (
            f"an executor that cannot stop running work must say 'runs_to_completion', "
            f"got {outcome.value!r}"
        )
        state = h.wait_final(s)
        assert isinstance(state, Completed), f"its output must be kept, got {state!r}"
        assert state.get_value() == "finished"

    def test_cancel_after_completion_is_too_late(self, valent_harness: Harness) -> None:
        h = valent_harness
        s = h.run(tasks.add, 20, 22)
        h.wait_final(s, self.start_timeout + self.task_timeout)
        assert h.cancel(s) == CancelOutcome.TOO_LATE
        state = h.poll(s)
        assert isinstance(state, Completed) and state.get_value() == 42, (
            f"a cancel after completion must not change the result: {state!r}"
        )

    def test_cancel_requested_is_false_in_a_normal_task(self, valent_harness: Harness) -> None:
        s = valent_harness.run(tasks.cancel_flag)
        state = valent_harness.wait_final(s, self.start_timeout + self.task_timeout)
        assert isinstance(state, Completed), state
        assert state.get_value() is False

    def test_cancel_requested_is_seen_by_a_running_task(self, valent_harness: Harness) -> None:
        h = valent_harness
        caps = h.executor.capabilities
        if caps.stop_running and not caps.grace:
            pytest.skip("no grace period (capabilities.grace): running tasks are killed at once")
        d = h.task_dir("coop")
        s = h.run(tasks.hold, str(d), 60.0)
        h.wait_file(s, d / tasks.STARTED, self.start_timeout)
        outcome = h.cancel(s)
        state = h.wait_final(s)
        assert (d / tasks.SAW_CANCEL).exists(), (
            f"valent.cancel_requested() never turned True inside the task (cancel returned "
            f"{outcome.value!r}, the task ended {state!r})"
        )
        if caps.stop_running:
            assert isinstance(state, Cancelled) and state.outcome == CancelOutcome.KILLED, state
        else:
            assert isinstance(state, Completed) and state.get_value() == "stopped", state

    # ------------------------------------------------------------------ processes

    def test_no_processes_left_after_shutdown(self, valent_harness: Harness) -> None:
        h = valent_harness
        before = _descendants()
        done = h.run(tasks.add, 1, 1)
        d = h.task_dir("left")
        # An executor that cannot stop running work may let it finish: give it a short one.
        seconds = 120.0 if h.executor.capabilities.stop_running else 2.0
        running = h.run(tasks.spawn_and_wait, str(d), seconds)
        h.wait_final(done, self.start_timeout + self.task_timeout)
        h.wait_file(running, d / tasks.STARTED, self.start_timeout)
        pids = [int((d / tasks.STARTED).read_text()), int((d / tasks.CHILD).read_text())]
        # an in-process executor runs tasks here; a shared worker (a cluster's, started before
        # this test) is not the executor's to stop: only what appeared during the test is
        pids = [p for p in pids if p != os.getpid() and p not in before]
        h.executor.shutdown()
        gained = [p for p, t in _descendants().items() if before.get(p) != t]
        left = wait_gone(sorted(set(gained) | set(pids)), self.shutdown_timeout)
        _kill(left)
        assert not left, (
            f"processes still running {self.shutdown_timeout} s after shutdown() with a task "
            f"running: {left}; shutdown() must stop (or, without stop_running, wait for) "
            "what the executor started"
        )

    def test_cancel_many_gives_one_outcome_per_task(self, valent_harness: Harness) -> None:
        h = valent_harness
        done = [h.run(tasks.add, i, 1) for i in range(3)]
        for s in done:
            assert isinstance(h.wait_final(s), Completed)
        assert h.cancel_many(done) == [CancelOutcome.TOO_LATE] * 3

    # ------------------------------------------------------------------ chaining

    def _need_chain(self, h: Harness) -> None:
        if not getattr(h.executor.capabilities, "chain", False):
            pytest.skip("capabilities.chain is False (the dispatcher passes values itself)")

    def test_chain_passes_upstream_values(self, valent_harness: Harness) -> None:
        h = valent_harness
        self._need_chain(h)
        a = h.run(tasks.add, 1, 2)
        b = h.run(tasks.add, h.upstream(a), 10)
        c = h.run(tasks.add, a=h.upstream(b), b=h.upstream(a))
        state = h.wait_final(c)
        assert isinstance(state, Completed) and state.get_value() == 16, (
            f"a chained task got the wrong inputs: {state!r} (expected 13 + 3 = 16)"
        )
        assert h.wait_final(b).get_value() == 13
        d = h.run(tasks.add, h.upstream(a), h.upstream(a))  # upstream already completed
        assert h.wait_final(d).get_value() == 6

    def test_chain_never_runs_after_an_upstream_failure(self, valent_harness: Harness) -> None:
        h = valent_harness
        self._need_chain(h)
        d = h.task_dir("after-failure")
        bad = h.run(tasks.fail_with, "upstream broke")
        after = h.run(tasks.hold, str(d), 0.2, h.upstream(bad))
        then = h.run(tasks.add, h.upstream(after), 1)
        assert isinstance(h.wait_final(bad), Failed)
        for s in (after, then):
            state = h.wait_final(s)
            assert isinstance(state, Cancelled) and state.outcome == CancelOutcome.DEQUEUED, (
                f"a task chained on a failed one must end Cancelled(DEQUEUED), got {state!r}"
            )
        time.sleep(self.settle)
        assert not (d / tasks.STARTED).exists(), "a task chained on a failed one ran"

    def test_chain_cancel_leaves_the_upstream_running(self, valent_harness: Harness) -> None:
        h = valent_harness
        self._need_chain(h)
        d, d2 = h.task_dir("upstream"), h.task_dir("chained")
        up = h.run(tasks.hold, str(d), 60.0)
        h.wait_file(up, d / tasks.STARTED, self.start_timeout)
        first = h.run(tasks.hold, str(d2), 0.2, h.upstream(up))
        second = h.run(tasks.add, h.upstream(first), "!")
        assert h.cancel_many([second, first]) == [CancelOutcome.DEQUEUED] * 2
        tasks.write_atomic(d / tasks.RELEASE, "")
        state = h.wait_final(up)
        assert isinstance(state, Completed) and state.get_value() == "released", state
        for s in (first, second):
            state = h.wait_final(s)
            assert isinstance(state, Cancelled) and state.outcome == CancelOutcome.DEQUEUED
        time.sleep(self.settle)
        assert not (d2 / tasks.STARTED).exists(), "a dequeued chained task ran"

    def test_workflow_chain_shows_waiting_nodes_as_new(self, valent_harness: Harness) -> None:
        h = valent_harness
        self._need_chain(h)
        ex = h.executor
        hold = ct.electron(tasks.hold, executor=ex)
        add = ct.electron(tasks.add, executor=ex)
        d = h.task_dir("wf-chain")

        @ct.lattice
        def conformance_chain(directory: str) -> str:
            return add(add(hold(directory, 60.0), "!"), "?")

        did = ct.dispatch(conformance_chain)(str(d))
        deadline = time.monotonic() + self.start_timeout + self.task_timeout
        while not (d / tasks.STARTED).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (d / tasks.STARTED).exists(), ct.get_result(did)
        nodes = ct.get_result(did).get_all_node_results()
        waiting = [n["status"] for n in nodes if n["node_name"] == "add"]
        assert waiting == [Status.NEW_OBJECT] * 2, (
            f"nodes whose inputs are not back must show NEW_OBJECT, got {waiting}"
        )
        tasks.write_atomic(d / tasks.RELEASE, "")
        result = ct.get_result(did, wait=True, timeout=self.task_timeout + 30)
        assert result.status == Status.COMPLETED, (result.status, result.error)
        assert result.result == "released!?"

    # ------------------------------------------------------------------ workflows

    def test_workflow_runs_on_the_executor(self, valent_harness: Harness) -> None:
        ex = valent_harness.executor
        add = ct.electron(tasks.add, executor=ex)

        @ct.lattice
        def conformance_sum(x: int) -> int:
            return add(add(x, 1), 10)

        result = ct.get_result(
            ct.dispatch(conformance_sum)(1), wait=True, timeout=self.start_timeout + 60
        )
        assert result.status == Status.COMPLETED, result.error
        assert result.result == 12
        execs = {n["executor"] for n in result.get_all_node_results() if n["executor"]}
        assert execs == {ex.name}

    def test_workflow_cancel(self, valent_harness: Harness) -> None:
        h = valent_harness
        ex = h.executor
        add = ct.electron(tasks.add, executor=ex)
        hold = ct.electron(tasks.hold, executor=ex)
        d = h.task_dir("wf")
        seconds = 60.0 if ex.capabilities.stop_running else 3.0

        @ct.lattice
        def conformance_cancel(directory: str) -> int:
            first = add(1, 2)
            held = hold(directory, seconds, first)
            return add(held, 1)

        did = ct.dispatch(conformance_cancel)(str(d))
        deadline = time.monotonic() + self.start_timeout + self.task_timeout
        while not (d / tasks.STARTED).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (d / tasks.STARTED).exists(), ct.get_result(did)
        pid = int((d / tasks.STARTED).read_text())
        ct.cancel(did)
        result = ct.get_result(did, wait=True, timeout=self.task_timeout + 30)
        assert result.status == Status.CANCELLED, (result.status, result.error)
        nodes = {n["node_name"] + str(n["node_id"]): n for n in result.get_all_node_results()}
        assert nodes["add0"]["status"] == Status.COMPLETED and nodes["add0"]["output"] == 3
        held_node = next(n for n in nodes.values() if n["node_name"] == "hold")
        last = [n for n in nodes.values() if n["node_name"] == "add"][-1]
        assert last["status"] == Status.CANCELLED, last
        if ex.capabilities.stop_running:
            assert held_node["status"] == Status.CANCELLED, held_node
            assert held_node["cancel_outcome"] == CancelOutcome.KILLED.value, held_node
            assert not alive(pid), f"the cancelled task's process {pid} still runs"
        else:
            assert held_node["cancel_outcome"] == CancelOutcome.RUNS_TO_COMPLETION.value


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()[:6])
    except psutil.Error:
        return "(gone)"
