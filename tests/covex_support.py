"""Covalent-style executors of the three kinds, for tests (importable by the pool's workers).

- ``InProcess`` / ``AsyncInProcess``: ``run`` calls the function itself (pool mode: killed).
- ``Submitting``: ``run`` submits the function to a "backend" (a detached Python process
  of its own session, the way a batch queue or a remote host runs it), records the job
  handle, waits; ``cancel`` kills the backend job and says True (or, with
  ``cancel_works=False``, does nothing and says False).
- ``FireAndWait``: submits to the same kind of backend but implements no ``cancel``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle
from valent.executor.base import AsyncBaseExecutor, BaseExecutor, TaskCancelledError

RUNNER = (
    "import cloudpickle, os, sys, traceback\n"
    "fn = cloudpickle.load(open(sys.argv[1], 'rb'))\n"
    "try:\n"
    "    out = ('ok', fn())\n"
    "except Exception as exc:\n"
    "    out = ('error', (exc, traceback.format_exc()))\n"
    "tmp = sys.argv[2] + '.tmp'\n"
    "cloudpickle.dump(out, open(tmp, 'wb'))\n"
    "os.replace(tmp, sys.argv[2])\n"
)


class InProcess(BaseExecutor):
    """Runs the function in ``run`` and notes setup/teardown calls in ``note_dir``."""

    def __init__(self, note_dir: str = "", **kwargs: Any):
        self.note_dir = note_dir
        super().__init__(**kwargs)

    def setup(self, task_metadata: dict) -> None:
        if self.note_dir:
            Path(self.note_dir, f"setup-{task_metadata['node_id']}").write_text(
                json.dumps(task_metadata)
            )

    def run(self, function, args, kwargs, task_metadata):
        print("in-process run of node", task_metadata["node_id"], file=self.task_stdout)
        return function(*args, **kwargs)

    def teardown(self, task_metadata: dict) -> None:
        if self.note_dir:
            Path(self.note_dir, f"teardown-{task_metadata['node_id']}").write_text("done")


class AsyncInProcess(AsyncBaseExecutor):
    async def run(self, function, args, kwargs, task_metadata):
        return function(*args, **kwargs)


def _submit(function, args, kwargs) -> tuple[subprocess.Popen, str]:
    job_dir = tempfile.mkdtemp(prefix="covex-backend-")
    blob = os.path.join(job_dir, "fn.pkl")
    with open(blob, "wb") as f:
        cloudpickle.dump(lambda: function(*args, **kwargs), f)
    out = os.path.join(job_dir, "out.pkl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, blob, out], start_new_session=True,
        stdin=subprocess.DEVNULL, env=env,
    )
    return proc, out


def _collect(proc: subprocess.Popen, out: str) -> Any:
    try:
        with open(out, "rb") as f:
            kind, value = cloudpickle.load(f)
        if kind == "error":
            exc, text = value
            exc.add_note(f"in the backend job:\n{text}")
            raise exc
        return value
    finally:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)


class Submitting(BaseExecutor):
    """Submits to a backend job, records its handle; ``cancel`` kills the job."""

    def __init__(self, cancel_works: bool = True, **kwargs: Any):
        self.cancel_works = cancel_works
        super().__init__(**kwargs)

    def run(self, function, args, kwargs, task_metadata):
        proc, out = _submit(function, args, kwargs)
        self.set_job_handle({"pid": proc.pid})
        while proc.poll() is None:
            time.sleep(0.02)
        if proc.returncode != 0:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)  # no job folder left
            if self.get_cancel_requested():
                raise TaskCancelledError(f"job {proc.pid} was cancelled")
            raise RuntimeError(f"backend job {proc.pid} exited with {proc.returncode}")
        return _collect(proc, out)

    def cancel(self, task_metadata, job_handle):
        if not self.cancel_works or not job_handle:
            return False
        try:
            os.killpg(job_handle["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True


class FireAndWait(BaseExecutor):
    """Submits to a backend job and waits; implements no cancel."""

    def run(self, function, args, kwargs, task_metadata):
        proc, out = _submit(function, args, kwargs)
        proc.wait()
        if proc.returncode != 0:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
            raise RuntimeError(f"backend job {proc.pid} exited with {proc.returncode}")
        return _collect(proc, out)


def pid_and_sleep(directory: str, seconds: float) -> str:
    """Write this process's PID, start a sleeping child (its PID too), wait for it."""
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    Path(directory, "child.pid").write_text(str(child.pid))
    tmp = Path(directory, ".pid.tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, Path(directory, "pid"))
    child.wait()
    return "finished"


class AsyncSubmitting(AsyncBaseExecutor):
    """``Submitting`` with coroutines: run, set_job_handle, get_cancel_requested, cancel."""

    async def run(self, function, args, kwargs, task_metadata):
        import asyncio

        proc, out = _submit(function, args, kwargs)
        await self.set_job_handle({"pid": proc.pid})
        while proc.poll() is None:
            await asyncio.sleep(0.02)
        if proc.returncode != 0:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
            if await self.get_cancel_requested():
                raise TaskCancelledError(f"job {proc.pid} was cancelled")
            raise RuntimeError(f"backend job {proc.pid} exited with {proc.returncode}")
        return _collect(proc, out)

    async def cancel(self, task_metadata, job_handle):
        os.killpg(job_handle["pid"], signal.SIGKILL)
        return True
