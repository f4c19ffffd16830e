"""What is particular to SubprocessExecutor: settings, output capture, a task that dies."""

from __future__ import annotations

import os
import threading

import pytest
import valent
from valent_subprocess import SubprocessExecutor


def _run(ex: SubprocessExecutor, fn, *args):
    woke = threading.Event()
    job = ex.run(valent.Task("d", 0, fn.__name__, fn, args), woke.set)
    while not job.state.final:
        assert woke.wait(30), "wake() was not called"
        woke.clear()
    return job.state


def shout(text: str) -> str:
    print(text)
    return text.upper()


def die() -> None:
    os._exit(3)


def test_output_is_captured_and_value_returned():
    ex = SubprocessExecutor(max_parallel=1)
    try:
        state = _run(ex, shout, "hello")
        assert isinstance(state, valent.Completed)
        assert state.get_value() == "HELLO" and state.stdout == "hello\n"
    finally:
        ex.shutdown()


def test_a_task_whose_process_dies_fails_with_the_cause():
    ex = SubprocessExecutor(max_parallel=1)
    try:
        state = _run(ex, die)
        assert isinstance(state, valent.Failed)
        assert isinstance(state.error, valent.WorkerDiedError)
        assert "exit code 3" in str(state.error)
    finally:
        ex.shutdown()


def test_settings_are_checked():
    assert set(SubprocessExecutor.settings()) == {"max_parallel", "grace", "python"}
    with pytest.raises(ValueError, match="max_parallel"):
        SubprocessExecutor(max_parallel=0)
    with pytest.raises(ValueError, match="grace"):
        SubprocessExecutor(grace=-1)
