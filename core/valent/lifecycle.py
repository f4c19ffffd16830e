"""What happens to the dispatches a process owns when it is interrupted, forked, or exits.

- The first Ctrl-C (SIGINT) or SIGTERM while dispatches this process owns are running
  cancels them, waits until every executor confirmed the stop, prints one line and exits
  (130 for Ctrl-C, 143 for SIGTERM). Tasks their executor cannot stop (``runs_to_completion``)
  are not waited for: the process leaves them, and readers then see the dispatch's owner
  died. A second one exits at once (the tasks still die with their owner: the pool's
  workers watch it through the kernel). With nothing of ours
  running, the signal does what it did before valent was imported. A handler the program
  installed itself is left alone (and so is a notebook kernel's).
- After ``os.fork()`` the child starts with no dispatcher: its first dispatch makes its own.
- At interpreter exit, dispatches still running are waited for (Ctrl-C cancels them).
- Triggers (``valent.triggers``) stop at exit and on the first Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
WAIT_AFTER_SIGNAL = 120.0
"""At most this long (s) for the stop to be confirmed before exiting anyway."""

_installed = False
_stopping = False


def install_signal_handlers() -> None:
    """Take over SIGINT/SIGTERM (see the module docstring). Main thread only; idempotent."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    for sig in EXIT_CODES:
        try:
            current = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if sig == signal.SIGINT and current is not signal.default_int_handler:
            continue  # the program's (or a notebook kernel's) own handler
        if sig == signal.SIGTERM and current not in (signal.SIG_DFL, None):
            continue
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


def _on_signal(signum: int, frame: Any) -> None:
    global _stopping
    from . import api

    code = EXIT_CODES.get(signal.Signals(signum), 128 + signum)
    if _stopping:  # a second signal while stopping: leave now
        _exit_now(code)
    d = api._dispatcher
    _stop_triggers("interrupted")
    runs = d.active() if d is not None else []
    if not runs:
        _as_if_not_installed(signum)
        return
    _stopping = True
    try:
        summary = stop_owned(d, runs)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"valent: {name}: {summary}", file=sys.stderr, flush=True)
    finally:
        _stopping = False
    raise SystemExit(code)


def _as_if_not_installed(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _exit_now(code: int) -> None:
    try:
        sys.stderr.write("valent: interrupted again; exiting now\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


def stop_owned(dispatcher: Any, runs: list[Any]) -> str:
    """Cancel ``runs`` (dispatches this process owns), wait until each is final with its
    stop confirmed, and say in one line what happened to their tasks."""
    for run in runs:
        try:
            dispatcher.cancel(run.id, None)
        except Exception as exc:  # report and go on stopping the others
            print(f"valent: cancelling {run.id}: {exc}", file=sys.stderr)
    deadline = time.monotonic() + WAIT_AFTER_SIGNAL
    while time.monotonic() < deadline:
        # settled: final, or all that is left are tasks their executor cannot stop (they
        # were told runs_to_completion; waiting for them could take forever)
        if all(run.done.is_set() for run in runs) or dispatcher.call(
            lambda: all(_settled(run) for run in runs)
        ):
            break
        time.sleep(0.02)
    outcomes = dispatcher.call(lambda: _tally(runs))
    ids = ", ".join(f"{run.id[:8]} {run.status}" for run in runs[:3])
    if len(runs) > 3:
        ids += f", and {len(runs) - 3} more"
    tally = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "no task was running"
    return f"cancelled {ids} ({tally})"


def _settled(run: Any) -> bool:
    """On the dispatcher's thread: ``run`` is final, or only tasks left to run to
    completion are unfinished."""
    from .status import CancelOutcome

    return run.done.is_set() or all(
        nr.final or nr.cancel_outcome == CancelOutcome.RUNS_TO_COMPLETION for nr in run.nodes
    )


def _tally(runs: list[Any]) -> dict[str, int]:
    """On the dispatcher's thread: how many nodes had each cancel outcome."""
    outcomes: dict[str, int] = {}
    for run in runs:
        for nr in run.leaf_nodes():  # the tasks of sublattices' child dispatches too
            if nr.cancel_outcome is not None:
                key = nr.cancel_outcome.value
                outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def at_exit() -> None:
    """Wait for dispatches still running at interpreter exit; Ctrl-C cancels them."""
    from . import api

    d = api._dispatcher
    if d is None:
        return
    _stop_triggers("the process that registered it exited")
    code = None
    try:
        runs = d.active()
        if runs:
            print(
                f"valent: waiting for {len(runs)} running dispatch(es) to finish "
                "(Ctrl-C cancels them)",
                file=sys.stderr,
            )
            try:
                for run in runs:
                    run.done.wait()
            except (KeyboardInterrupt, SystemExit) as exc:
                code = exc.code if isinstance(exc, SystemExit) else 130
                left = d.active()
                if left:
                    print(f"valent: {stop_owned(d, left)}", file=sys.stderr)
    finally:
        d.shutdown_executors()
    if code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def _stop_triggers(reason: str) -> None:
    """Stop the triggers this process observes (if it has any); a dispatch still waiting for
    its first firing ends CANCELLED."""
    triggers = sys.modules.get("valent.triggers")
    if triggers is not None:
        triggers.stop_all(reason)


def _after_fork_in_child() -> None:
    global _stopping
    from . import api

    api._reset_after_fork()
    _stopping = False


os.register_at_fork(after_in_child=_after_fork_in_child)
