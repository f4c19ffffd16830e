"""ct.redispatch: new inputs, replaced electrons, reuse of what completed, resume after a
cancel, a failure or the owner's death, and `valent redispatch` from another process.

Each task appends a line to a file per node when its body runs, so the tests count real
executions (a reused node never runs its body).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import valent as ct
from core_support import read_pid, wait_gone, wait_until
from valent.testing.tasks import write_atomic

ROOT = Path(__file__).resolve().parent.parent


def _ran(d, name: str) -> None:
    with open(os.path.join(d, f"{name}.runs"), "a") as f:
        f.write("x\n")


def runs(d, name: str) -> int:
    p = Path(d) / f"{name}.runs"
    return len(p.read_text().split()) if p.exists() else 0


# ------------------------------------------------------------------ the how-to's workflow


@ct.electron
def task_1(a, b):
    return a + b


@ct.electron
def task_2(a, b):
    return a / b


@ct.electron
def task_2_redefined(a, b):
    return a * b


@ct.lattice
def workflow(a, b):
    res_1 = task_1(a, b)
    res_2 = task_2(res_1, b)
    return res_2


def test_the_redispatch_how_to():
    """Replaced electron with the old inputs; reuse (start == end); new inputs."""
    did = ct.dispatch(workflow)(1, 2)
    result = ct.get_result(did, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 1.5)

    rid = ct.redispatch(did, replace_electrons={"task_2": task_2_redefined})()
    assert rid != did
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 6)
    assert result.redispatch_of == did
    assert result.get_node_result(0)["start_time"] != result.get_node_result(0)["end_time"]

    rid = ct.redispatch(
        did, replace_electrons={"task_2": task_2_redefined}, reuse_previous_results=True
    )()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 6)
    first = result.get_node_result(0)
    assert first["start_time"] == first["end_time"]
    assert first["reason"] == f"reused from {did}" and first["attempts"] == 0
    replaced = result.get_node_result(3)
    assert replaced["node_name"] == "task_2" and replaced["reason"] is None  # it ran

    rid = ct.redispatch(
        did, replace_electrons={"task_2": task_2_redefined}, reuse_previous_results=True
    )(3, 4)
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 28)
    assert result.get_node_result(0)["start_time"] != result.get_node_result(0)["end_time"]


# ------------------------------------------------------------------ counting executions


@ct.electron
def step(d, name, x):
    _ran(d, name)
    return x + 1


@ct.electron
def combine(d, a, b):
    _ran(d, "combine")
    return a * b


@ct.lattice
def chain(d, x, y):
    a = step(d, "a", x)
    b = step(d, "b", y)
    return combine(d, step(d, "a2", a), b)


def test_without_reuse_everything_runs_again(tmp_path):
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    assert ct.get_result(did, wait=True, timeout=60).result == 9
    rid = ct.redispatch(did)()
    assert ct.get_result(rid, wait=True, timeout=60).result == 9
    assert [runs(d, n) for n in ("a", "b", "a2", "combine")] == [2, 2, 2, 2]


def test_with_reuse_and_the_same_inputs_nothing_runs_again(tmp_path):
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    ct.get_result(did, wait=True, timeout=60)
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 9)
    assert [runs(d, n) for n in ("a", "b", "a2", "combine")] == [1, 1, 1, 1]
    for n in result.get_all_node_results():
        if n["node_name"] in ("step", "combine"):
            assert n["reason"] == f"reused from {did}"
            assert n["start_time"] == n["end_time"]


def test_with_changed_inputs_only_the_nodes_whose_inputs_changed_run(tmp_path):
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    ct.get_result(did, wait=True, timeout=60)
    rid = ct.redispatch(did, reuse_previous_results=True)(d, 1, 5)  # y changed
    result = ct.get_result(rid, wait=True, timeout=60)
    assert result.result == 3 * 6
    assert [runs(d, n) for n in ("a", "b", "a2", "combine")] == [1, 2, 1, 2]


@ct.electron
def step_same(d, name, x):
    _ran(d, name + "-new")
    return x + 1  # the same output as step


@ct.electron
def step_other(d, name, x):
    _ran(d, name + "-other")
    return x + 10


def test_a_replaced_electron_runs_and_its_dependents_run_only_if_its_output_changed(tmp_path):
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    ct.get_result(did, wait=True, timeout=60)
    rid = ct.redispatch(did, {"step": step_same}, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert result.result == 9
    # every step node ran the new function; combine's inputs were unchanged: reused
    assert [runs(d, n) for n in ("a-new", "b-new", "a2-new", "combine")] == [1, 1, 1, 1]
    rid = ct.redispatch(did, {"step": step_other}, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert result.result == (1 + 10 + 10) * (2 + 10)
    assert runs(d, "combine") == 2


def test_an_unknown_electron_name_to_replace_is_a_clear_error(tmp_path):
    did = ct.dispatch(chain)(str(tmp_path), 1, 2)
    ct.get_result(did, wait=True, timeout=60)
    with pytest.raises(ct.ValentError, match="no electron named 'stpe'.*'step'"):
        ct.redispatch(did, {"stpe": step_same})()


# ------------------------------------------------------------------ resume


@ct.electron
def fast(d, i):
    _ran(d, f"fast{i}")
    return i


@ct.electron
def slow(d, i, flag):
    _ran(d, f"slow{i}")
    write_atomic(f"{d}/slow{i}.pid", str(os.getpid()))
    if not os.path.exists(flag):
        time.sleep(60)
    return 10 * i


@ct.electron
def total(d, xs):
    _ran(d, "total")
    return sum(xs)


@ct.lattice
def fan(d, n, flag):
    return total(d, [fast(d, i) for i in range(n)] + [slow(d, i, flag) for i in range(2)])


def test_resume_after_cancel_runs_only_what_did_not_complete(tmp_path):
    d = str(tmp_path)
    flag = str(tmp_path / "go")
    did = ct.dispatch(fan)(d, 6, flag)
    pids = [read_pid(tmp_path / f"slow{i}.pid", 60) for i in range(2)]
    assert wait_until(lambda: all(runs(d, f"fast{i}") for i in range(6)), 60)
    first = ct.get_result(did)
    assert wait_until(
        lambda: all(
            n["status"] == ct.Status.COMPLETED
            for n in ct.get_result(did).get_all_node_results() if n["node_name"] == "fast"
        ), 60,
    ), first
    ct.cancel(did)
    old = ct.get_result(did, wait=True, timeout=60)
    assert old.status == ct.Status.CANCELLED
    assert wait_gone(pids, 10) == []
    write_atomic(flag, "go")
    rid = ct.redispatch(did, reuse_previous_results=True)()
    new = ct.get_result(rid, wait=True, timeout=60)
    assert (new.status, new.result) == (ct.Status.COMPLETED, sum(range(6)) + 10)
    assert [runs(d, f"fast{i}") for i in range(6)] == [1] * 6  # completed: reused
    assert [runs(d, f"slow{i}") for i in range(2)] == [2, 2]  # cancelled: ran again
    assert runs(d, "total") == 1  # never ran before


@ct.electron
def pair(d, x):
    _ran(d, "pair")
    return x, x + 1


@ct.lattice
def gathered(d, x):
    a, b = pair(d, x)  # getitem nodes
    return total(d, [combine(d, a, b), step(d, "g", a)])  # a collection node, made after total


def test_every_reusable_node_is_taken_before_the_start_when_ids_are_not_in_order(tmp_path):
    """A list argument's collection node comes after the node that takes it (node ids are not
    a topological order): the plan made before the redispatch starts still takes every node
    (none is left to the dispatcher's check when its parents complete)."""
    from valent._engine.prepare import dumps_param
    from valent._engine.reuse import Reuse, blob_digest
    from valent._store import get_store
    from valent.graph import PARAMETER

    d = str(tmp_path)
    did = ct.dispatch(gathered)(d, 3)
    assert ct.get_result(did, wait=True, timeout=60).result == 12 + 4
    graph = gathered.build_graph(d, 3)
    nodes = graph.nodes
    assert any(p > n.id and nodes[p].kind != PARAMETER for n in nodes for p in n.parents)
    digests = {n.id: blob_digest(dumps_param(n.value)) for n in nodes if n.kind == PARAMETER}
    plan = Reuse(did, get_store().reuse_rows(did)).plan(graph, digests)
    assert sorted(plan) == [n.id for n in nodes if n.kind != PARAMETER]
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 16)
    assert [runs(d, n) for n in ("pair", "combine", "g", "total")] == [1, 1, 1, 1]


