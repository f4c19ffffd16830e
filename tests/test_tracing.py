"""Tracing like Covalent: unpacking, operators, ``ct.wait``; and what stays refused.

Every workflow here is dispatched for real (Local executor); values, node names and the
order of wait edges (start/end times each task writes to a file) are checked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import valent as ct


@ct.electron
def pair(x):
    return x, x + 1


@ct.electron
def nested(x):
    return (x, x * 10), x * 100


@ct.electron
def add(a, b):
    return a + b


@ct.electron
def ident(x):
    return x


def names(result):
    return [f"{r['node_name']}({r['node_id']})" for r in result.get_all_node_results()]


# ---------------------------------------------------------------------- unpacking


def test_unpacking_adds_getitem_nodes_named_as_covalent():
    @ct.lattice
    def flow(n):
        a, b = pair(n)
        return add(a, b)

    result = ct.dispatch_sync(flow)(3)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 7
    # the indices are parameter nodes, numbered as Covalent numbers them
    assert names(result) == [
        "pair(0)", ":parameter:3(1)", ":pair()[0](2)", ":parameter:0(3)", ":pair()[1](4)",
        ":parameter:1(5)", "add(6)",
    ]
    outputs = result.get_all_node_outputs()
    assert outputs[":pair()[0](2)"] == 3 and outputs[":pair()[1](4)"] == 4


def test_nested_unpacking_and_unpacking_into_a_loop_body():
    @ct.lattice
    def flow(n):
        (a, b), c = nested(n)
        out = []
        for i in range(2):
            x, y = pair(add(a, i))
            out.append(add(x, y))
        return [a, b, c, out]

    result = ct.dispatch_sync(flow)(2)
    assert result.status == ct.Status.COMPLETED, result.error
    # a=2 b=20 c=200; pair(2) -> 2+3, pair(3) -> 3+4
    assert result.result == [2, 20, 200, [5, 7]]
    assert ":nested()[0](2)" in names(result)
    assert any(n.startswith("::nested()[0]()[1]") for n in names(result))


@pytest.mark.parametrize(
    "misuse",
    [
        lambda p: [x for x in p],
        lambda p: list(p),
        lambda p: tuple(p),
        lambda p: (lambda a, *rest: a)(*p),
        lambda p: next(iter(p)),
    ],
    ids=["for", "list", "tuple", "star-call", "iter"],
)
def test_iteration_of_unknown_length_is_a_tracing_error(misuse):
    @ct.lattice
    def flow(n):
        return misuse(pair(n))

    with pytest.raises(ct.TracingError, match="cannot iterate over <output of pair") as info:
        flow.build_graph(1)
    assert "a, b = out" in str(info.value) and "inside an electron" in str(info.value)


def test_starred_unpacking_is_a_tracing_error():
    @ct.lattice
    def flow(n):
        a, *rest = pair(n)
        return a

    with pytest.raises(ct.TracingError, match="length is not known"):
        flow.build_graph(1)


# ---------------------------------------------------------------------- operators


def test_arithmetic_adds_operator_electrons_named_as_covalent():
    @ct.lattice
    def flow(x, y):
        a = ident(x)
        b = ident(y)
        return [a + b, a - 1, a * b, a / 4, a ** 2]

    result = ct.dispatch_sync(flow)(6, 3)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [9, 5, 18, 1.5, 36]
    got = [n for n in names(result) if "_" in n and not n.startswith(":")]
    assert got == [
        "ident_+_ident(4)", "ident_-_1(5)", "ident_*_ident(7)", "ident_/_4(8)", "ident_**_2(10)"
    ]
    # an operator node is an electron: it ran on an executor, with a start and an end
    op = result.get_node_result(4)
    assert op["executor"] == "local" and op["start_time"] and op["end_time"]
    assert op["parents"] == [0, 2]


def test_reflected_and_other_operators_keep_the_operand_order():
    @ct.lattice
    def flow(x):
        a = ident(x)
        return [10 - a, 2 ** a, 12 / a, 7 // a, 7 % a, a // 2, a % 4, -a, 3 * a, 1 + a, -(a - 9)]

    result = ct.dispatch_sync(flow)(3)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [7, 8, 4.0, 2, 1, 1, 3, -3, 9, 4, 6]
    listed = names(result)
    for name in ("10_-_ident", "2_**_ident", "12_/_ident", "7_//_ident", "7_%_ident",
                 "ident_//_2", "ident_%_4", "-_ident", "3_*_ident", "1_+_ident",
                 "-_ident_-_9"):
        assert any(n.rsplit("(", 1)[0] == name for n in listed), (name, listed)


def test_operators_on_non_numbers_and_on_unpacked_outputs():
    @ct.electron
    def words():
        return "ab", ["x"]

    @ct.lattice
    def flow():
        s, lst = words()
        return [s + "!", lst * 2, "<" + s]

    result = ct.dispatch_sync(flow)()
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == ["ab!", ["x", "x"], "<ab"]
    assert ":words()[0]_+_!(5)" in names(result)


def test_an_operator_on_a_failed_output_is_cancelled_upstream():
    @ct.electron
    def boom(x):
        raise ValueError("no")

    @ct.lattice
    def flow(x):
        return boom(x) + 1

    result = ct.dispatch_sync(flow)(1)
    assert result.status == ct.Status.FAILED
    node = result.get_node_result(2)
    assert node["node_name"] == "boom_+_1"
    assert node["status"] == ct.Status.CANCELLED and node["reason"] == "upstream"


@pytest.mark.parametrize(
    "misuse, words",
    [
        (lambda p: p > 3, "compare"),
        (lambda p: p == 3, "compare"),
        (lambda p: p != 3, "compare"),
        (lambda p: 3 < p, "compare"),
        (lambda p: 1 if p else 0, "truth value"),
        (lambda p: not p, "truth value"),
        (lambda p: p and 1, "truth value"),
        (lambda p: max(p, 1), "compare"),
    ],
    ids=["gt", "eq", "ne", "reflected-lt", "if", "not", "and", "max"],
)
def test_comparisons_and_truth_values_stay_refused(misuse, words):
    @ct.lattice
    def flow(n):
        return misuse(ident(n))

    with pytest.raises(ct.TracingError) as info:
        flow.build_graph(1)
    msg = str(info.value)
    assert words in msg and "<output of ident(0)>" in msg and "inside an electron" in msg


# ---------------------------------------------------------------------- ct.wait


def _stamp(folder: str, name: str, sleep: float = 0.0):
    """Write this task's start and end times to FOLDER/NAME.json."""
    start = time.time()
    time.sleep(sleep)
    Path(folder, f"{name}.json").write_text(json.dumps([start, time.time()]))


