"""The child side: ``python -m valent_subprocess.runner TASK_FILE RESULT_FILE``.

Loads the parent's ``sys.path`` and the cloudpickled ``(fn, args, kwargs)``, calls it, and writes
``(ok, payload, message, traceback, started, ended, asked_to_stop)`` to RESULT_FILE
atomically (a temporary
file, then ``os.replace``), so the parent never reads half a result.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

_asked = False
_cooperative = False


def _token() -> bool:
    """``valent.cancel_requested()`` in this process: True once SIGTERM arrived."""
    global _cooperative
    _cooperative = True
    return _asked


def _on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001
    # A task that never asked cancel_requested() stops now; one that did gets the grace.
    global _asked
    _asked = True
    if not _cooperative:
        os._exit(128 + signal.SIGTERM)


def main(task_file: str, result_file: str) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    import cloudpickle
    from valent.plugin import set_process_token

    set_process_token(_token)
    started = time.time()
    try:
        with open(task_file, "rb") as f:
            sys.path[:] = cloudpickle.load(f)  # the parent's: the task's modules import here
            fn, args, kwargs = cloudpickle.load(f)
        result = (True, cloudpickle.dumps(fn(*args, **kwargs)), "", "")
    except BaseException as exc:  # noqa: BLE001 - the task's SystemExit is its error too
        tb = "".join(traceback.format_exception(exc))
        try:
            blob = cloudpickle.dumps(exc)
            cloudpickle.loads(blob)
        except Exception:
            blob = None
        result = (False, blob, f"{type(exc).__name__}: {exc}", tb)
    tmp = f"{result_file}.tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump((*result, started, time.time(), _asked), f)
    os.replace(tmp, result_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