@ct.lattice
def maybe_waits(d, x, ordered):
    a = step(d, "wa", x)
    b = step(d, "wb", x)
    if ordered:
        ct.wait(b, [a])  # an ordering edge: b's inputs are the same, its parents are not
    return combine(d, a, b)


def test_a_reused_node_whose_parents_changed_is_stored_with_its_new_parents(tmp_path):
    """A node reused whose row differs from the old one but for its output (here: a new
    ordering edge) is written with the new parents, the output still copied in the store."""
    d = str(tmp_path)
    did = ct.dispatch(maybe_waits)(d, 2, False)
    old = ct.get_result(did, wait=True, timeout=60)
    a, b = [n for n in old.get_all_node_results() if n["node_name"] == "step"]  # by id
    rid = ct.redispatch(did, reuse_previous_results=True)(d, 2, True)
    new = ct.get_result(rid, wait=True, timeout=60)
    assert (new.status, new.result) == (ct.Status.COMPLETED, 9)
    assert [runs(d, n) for n in ("wa", "wb", "combine")] == [1, 1, 1]
    nb = new.get_node_result(b["node_id"])
    assert nb["reason"] == f"reused from {did}" and nb["output"] == 3
    assert nb["parents"] == b["parents"] + [a["node_id"]]
    assert new.get_node_result(a["node_id"])["parents"] == a["parents"]