def _times(folder: Path, name: str) -> tuple[float, float]:
    start, end = json.loads((folder / f"{name}.json").read_text())
    return start, end


def _waiting_flow(folder: str):
    @ct.electron
    def task_1(a):
        _stamp(folder, "task_1", 1.0)
        return a ** 2

    @ct.electron
    def task_2(x, y):
        return x * y

    @ct.electron
    def task_3(b):
        _stamp(folder, "task_3")
        return b ** 3

    @ct.lattice
    def workflow():
        res_1 = task_1(2)
        res_2 = task_2(res_1, 3)
        res_3 = task_3(5)
        ct.wait(res_3, res_1)
        return task_2(res_2, res_3)

    return workflow


def test_wait_orders_a_task_after_another_without_data(tmp_path):
    result = ct.dispatch_sync(_waiting_flow(str(tmp_path)))()
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 1500
    # the node list is Covalent's: the wait edge adds no node
    assert result.get_all_node_outputs() == {
        "task_1(0)": 4, ":parameter:2(1)": 2, "task_2(2)": 12, ":parameter:3(3)": 3,
        "task_3(4)": 125, ":parameter:5(5)": 5, "task_2(6)": 1500,
    }
    _, end_1 = _times(tmp_path, "task_1")
    start_3, _ = _times(tmp_path, "task_3")
    assert start_3 >= end_1, "task_3 started before task_1 (which it waits for) ended"
    assert result.get_node_result(4)["parents"] == [5, 0]


