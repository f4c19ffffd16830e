"""Triggers: a folder, time, a SQLite table; pending dispatches; stopping them from this
process and from another one (`valent triggers stop`), through the store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import valent as ct
from core_support import wait_until
from valent.triggers import DirTrigger, SQLiteTrigger, TimeTrigger

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_trigger_left():
    yield
    from valent import triggers

    left = triggers.active()
    triggers.stop_all("test ended")
    assert not left, f"a test left triggers running: {left}"


def _dispatches(lattice_name=None):
    from valent._store import get_store

    rows = get_store().list_dispatches(limit=1000)
    return [r for r in rows if lattice_name is None or r["lattice_name"] == lattice_name]


def test_dir_trigger_runs_the_pending_dispatch_then_redispatches_until_stopped(tmp_path):
    """What the trigger_dir how-to shows: a lattice with a DirTrigger, dispatched; a file
    change runs it; ct.stop_triggers ends the triggering."""
    watched = tmp_path / "watched"
    watched.mkdir()
    data = watched / "my_text_file.txt"
    data.write_text("".join(f"{i}\n" for i in range(10)))
    dir_trigger = DirTrigger(dir_path=str(watched), event_names="modified")

    @ct.lattice(triggers=dir_trigger)
    @ct.electron
    def my_workflow():
        return "File was changed."

    did = ct.dispatch(my_workflow)()
    assert ct.get_result(did).status == ct.Status.NEW_OBJECT  # waits for its trigger
    time.sleep(0.6)
    assert ct.get_result(did).status == ct.Status.NEW_OBJECT  # nothing changed: nothing ran
    with data.open("a") as f:
        f.write("10\n")
    result = ct.get_result(did, wait=True, timeout=30)  # the first firing runs it
    assert result.result == "File was changed."
    time.sleep(0.6)
    with data.open("a") as f:
        f.write("11\n")
    again = wait_until(lambda: [r for r in _dispatches("my_workflow") if r["redispatch_of"]], 30)
    assert again and again[0]["redispatch_of"] == did
    rid = again[0]["dispatch_id"]
    assert ct.get_result(rid, wait=True, timeout=30).result == "File was changed."
    from valent._store import get_store

    row = get_store().dispatch_row(rid)
    assert row["trigger_id"] is not None  # recorded with its trigger
    ct.stop_triggers(did)
    count = len(_dispatches("my_workflow"))
    with data.open("a") as f:
        f.write("12\n")
    time.sleep(1.0)
    assert len(_dispatches("my_workflow")) == count
    (trig,) = get_store().list_triggers(everything=True)
    assert trig["fired"] == 2 and trig["stopped_at"] is not None


def test_dir_trigger_created_deleted_moved_and_batches(tmp_path):
    d = tmp_path / "box"
    d.mkdir()

    @ct.lattice
    @ct.electron
    def noop():
        return 1

    did = ct.dispatch(noop)()
    ct.get_result(did, wait=True, timeout=30)
    t = DirTrigger(str(d), ["created", "moved"], batch_size=2, poll_interval=0.05)
    t.lattice_dispatch_id = did
    t.register()
    try:
        (d / "a").write_text("a")
        time.sleep(0.3)
        assert t.new_dispatch_ids == []  # one event: batch of 2 not reached
        (d / "a").rename(d / "b")  # moved (same inode), not created + deleted
        assert wait_until(lambda: len(t.new_dispatch_ids) == 1, 10)
        (d / "b").unlink()  # deleted: not watched
        time.sleep(0.3)
        assert len(t.new_dispatch_ids) == 1
    finally:
        ct.stop_triggers(did)
    for rid in t.new_dispatch_ids:
        assert ct.get_result(rid, wait=True, timeout=30).status == ct.Status.COMPLETED


def test_time_trigger_registered_on_a_dispatch(tmp_path):
    """The trigger_time how-to: attach to a dispatch id, register, stop."""

    @ct.lattice
    @ct.electron
    def my_workflow():
        return 42

    did = ct.dispatch(my_workflow)()
    time_trigger = TimeTrigger(time_gap=0.2)
    time_trigger.lattice_dispatch_id = did
    time_trigger.register()
    assert wait_until(lambda: len(time_trigger.new_dispatch_ids) >= 3, 20)
    ct.stop_triggers(did)
    n = len(time_trigger.new_dispatch_ids)
    time.sleep(0.6)
    assert len(time_trigger.new_dispatch_ids) == n
    for rid in time_trigger.new_dispatch_ids:
        result = ct.get_result(rid, wait=True, timeout=30)
        assert (result.result, result.redispatch_of) == (42, did)


def test_sqlite_trigger_fires_once_per_new_pending_row(tmp_path):
    db = tmp_path / "jobs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT)")
    conn.commit()

    @ct.lattice
    @ct.electron
    def my_workflow():
        return 42

    did = ct.dispatch(my_workflow)()
    sqlite_trigger = SQLiteTrigger(db_path=str(db), table_name="jobs", poll_interval=0.1)
    sqlite_trigger.lattice_dispatch_id = did
    sqlite_trigger.register()
    try:
        conn.executemany("INSERT INTO jobs (status) VALUES (?)",
                         [("pending",), ("done",), ("pending",)])
        conn.commit()
        assert wait_until(lambda: len(sqlite_trigger.new_dispatch_ids) == 2, 20)
        time.sleep(0.4)
        assert len(sqlite_trigger.new_dispatch_ids) == 2  # each row fires once
        conn.execute("INSERT INTO jobs (status) VALUES ('pending')")
        conn.commit()
        assert wait_until(lambda: len(sqlite_trigger.new_dispatch_ids) == 3, 20)
    finally:
        ct.stop_triggers(did)
        conn.close()


def test_bad_trigger_settings_are_clear_errors(tmp_path):
    with pytest.raises(ct.ValentError, match="event_names"):
        DirTrigger(str(tmp_path), "renamed")
    with pytest.raises(ct.ValentError, match="time_gap"):
        TimeTrigger(time_gap=0)
    with pytest.raises(ct.ValentError, match="table's name"):
        SQLiteTrigger(str(tmp_path / "x.db"), "")
    t = SQLiteTrigger(str(tmp_path / "missing.db"), "jobs")

    @ct.lattice
    @ct.electron
    def wf():
        return 1

    t.lattice_dispatch_id = ct.dispatch(wf)()
    with pytest.raises(ct.ValentError, match="no database file"):
        t.register()
    with pytest.raises(ct.ValentError, match="takes triggers"):
        ct.lattice(triggers=["not a trigger"])(lambda: 1)
    with pytest.raises(ct.ValentError, match="table's name"):
        ct.triggers.DatabaseTrigger("sqlite:///x.db", None)


@pytest.mark.parametrize("kind", ["sqlite", "sqlalchemy"])
def test_a_table_name_is_always_quoted_never_pasted_into_sql(tmp_path, kind):
    """Covalent's how-to names its table 'table name': a space (or a quote) works; a name
    that looks like SQL is only a name (the other table survives)."""
    db = tmp_path / "jobs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute('CREATE TABLE "table name" (id INTEGER PRIMARY KEY, status TEXT)')
    conn.execute('CREATE TABLE keep (x)')
    conn.commit()

    @ct.lattice
    @ct.electron
    def my_workflow():
        return 42

    did = ct.dispatch(my_workflow)()
    if kind == "sqlite":
        make = lambda name: SQLiteTrigger(str(db), name, poll_interval=0.05)  # noqa: E731
    else:
        make = lambda name: ct.triggers.DatabaseTrigger(  # noqa: E731
            f"sqlite:///{db}", name, poll_interval=0.05)
    trigger = make("table name")
    trigger.lattice_dispatch_id = did
    trigger.register()
    try:
        conn.execute("""INSERT INTO "table name" (status) VALUES ('pending')""")
        conn.commit()
        assert wait_until(lambda: len(trigger.new_dispatch_ids) >= 1, 20)
    finally:
        ct.stop_triggers(did)
    sly = make('keep"; DROP TABLE keep; --')
    sly.lattice_dispatch_id = ct.dispatch(my_workflow)()
    try:
        if kind == "sqlite":
            with pytest.raises(ct.ValentError, match="has no table"):
                sly.register()
        else:
            sly.prepare()
            with pytest.raises(Exception, match="no such table"):
                sly.poll()
    finally:
        ct.stop_triggers(sly.lattice_dispatch_id)
    assert conn.execute("SELECT COUNT(*) FROM keep").fetchone() == (0,)
    conn.close()


def test_database_trigger_without_sqlalchemy_says_how_to_install_it(monkeypatch):
    # a fake for the one fault we cannot cause otherwise here: SQLAlchemy missing (the test
    # extra installs it); None in sys.modules makes its import fail
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ct.ValentError, match="pip install sqlalchemy"):
        ct.triggers.DatabaseTrigger("sqlite:///x.db", "jobs")


def test_database_trigger_fires_every_n_polls_that_find_matching_rows(tmp_path):
    """Through real SQLAlchemy on a SQLite file: no firing while no row matches the where
    clauses; once one does, a redispatch every ``trigger_after_n`` polls; none once it
    stops matching."""
    db = tmp_path / "jobs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, size INTEGER)")
    conn.execute("INSERT INTO jobs (status, size) VALUES ('done', 1), ('pending', 0)")
    conn.commit()

    @ct.lattice
    @ct.electron
    def my_workflow():
        return 7

    did = ct.dispatch(my_workflow)()
    trigger = ct.triggers.DatabaseTrigger(
        f"sqlite:///{db}", "jobs", poll_interval=0.05,
        where_clauses=["status = 'pending'", "size > 0"], trigger_after_n=3,
    )
    trigger.lattice_dispatch_id = did
    trigger.register()
    try:
        time.sleep(0.5)  # ~10 polls, no row matches both clauses
        assert trigger.new_dispatch_ids == []
        conn.execute("UPDATE jobs SET size = 5 WHERE status = 'pending'")
        conn.commit()
        assert wait_until(lambda: len(trigger.new_dispatch_ids) >= 2, 20)
        conn.execute("UPDATE jobs SET status = 'done'")
        conn.commit()
        time.sleep(0.3)  # a poll in flight may still fire once
        fired = len(trigger.new_dispatch_ids)
        time.sleep(0.6)
        assert len(trigger.new_dispatch_ids) == fired
        for rid in trigger.new_dispatch_ids:
            assert ct.get_result(rid, wait=True, timeout=30).result == 7
    finally:
        ct.stop_triggers(did)
        conn.close()


def test_a_pending_dispatch_whose_triggers_stop_before_firing_is_cancelled(tmp_path):
    @ct.lattice(triggers=TimeTrigger(time_gap=3600))
    @ct.electron
    def never():
        return 1

    did = ct.dispatch(never)()
    ct.stop_triggers(did)
    result = ct.get_result(did, wait=True, timeout=30)
    assert result.status == ct.Status.CANCELLED
    assert result.get_node_result(0)["cancel_outcome"] == "dequeued"


OWNER = textwrap.dedent(
    """
    import sys
    import valent as ct

    @ct.lattice(triggers=ct.triggers.TimeTrigger(time_gap=0.2))
    @ct.electron
    def ticker():
        return "tick"

    did = ct.dispatch(ticker)()
    print(did, flush=True)
    ct.triggers.join()
    print("triggers stopped", flush=True)
    """
)


def test_triggers_are_listed_and_stopped_from_another_process(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'core'}:{ROOT / 'plugins'}")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        did = owner.stdout.readline().strip()
        assert wait_until(lambda: len(_dispatches("ticker")) >= 3, 30)

        def valent(*args):
            return subprocess.run([sys.executable, "-m", "valent.cli", *args],
                                  capture_output=True, text=True, env=env, timeout=60)

        listed = valent("triggers")
        assert listed.returncode == 0, listed.stderr
        line = listed.stdout.splitlines()[1]
        assert did[:8] in line and "TimeTrigger" in line and "running" in line
        stopped = valent("triggers", "stop", "--dispatch", did[:8])
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stdout and "NOT" not in stopped.stdout
        assert owner.stdout.readline().strip() == "triggers stopped"
        assert owner.wait(30) == 0
    finally:
        if owner.poll() is None:
            owner.send_signal(signal.SIGKILL)
            owner.wait(30)
        owner.stdout.close()
    n = len(_dispatches("ticker"))
    time.sleep(0.6)
    assert len(_dispatches("ticker")) == n
    assert valent_list_state(env) == []


def valent_list_state(env):
    out = subprocess.run([sys.executable, "-m", "valent.cli", "triggers", "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    import json

    return json.loads(out.stdout)


def test_cancelling_a_dispatch_that_waits_for_its_triggers_stops_them(tmp_path):
    @ct.lattice(triggers=TimeTrigger(time_gap=3600))
    @ct.electron
    def waits():
        return 1

    did = ct.dispatch(waits)()
    assert "triggers" in ct.cancel(did)
    assert ct.get_result(did, wait=True, timeout=30).status == ct.Status.CANCELLED
    from valent import triggers

    assert triggers.active() == []