@ct.electron
def flaky(d, flag):
    _ran(d, "flaky")
    if not os.path.exists(flag):
        raise RuntimeError("no flag yet")
    return 5


@ct.lattice
def fails_once(d, flag):
    a = step(d, "a", 1)
    return combine(d, a, flaky(d, flag))


def test_resume_after_a_failure(tmp_path):
    d = str(tmp_path)
    flag = str(tmp_path / "flag")
    did = ct.dispatch(fails_once)(d, flag)
    assert ct.get_result(did, wait=True, timeout=60).status == ct.Status.FAILED
    write_atomic(flag, "ok")
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 10)
    assert [runs(d, n) for n in ("a", "flaky", "combine")] == [1, 2, 1]


@ct.electron
@ct.lattice
def sub_fan(d, flag):
    return total(d, [fast(d, 0), fast(d, 1), slow(d, 0, flag)])


@ct.lattice
def nested_fan(d, flag):
    return step(d, "after", sub_fan(d, flag))


def test_resume_reuses_what_completed_inside_a_sublattice(tmp_path):
    d = str(tmp_path)
    flag = str(tmp_path / "go")
    did = ct.dispatch(nested_fan)(d, flag)
    pid = read_pid(tmp_path / "slow0.pid", 60)
    assert wait_until(lambda: runs(d, "fast0") and runs(d, "fast1"), 60)
    time.sleep(0.5)  # their completion reaches the store
    ct.cancel(did)
    assert ct.get_result(did, wait=True, timeout=60).status == ct.Status.CANCELLED
    assert wait_gone([pid], 10) == []
    write_atomic(flag, "go")
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 0 + 1 + 0 + 1)
    assert [runs(d, n) for n in ("fast0", "fast1", "slow0", "total", "after")] == [1, 1, 2, 1, 1]
    inner = result.get_node_result(0)["sublattice_result"]
    reasons = [n["reason"] for n in inner.get_all_node_results() if n["node_name"] == "fast"]
    old_inner = ct.get_result(did).get_node_result(0)["sub_dispatch_id"]
    assert reasons == [f"reused from {old_inner}"] * 2


# ------------------------------------------------------------------ other processes


