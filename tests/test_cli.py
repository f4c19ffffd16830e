"""`valent list | status | show | logs | cancel` on finished dispatches, and their errors.

Dispatches run in this process (a private LocalExecutor); the CLI runs as a subprocess
against the same store, as a user in another terminal would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import valent as ct
from valent._store import get_store

VALENT_SCRIPT = shutil.which("valent", path=str(Path(sys.executable).parent))


def valent(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `valent` script (or `python -m valent.cli`) with this test's store."""
    cmd = [VALENT_SCRIPT] if VALENT_SCRIPT else [sys.executable, "-m", "valent.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60,
        env=env if env is not None else dict(os.environ),
    )


def ok_json(*args: str):
    res = valent(*args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def one_line_error(res: subprocess.CompletedProcess, code: int = 1) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("valent: ")
    return lines[0]


@pytest.fixture
def finished(local_executor):
    """Two finished dispatches: one COMPLETED (tasks that print), one FAILED."""

    @ct.electron(executor=local_executor)
    def shout(word):
        print(f"out:{word}")
        print(f"err:{word}", file=sys.stderr)
        return word.upper()

    @ct.electron(executor=local_executor)
    def join(words):
        return "-".join(words)

    @ct.electron(executor=local_executor)
    def boom(x):
        raise ValueError(f"bad {x}")

    @ct.lattice
    def greet(words):
        return join([shout(w) for w in words])

    @ct.lattice
    def explode(x):
        return boom(x)

    good = ct.dispatch_sync(greet)(["a", "b"])
    time.sleep(0.01)  # distinct created_at, so "newest first" is well defined
    bad = ct.dispatch_sync(explode)(7)
    assert good.status == "COMPLETED" and bad.status == "FAILED"
    return good, bad


def test_list_newest_first_filter_limit_json(finished):
    good, bad = finished
    rows = ok_json("list")
    assert [r["dispatch_id"] for r in rows] == [bad.dispatch_id, good.dispatch_id]
    g = rows[1]
    assert g["lattice_name"] == "greet" and g["status"] == "COMPLETED"
    assert g["nodes_done"] == g["node_count"] == good.node_count
    assert g["duration"] is not None and g["duration"] >= 0
    assert [r["dispatch_id"] for r in ok_json("list", "--status", "failed")] == [bad.dispatch_id]
    assert [r["dispatch_id"] for r in ok_json("list", "--limit", "1")] == [bad.dispatch_id]
    assert ok_json("list", "--status", "RUNNING") == []

    text = valent("list").stdout.splitlines()
    assert text[0].split() == ["ID", "LATTICE", "STATUS", "STARTED", "DURATION", "NODES"]
    assert text[1].startswith(bad.dispatch_id[:8]) and "FAILED" in text[1]
    assert f"{good.node_count}/{good.node_count}" in text[2]


def test_status_and_show(finished):
    good, bad = finished
    res = valent("status", good.dispatch_id[:5])
    assert res.returncode == 0, res.stderr
    assert f"dispatch  {good.dispatch_id}" in res.stdout and "COMPLETED" in res.stdout
    assert f"{good.node_count}/{good.node_count} done" in res.stdout

    status = ok_json("status", bad.dispatch_id)
    assert status["status"] == "FAILED" and "ValueError: bad 7" in status["error"]
    boom = [n for n in status["nodes"] if n["name"] == "boom"][0]
    assert boom["status"] == "FAILED" and boom["executor"] == "local"

    shown = valent("show", good.dispatch_id)
    assert shown.returncode == 0, shown.stderr
    assert str(ct.get_result(good.dispatch_id)) in shown.stdout  # print(result), verbatim
    assert "result: A-B" in shown.stdout
    header = [ln for ln in shown.stdout.splitlines() if ln.startswith("ID ")][0]
    assert header.split() == ["ID", "NAME", "STATUS", "EXECUTOR", "CANCEL", "DURATION", "REASON"]

    data = ok_json("show", good.dispatch_id[:8])
    assert data["result"] == "'A-B'" and data["status"] == "COMPLETED"
    outputs = {n["node_id"]: n["output"] for n in data["nodes"]}
    assert outputs[0] == "'A'"


def test_logs(finished):
    good, bad = finished
    res = valent("logs", good.dispatch_id)
    assert res.returncode == 0, res.stderr
    assert "== shout(0) [COMPLETED] stdout ==\nout:a" in res.stdout
    assert "== shout(2) [COMPLETED] stderr ==\nerr:b" in res.stdout

    res = valent("logs", good.dispatch_id, "2", "--stream", "stdout")
    assert res.stdout.strip() == "== shout(2) [COMPLETED] stdout ==\nout:b"
    res = valent("logs", good.dispatch_id, "shout(0)", "--stream", "stderr")
    assert res.stdout.strip() == "== shout(0) [COMPLETED] stderr ==\nerr:a"
    assert "ambiguous" in one_line_error(valent("logs", good.dispatch_id, "shout"))
    assert "no task 'nope'" in one_line_error(valent("logs", good.dispatch_id, "nope"))
    res = valent("logs", bad.dispatch_id)
    assert res.returncode == 0 and "no captured" in res.stdout


def test_cancel_a_finished_dispatch_and_bad_task_ids(finished):
    good, _ = finished
    res = valent("cancel", good.dispatch_id[:8])
    assert res.returncode == 0 and "already finished (COMPLETED)" in res.stdout
    assert "no task id(s) [99]" in one_line_error(
        valent("cancel", good.dispatch_id, "--task", "99")
    )
    assert ct.get_result(good.dispatch_id).status == "COMPLETED"


def _fake_dispatch(dispatch_id: str) -> None:
    """A finished dispatch row written straight to the store (for id-resolution tests)."""
    get_store().create_dispatch(
        {
            "dispatch_id": dispatch_id, "lattice_name": "fake", "status": "COMPLETED",
            "created_at": time.time(), "owner_pid": None, "owner_host": socket.gethostname(),
            "node_count": 0,
        },
        [],
    )


def test_unknown_short_and_ambiguous_ids_exit_1():
    _fake_dispatch("abcd1111-0000-4000-8000-000000000000")
    _fake_dispatch("abcd2222-0000-4000-8000-000000000000")
    for cmd in ("status", "show", "cancel", "watch", "logs"):
        assert "no dispatch 'ffff0000'" in one_line_error(valent(cmd, "ffff0000"))
    assert "ambiguous prefix" in one_line_error(valent("status", "abcd"))
    assert "at least 4 characters" in one_line_error(valent("show", "abc"))
    assert ok_json("status", "abcd2")["dispatch_id"].startswith("abcd2222")


@pytest.mark.parametrize("bad", ["%%%%", "____", "00%%", "0*0*", "00ab'--", "0000%"])
def test_wildcard_ids_match_nothing_and_cancel_nothing(local_executor, bad):
    """SQL LIKE wildcards in an id once resolved to a dispatch: `valent cancel ____` cancelled
    whatever was running. Ids are matched literally, and only hex digits and dashes count."""

    @ct.electron(executor=local_executor)
    def nap(s):
        time.sleep(s)
        return s

    @ct.lattice
    def napping(s):
        return nap(s)

    did = ct.dispatch(napping)(60)
    try:
        assert ct.get_result(did).status in ("NEW_OBJECT", "RUNNING")
        msg = one_line_error(valent("cancel", bad, "--no-wait"))
        assert f"no dispatch {bad!r}" in msg and "not a dispatch id" in msg
        row = get_store().dispatch_row(did)
        assert row["status"] in ("NEW_OBJECT", "RUNNING") and not row["cancel_requested_at"]
        # the same literal rules for a real prefix, upper case included
        assert ok_json("status", did[:4].upper())["dispatch_id"] == did
    finally:
        ct.cancel(did)
        assert ct.get_result(did, wait=True, timeout=60).status == "CANCELLED"


def test_store_that_cannot_be_opened_exits_1(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    env = {**os.environ, "VALENT_RESULTS_DIR": str(not_a_dir / "results")}
    for args in (("list",), ("status", "abcd1234"), ("cancel", "abcd1234")):
        assert "results" in one_line_error(valent(*args, env=env))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "valent.db").write_bytes(b"this is not a database" * 100)
    env = {**os.environ, "VALENT_RESULTS_DIR": str(garbage)}
    assert "valent.db" in one_line_error(valent("list", env=env))


def test_get_result_progress_bar(local_executor, capsys):
    @ct.electron(executor=local_executor)
    def nap(i):
        time.sleep(0.2)
        return i

    @ct.lattice
    def naps(n):
        return [nap(i) for i in range(n)]

    result = ct.get_result(ct.dispatch(naps)(3), wait=True, progress=True)
    assert result.status == "COMPLETED" and result.result == [0, 1, 2]
    err = capsys.readouterr().err
    total = result.node_count
    assert f"naps {result.dispatch_id[:8]} COMPLETED" in err
    assert f"{total}/{total} nodes" in err


def test_watch_on_a_terminal_draws_the_live_view(finished):
    """Under a pseudo-terminal `valent watch` draws rich's table and bar, then exits."""
    import pty

    good, _ = finished
    cmd = [VALENT_SCRIPT] if VALENT_SCRIPT else [sys.executable, "-m", "valent.cli"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*cmd, "watch", good.dispatch_id[:8]], stdin=follower, stdout=follower,
        stderr=follower, env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace")
    total = good.node_count
    assert "\x1b[" in text  # drawn with terminal control codes, not plain lines
    assert "EXECUTOR" in text and "shout" in text
    assert f"{total}/{total}" in text and "nodes" in text
    assert f"dispatch {good.dispatch_id[:8]} ended" in text


def test_demo_says_what_it_does_first_and_ends_with_the_summary(tmp_path):
    res = valent("demo", "--scale", "0.05",
                 env={**os.environ, "VALENT_RESULTS_DIR": str(tmp_path / "demo")})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("valent demo: dispatching Covalent's \"cancel a running workflow\"")
    assert "(13 tasks, sleeps x0.05)" in lines[0]
    assert lines[1].startswith("on the local executor, cancelling it after 0.15 s")
    assert lines[-2].startswith("status CANCELLED: cancel() to get_result(wait=True) took")
    assert lines[-1].endswith("still alive after get_result: 0")
    assert "{'task_1(0)'" not in res.stdout  # no raw dict of outputs


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("cancel", "abcd1234", "--timeout", "nan"), "not a finite number"),  # was accepted
        (("cancel", "abcd1234", "--timeout", "inf"), "not a finite number"),
        (("watch", "abcd1234", "--interval", "1e300"), "more than 3600"),
        (("demo", "--scale", "-1"), "less than 0.01"),
    ],
)
def test_number_options_refuse_what_is_not_a_finite_number_in_range(args, words):
    res = valent(*args)
    assert res.returncode == 2 and words in res.stderr, res.stderr