def test_wait_graph_records_the_edge_without_data(tmp_path):
    graph = _waiting_flow(str(tmp_path)).build_graph()
    task_3 = graph.nodes[4]
    assert task_3.waits == (0,) and 0 in task_3.parents
    assert all(getattr(a, "node_id", None) != 0 for a in task_3.args)  # no data from task_1


def test_wait_for_a_list_of_parents_and_the_wait_for_method(tmp_path):
    folder = str(tmp_path)

    @ct.electron
    def slow(a, name):
        _stamp(folder, name, 0.5)
        return a

    @ct.electron
    def after(b):
        _stamp(folder, "after")
        return b ** 3

    @ct.electron
    def last(b):
        _stamp(folder, "last")
        return b

    @ct.lattice
    def workflow():
        res = [slow(2, "1a"), slow(3, "1b"), slow(4, "1c")]
        res_3 = after(5)
        back = ct.wait(res_3, res)
        tail = last(1).wait_for(res_3)
        return [back, tail]

    result = ct.dispatch_sync(workflow)()
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [125, 1]
    start_after, end_after = _times(tmp_path, "after")
    for name in ("1a", "1b", "1c"):
        assert start_after >= _times(tmp_path, name)[1], name
    assert _times(tmp_path, "last")[0] >= end_after


def test_a_failed_parent_cancels_the_waiting_child_upstream(tmp_path):
    @ct.electron
    def boom():
        raise RuntimeError("parent failed")

    @ct.electron
    def child(folder):
        Path(folder, "child-ran").write_text("yes")
        return 1

    @ct.lattice
    def workflow(folder):
        c = child(folder)
        ct.wait(c, boom())
        return c

    result = ct.dispatch_sync(workflow)(str(tmp_path))
    assert result.status == ct.Status.FAILED
    node = result.get_node_result(0)
    assert node["node_name"] == "child" and node["status"] == ct.Status.CANCELLED
    assert node["reason"] == "upstream"
    assert not (tmp_path / "child-ran").exists()


def test_a_cancelled_parent_cancels_the_waiting_child(tmp_path):
    @ct.electron
    def slow(folder):
        Path(folder, "slow-started").write_text("1")
        time.sleep(30)

    @ct.electron
    def child(folder):
        Path(folder, "child-ran").write_text("yes")

    @ct.lattice
    def workflow(folder):
        s = slow(folder)
        c = child(folder)
        ct.wait(c, s)
        return c

    did = ct.dispatch(workflow)(str(tmp_path))
    _wait_file(tmp_path / "slow-started")
    ct.cancel(did, task_ids=[0])
    result = ct.get_result(did, wait=True, timeout=60)
    assert result.status == ct.Status.CANCELLED
    assert result.get_node_result(0)["cancel_outcome"] == "killed"
    assert result.get_node_result(2)["status"] == ct.Status.CANCELLED
    assert not (tmp_path / "child-ran").exists()


def _wait_file(path: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return True


def test_wait_refuses_cycles_and_non_outputs():
    @ct.lattice
    def cycle(n):
        a = ident(n)
        b = ident(a)
        ct.wait(a, b)
        return b

    with pytest.raises(ct.TracingError, match="cycle"):
        cycle.build_graph(1)

    @ct.lattice
    def itself(n):
        a = ident(n)
        return ct.wait(a, a)

    with pytest.raises(ct.TracingError, match="cycle"):
        itself.build_graph(1)

    @ct.lattice
    def not_output(n):
        a = ident(n)
        return ct.wait(a, [n])

    with pytest.raises(ct.TracingError, match="only for electrons' outputs"):
        not_output.build_graph(1)

    @ct.lattice
    def child_not_output(n):
        return ct.wait(n, ident(n))

    with pytest.raises(ct.TracingError, match="child must be"):
        child_not_output.build_graph(1)


def test_wait_outside_a_lattice_returns_the_child():
    assert ct.wait(5, [1, 2]) == 5
    # and Covalent's first example (electrons called plainly inside the lattice function)
    assert ident(3) == 3