OWNER = textwrap.dedent(
    """
    import os, sys, time
    import valent as ct

    d = sys.argv[1]

    def ran(name):
        with open(os.path.join(d, name + ".runs"), "a") as f:
            f.write("x\\n")

    @ct.electron
    def fast(i):
        ran(f"fast{i}")
        return i

    @ct.electron
    def slow(flag):
        ran("slow")
        with open(os.path.join(d, "slow.pid.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(d, "slow.pid.tmp"), os.path.join(d, "slow.pid"))
        while not os.path.exists(flag):
            time.sleep(0.05)
        return 100

    @ct.electron
    def total(xs):
        ran("total")
        return sum(xs)

    @ct.lattice
    def wf(flag):
        return total([fast(0), fast(1), slow(flag)])

    did = ct.dispatch(wf)(os.path.join(d, "go"))
    print(did, flush=True)
    print(ct.get_result(did, wait=True).status, flush=True)
    """
)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "core"), str(ROOT / "plugins")])
    return env


def test_resume_of_a_dispatch_whose_owner_was_killed(tmp_path):
    """The owner (a subprocess) is killed by pid while its slow task runs; the dispatch,
    read here, is FAILED (owner died), the task's process is gone, and a redispatch with
    reuse, in this process (where the workflow's module does not exist), runs only the
    unfinished part."""
    d = tmp_path
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen(
        [sys.executable, str(script), str(d)], stdout=subprocess.PIPE, text=True,
        env=_python_env(), cwd=tmp_path,
    )
    try:
        did = owner.stdout.readline().strip()
        slow_pid = read_pid(d / "slow.pid", 60)
        assert wait_until(lambda: runs(d, "fast0") and runs(d, "fast1"), 60)
        assert wait_until(
            lambda: sum(n["status"] == "COMPLETED" for n in ct.get_result(did)
                        .get_all_node_results() if n["node_name"] == "fast") == 2, 30,
        )
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(30)
        owner.stdout.close()
    assert wait_gone([slow_pid], 15) == [], "the task outlived its killed owner"
    old = ct.get_result(did)
    assert old.status == ct.Status.FAILED and "was killed" in old.error
    assert "valent redispatch" in old.error
    write_atomic(d / "go", "go")
    rid = ct.redispatch(did, reuse_previous_results=True)()
    new = ct.get_result(rid, wait=True, timeout=60)
    assert (new.status, new.result) == (ct.Status.COMPLETED, 101)
    assert [runs(d, n) for n in ("fast0", "fast1", "slow", "total")] == [1, 1, 2, 1]


def test_redispatch_from_the_cli_in_another_process(tmp_path):
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    assert ct.get_result(did, wait=True, timeout=60).result == 9
    repl = tmp_path / "replmod.py"
    repl.write_text(
        "import os\n"
        "def step10(d, name, x):\n"
        "    with open(os.path.join(d, name + '-cli.runs'), 'a') as f:\n"
        "        f.write('x\\n')\n"
        "    return x + 10\n"
    )
    env = _python_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "valent.cli", "redispatch", did[:8], "--reuse",
         "--replace", "step=replmod:step10"],
        capture_output=True, text=True, env=env, timeout=120, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    rid = out.stdout.split()[0]
    result = ct.get_result(rid)
    assert result.status == ct.Status.COMPLETED, (out.stdout, out.stderr, result.error)
    assert result.result == (1 + 10 + 10) * (2 + 10)
    assert result.redispatch_of == did
    assert [runs(d, n) for n in ("a-cli", "b-cli", "a2-cli", "combine")] == [1, 1, 1, 2]
    listed = subprocess.run(
        [sys.executable, "-m", "valent.cli", "list"], capture_output=True, text=True,
        env=env, timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith(rid[:8]))
    assert did[:8] in line  # which dispatch it came from


def test_redispatch_of_an_unknown_id_is_a_clear_error():
    with pytest.raises(ct.UnknownDispatchError):
        ct.redispatch("deadbeef-0000")


def test_a_lattice_is_loaded_from_the_store_only_after_its_trust_checks(tmp_path, results_dir):
    """In another process (here: with this process's copy of the lattice forgotten), the
    lattice comes from the store, which must be yours and writable by you only."""
    from valent import api

    did = ct.dispatch(chain)(str(tmp_path), 1, 2)
    ct.get_result(did, wait=True, timeout=60)
    api._lattices.clear()
    os.chmod(results_dir, 0o777)
    try:
        with pytest.raises(ct.StoreError, match="writable by other users"):
            ct.redispatch(did)()
    finally:
        os.chmod(results_dir, 0o700)
    rid = ct.redispatch(did, reuse_previous_results=True)()  # from the store's copy
    assert ct.get_result(rid, wait=True, timeout=60).result == 9


# ------------------------------------------------------------------ the graph kept in memory

TRACED: list[int] = []  # one entry per run of fanned's body
FAN = 3


@ct.electron
def inc(d, i):
    _ran(d, f"inc{i}")
    return i + 1


@ct.electron
def inc_again(d, i):
    _ran(d, f"again{i}")
    return i + 1


@ct.lattice
def fanned(d, xs):
    TRACED.append(1)
    return total(d, [inc(d, x) for x in xs[:FAN]])


@pytest.fixture
def keep_small_graphs(monkeypatch):
    """Keep every graph (the threshold is for big ones: here the graphs are small)."""
    from valent._engine import prepare

    monkeypatch.setattr(prepare, "KEEP_GRAPH_NODES", 1)
    TRACED.clear()


def test_a_redispatch_with_nothing_changed_runs_the_graph_this_process_kept(
    tmp_path, keep_small_graphs
):
    """No new inputs, no replacement, the lattice unchanged: the graph traced at dispatch is
    run again (as Covalent resubmits its stored graph): the lattice's body does not run."""
    d = str(tmp_path)
    did = ct.dispatch(fanned)(d, [1, 2, 3, 4])
    assert ct.get_result(did, wait=True, timeout=60).result == 9
    assert len(TRACED) == 1
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 9)
    assert len(TRACED) == 1  # not traced again
    assert [runs(d, f"inc{i}") for i in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert {n["reason"] for n in result.get_all_node_results()
            if n["node_name"] in ("inc", "total")} == {f"reused from {did}"}
    rid = ct.redispatch(rid)()  # no reuse (a trigger's): traced again, every task runs
    assert ct.get_result(rid, wait=True, timeout=60).result == 9
    assert len(TRACED) == 2
    assert [runs(d, f"inc{i}") for i in (1, 2, 3, 4)] == [2, 2, 2, 0]


def test_new_inputs_a_replacement_or_a_changed_global_trace_the_lattice_again(
    tmp_path, keep_small_graphs, monkeypatch
):
    d = str(tmp_path)
    did = ct.dispatch(fanned)(d, [1, 2, 3, 4])
    assert ct.get_result(did, wait=True, timeout=60).result == 9
    monkeypatch.setattr(sys.modules[__name__], "FAN", 4)  # the body reads it: a new graph
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 2 + 3 + 4 + 5)
    assert len(TRACED) == 2
    assert [runs(d, f"inc{i}") for i in (1, 2, 3, 4)] == [1, 1, 1, 1]  # inc4 is new
    monkeypatch.setattr(sys.modules[__name__], "FAN", 3)
    rid = ct.redispatch(did, reuse_previous_results=True)(d, [1, 2, 5])
    assert ct.get_result(rid, wait=True, timeout=60).result == 2 + 3 + 6
    assert len(TRACED) == 3
    rid = ct.redispatch(did, {"inc": inc_again}, reuse_previous_results=True)()
    assert ct.get_result(rid, wait=True, timeout=60).result == 9
    assert len(TRACED) == 4
    assert [runs(d, f"again{i}") for i in (1, 2, 3)] == [1, 1, 1]


def test_an_input_changed_in_place_since_the_dispatch_is_not_what_the_redispatch_runs(
    tmp_path, keep_small_graphs
):
    """The kept graph holds the objects given to the dispatch; one changed since (a list
    appended to) makes the redispatch trace the stored inputs again, as from another
    process."""
    d = str(tmp_path)
    xs = [1, 2, 3]
    did = ct.dispatch(fanned)(d, xs)
    assert ct.get_result(did, wait=True, timeout=60).result == 9
    xs[0] = 100
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 9)
    assert len(TRACED) == 2
    assert result.inputs == {"args": [d, [1, 2, 3]], "kwargs": {}}
    assert [runs(d, f"inc{i}") for i in (1, 2, 3, 100)] == [1, 1, 1, 0]


def test_only_big_graphs_are_kept_and_only_the_last_two(tmp_path, monkeypatch):
    """Memory: a small graph is traced again (cheap), and only the last GRAPHS_KEPT big
    graphs (with small inputs) stay in memory, whatever the number of redispatches."""
    from valent._engine import prepare

    d = str(tmp_path)
    small = ct.dispatch(fanned)(d, [1, 2, 3])
    ct.get_result(small, wait=True, timeout=60)
    assert prepare.kept_graph(small) is None
    monkeypatch.setattr(prepare, "KEEP_GRAPH_NODES", 1)
    ids = [ct.dispatch(fanned)(d, [i, i + 1, i + 2]) for i in range(3)]
    for did in ids:
        ct.get_result(did, wait=True, timeout=60)
    assert [prepare.kept_graph(i) is not None for i in ids] == [False, True, True]
    again = [ct.redispatch(ids[2], reuse_previous_results=True)() for _ in range(3)]
    for did in again:
        ct.get_result(did, wait=True, timeout=60)
    assert {id(prepare.kept_graph(i)) for i in again} == {id(prepare.kept_graph(ids[2]))}
    assert prepare.kept_graph(ids[1]) is not None  # the same graph kept 4 times counts once
    n = len(prepare.kept_graph(ids[2]).nodes)
    monkeypatch.setattr(prepare, "NODES_KEPT", 2 * n - 1)  # room for one graph of n nodes
    more = ct.dispatch(fanned)(d, [7, 8, 9])
    ct.get_result(more, wait=True, timeout=60)
    assert prepare.kept_graph(more) is not None and prepare.kept_graph(ids[2]) is None
    monkeypatch.setattr(prepare, "KEEP_GRAPH_BYTES", 10)
    big_input = ct.dispatch(fanned)(d, list(range(100)))
    ct.get_result(big_input, wait=True, timeout=60)
    assert prepare.kept_graph(big_input) is None


def test_an_electron_reloaded_in_its_module_is_what_the_redispatch_runs(
    tmp_path, keep_small_graphs
):
    """A notebook's fix: the module of the tasks is edited and reloaded, then the dispatch is
    redispatched with reuse: the new task runs (the kept graph held the old one)."""
    import importlib

    src = tmp_path / "kept_tasks.py"
    src.write_text("import valent as ct\n\n@ct.electron\ndef work(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        tasks = importlib.import_module("kept_tasks")

        @ct.lattice
        def uses_module(xs):
            return [tasks.work(x) for x in xs]

        did = ct.dispatch(uses_module)([1, 2])
        assert ct.get_result(did, wait=True, timeout=60).result == [2, 3]
        src.write_text("import valent as ct\n\n@ct.electron\ndef work(x):\n    return x + 100\n")
        importlib.reload(tasks)
        rid = ct.redispatch(did, reuse_previous_results=True)()
        result = ct.get_result(rid, wait=True, timeout=60)
        assert (result.status, result.result) == (ct.Status.COMPLETED, [101, 102])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kept_tasks", None)


def test_a_lattice_reading_another_module_is_traced_again(tmp_path, keep_small_graphs):
    """What the lattice reads in another module of yours (pickled by name, so a change does
    not show in the lattice's pickle) may have changed: the redispatch traces it again."""
    import importlib

    (tmp_path / "kept_settings.py").write_text("N = 2\n\ndef n():\n    return N\n")
    sys.path.insert(0, str(tmp_path))
    try:
        settings = importlib.import_module("kept_settings")
        n = settings.n

        @ct.lattice
        def sized(d):
            return total(d, [inc(d, i) for i in range(settings.N)])

        @ct.lattice
        def sized_by_a_function(d):
            return total(d, [inc(d, i) for i in range(n())])

        d = str(tmp_path)
        for lattice, size in ((sized, 3), (sized_by_a_function, 4)):
            settings.N = size - 1
            did = ct.dispatch(lattice)(d)
            assert ct.get_result(did, wait=True, timeout=60).result == sum(range(1, size))
            settings.N = size
            rid = ct.redispatch(did, reuse_previous_results=True)()
            assert ct.get_result(rid, wait=True, timeout=60).result == sum(range(1, size + 1))
        assert [runs(d, f"inc{i}") for i in range(4)] == [2, 2, 2, 1]  # 2 dispatches, reuse
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kept_settings", None)


_PINNED_SRC = '''
import json
LIMIT = 3
NAMES = ("a", None, 2.5, b"x", True, 4j, [1, {"k": None}], frozenset({"s"}))
def task(a, b=2, *, c=1.5, d="s", e=b"x", f=None, g=3j, h=(1, "t", None)):
    out = {"n": None}
    for i in range(min(a, LIMIT)):
        out[str(i)] = json.dumps([i, NAMES[0]])
    return [x for x in out if x] + [lambda y: y + 1]
'''


def test_a_function_digests_as_it_did_when_earlier_versions_stored_it():
    """The digest stored with each completed node is compared with the one a redispatch
    computes now: a change in how it is computed (even a faster walk) must not change it,
    or nothing an earlier version stored would be reused. Pinned from valent 0539306."""
    from valent._engine.reuse import fn_digest

    ns = {"__name__": "__main__"}  # a function of yours: code, defaults, globals all count
    exec(compile(_PINNED_SRC, "<pinned>", "exec", dont_inherit=True), ns)  # no __future__
    assert fn_digest(ns["task"]) == "0307d88e455ae7c6b235b81ceae42000"
    ns["LIMIT"] = 4  # a global it reads changed: another digest
    assert fn_digest(ns["task"]) != "0307d88e455ae7c6b235b81ceae42000"


# ------------------------------------------------------------------ everything reused at once


def _no_run_created(monkeypatch):
    """Fail the test if a DispatchRun is made (the dispatch must be written whole)."""
    from valent._engine import prepare

    def made(*a, **k):
        raise AssertionError("create_run was called: the redispatch was not taken whole")

    monkeypatch.setattr(prepare, "create_run", made)


def test_a_redispatch_that_reuses_every_output_is_written_completed_at_once(
    tmp_path, keep_small_graphs, monkeypatch
):
    """The kept graph, every node of the source COMPLETED with an output: the new dispatch
    is written COMPLETED in one transaction (no run, no executor), each node reused (start ==
    end, ``reused from``), its parameters COMPLETED without a reason, the same result; and
    it is kept in turn, so a redispatch of it is taken whole too."""
    d = str(tmp_path)
    did = ct.dispatch(fanned)(d, [1, 2, 3, 4])
    before = ct.get_result(did, wait=True, timeout=60)
    assert before.result == 9
    _no_run_created(monkeypatch)
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result, result.redispatch_of) == (
        ct.Status.COMPLETED, 9, did)
    assert result.root_dispatch_id == rid and result.error is None
    assert result.start_time == result.end_time and result.inputs == before.inputs
    assert [runs(d, f"inc{i}") for i in (1, 2, 3)] == [1, 1, 1]
    nodes = result.get_all_node_results()
    assert len(nodes) == before.node_count
    for old, new in zip(before.get_all_node_results(), nodes, strict=True):
        assert (new["node_name"], new["status"], new["output"], new["parents"]) == (
            old["node_name"], ct.Status.COMPLETED, old["output"], old["parents"])
        assert new["start_time"] == new["end_time"] == result.end_time
        assert new["executor"] == old["executor"] and new["attempts"] == 0
        param = new["node_name"].startswith(":parameter:")
        assert new["reason"] == (None if param else f"reused from {did}")
    again = ct.redispatch(rid, reuse_previous_results=True)()
    assert ct.get_result(again, wait=True, timeout=60).result == 9
    assert ct.get_result(again).redispatch_of == rid
    assert [runs(d, f"inc{i}") for i in (1, 2, 3)] == [1, 1, 1]


def test_a_source_that_lost_one_output_is_not_taken_whole(
    tmp_path, keep_small_graphs, results_dir
):
    """One output gone from the store (a damaged row, written here with SQL on the real
    file): the checks inside the write fail, nothing is written whole, and the redispatch
    decides node by node: that node runs again, the others are reused."""
    import sqlite3

    d = str(tmp_path)
    did = ct.dispatch(fanned)(d, [1, 2, 3])
    res = ct.get_result(did, wait=True, timeout=60)
    lost = next(n["node_id"] for n in res.get_all_node_results() if n["output"] == 3)
    with sqlite3.connect(results_dir / "valent.db") as db:
        db.execute("UPDATE nodes SET output = NULL WHERE dispatch_id = ? AND node_id = ?",
                   (did, lost))
    rid = ct.redispatch(did, reuse_previous_results=True)()
    result = ct.get_result(rid, wait=True, timeout=60)
    assert (result.status, result.result) == (ct.Status.COMPLETED, 9)
    assert [runs(d, f"inc{i}") for i in (1, 2, 3)] == [1, 2, 1]
    assert result.get_node_result(lost)["reason"] is None  # it ran
    assert ct.get_result(did).status == ct.Status.COMPLETED  # the source is as it was


def test_a_whole_copy_is_refused_and_writes_nothing_when_a_check_fails(
    tmp_path, keep_small_graphs
):
    """The store's checks themselves: a function digest, an executor or a parameter digest
    that differs from the source's makes ``copy_completed_dispatch`` write nothing."""
    from valent._store import get_store

    d = str(tmp_path)
    did = ct.dispatch(fanned)(d, [1, 2, 3])
    src = ct.get_result(did, wait=True, timeout=60)
    store = get_store()
    rows = {r["node_id"]: r for r in store.node_rows(did)}
    groups: dict[tuple, list[int]] = {}
    params = []
    for nid, r in rows.items():
        if r["kind"] == "parameter":
            params.append((nid, r["out_digest"]))
        else:
            key = (r["name"], r["kind"], r["executor"],
                   r["fn_digest"] if r["kind"] == "electron" else None)
            groups.setdefault(key, []).append(nid)
    # electron groups first: ``changed`` alters the first group's digest and executor
    good = sorted(([[[i, i] for i in ids], *key] for key, ids in groups.items()),
                  key=lambda g: g[2] != "electron")

    def row(new_id):
        t = 1.0
        return {"dispatch_id": new_id, "lattice_name": "fanned", "status": "COMPLETED",
                "created_at": t, "start_time": t, "end_time": t, "node_count": len(rows),
                "result": store.dispatch_row(did)["result"]}

    def changed(at, value):
        first = list(good[0])
        first[at] = value
        return [first, *good[1:]]

    assert not store.copy_completed_dispatch(row("x1"), did, changed(4, "0" * 32), params)
    assert not store.copy_completed_dispatch(row("x2"), did, changed(3, "dask"), params)
    assert not store.copy_completed_dispatch(
        row("x3"), did, good, [(params[0][0], "0" * 32), *params[1:]])
    assert not store.copy_completed_dispatch(row("x4"), did, good[1:], params)  # one missing
    for x in ("x1", "x2", "x3", "x4"):
        assert store.dispatch_status(x) is None and not store.node_rows(x)
    assert store.copy_completed_dispatch(row("x5"), did, good, params)
    assert len(store.node_rows("x5")) == src.node_count


def test_a_big_final_result_reads_its_nodes_when_first_asked(tmp_path, monkeypatch):
    """``get_result`` of a final dispatch of LAZY_NODES nodes or more reads only its row;
    the nodes come from the same store file on first use, or a clear error if that file was
    replaced since."""
    import shutil

    from valent import api
    from valent._store import StoreLostError, get_store

    monkeypatch.setattr(api, "LAZY_NODES", 1)
    d = str(tmp_path)
    did = ct.dispatch(chain)(d, 1, 2)
    result = ct.get_result(did, wait=True, timeout=60)
    assert result._node_rows is None and result.node_count == 13  # 4 tasks, 9 parameters
    assert (result.status, result.result) == (ct.Status.COMPLETED, 9)
    assert [n["node_name"] for n in result.get_all_node_results()].count("step") == 3
    assert result._node_rows is not None and len(result._node_rows) == 13
    later = ct.get_result(did)
    db = get_store().path
    shutil.copy(db, db.with_name("copy.db"))
    os.replace(db.with_name("copy.db"), db)  # another file now, with the same content
    with pytest.raises(StoreLostError):
        later.get_node_result(0)
