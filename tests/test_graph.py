"""Graph building: node naming, tracing edge cases, decorators, plain calls."""

from __future__ import annotations

import time
from collections import namedtuple

import pytest
import valent as ct
from valent.graph import Lattice

Point = namedtuple("Point", "x y")
FACTOR = 0.01  # seconds per unit of the seed's sleeps: the graph, not the timing, is tested


@ct.electron
def task_1(x):
    time.sleep(x * FACTOR)
    return x


@ct.electron
def task_2(a, b):
    return a + b


@ct.electron
def task_3(a):
    return a**2


@ct.lattice
def seed(x):
    res_2 = task_2(task_1(10), x)
    for _ in range(10):
        task_1(10)
    task_3(res_2)


SEED_NAMES = ["task_1(0)", ":parameter:10(1)", "task_2(2)", ":parameter:5(3)"] + [
    name for i in range(4, 24, 2) for name in (f"task_1({i})", f":parameter:10({i + 1})")
] + ["task_3(24)"]


@ct.electron
def make_dict(a, b):
    return {"a": a, "b": b, "both": [a, b]}


@ct.electron
def make_point(x, y):
    return Point(x, y)


@ct.electron
def add(a, b):
    return a + b


@ct.electron
def total(values):
    assert isinstance(values, list), type(values)
    return sum(values)


@ct.electron
def describe(mapping, pair=None):
    assert isinstance(mapping, dict) and isinstance(pair, tuple), (mapping, pair)
    return {"keys": sorted(mapping), "x": mapping["x"], "pair": pair}


@ct.lattice
def structured(n):
    d = make_dict(n, n + 1)
    p = make_point(d["a"], d["both"][1])
    s = total([p.x, p.y, 100])
    info = describe({"x": s, "nested": [d["b"], {"deep": p.y}]}, pair=(p.x, 7))
    return {"sum": s, "parts": [p.x, p.y], "info": info, "const": "c"}


def test_seed_nodes_are_named_and_numbered_like_covalent():
    graph = seed.build_graph(5)
    assert [n.label for n in graph.nodes] == SEED_NAMES
    result = ct.dispatch_sync(seed)(5)
    assert result.status == ct.Status.COMPLETED
    outputs = result.get_all_node_outputs()
    assert list(outputs) == SEED_NAMES
    assert outputs["task_1(0)"] == 10 and outputs[":parameter:10(1)"] == 10
    assert outputs["task_2(2)"] == 15 and outputs[":parameter:5(3)"] == 5
    assert outputs["task_3(24)"] == 225
    assert result.result is None  # the seed returns nothing


def test_indexing_attributes_and_collections_of_placeholders():
    result = ct.dispatch_sync(structured)(3)
    assert result.status == "COMPLETED", result.error
    # d = {a: 3, b: 4, both: [3, 4]}; p = (3, 4); s = 3 + 4 + 100
    assert result.result == {
        "sum": 107,
        "parts": [3, 4],
        "info": {"keys": ["nested", "x"], "x": 107, "pair": (3, 7)},
        "const": "c",
    }
    names = [r["node_name"] for r in result.get_all_node_results()]
    # named as Covalent names them, the key as a parameter node right after
    i = names.index(":make_dict.__getitem__")
    assert names[i + 1] == ":parameter:a"
    j = names.index(":make_point.__getattr__")
    assert names[j + 1] == ":parameter:x"
    outputs = result.get_all_node_outputs()
    assert all(not isinstance(v, ct.Result) for v in outputs.values())


def test_return_structure_of_a_single_placeholder_and_of_tuples():
    @ct.lattice
    def one(n):
        return add(n, 1)

    @ct.lattice
    def pair(n):
        a = add(n, 1)
        return (a, add(a, 1))

    assert ct.dispatch_sync(one)(1).result == 2
    assert ct.dispatch_sync(pair)(1).result == (2, 3)


@pytest.mark.parametrize(
    "misuse, words",
    [
        (lambda p: int(p), "convert to int"),
        (lambda p: bool(p), "truth value"),
        (lambda p: iter(p), "iterate"),
        (lambda p: [x for x in p], "iterate"),
        (lambda p: len(p), "len()"),
        (lambda p: p < 1, "compare"),
        (lambda p: p == 1, "compare"),
        (lambda p: 1 >= p, "compare"),
        (lambda p: p.keys(), "cannot call"),
        (lambda p: dict(**p), "cannot call"),
    ],
    ids=["int", "bool", "iter", "for", "len", "lt", "eq", "reflected-ge", "method-call",
         "double-star"],
)
def test_what_cannot_work_while_tracing_raises_tracing_error(misuse, words):
    @ct.lattice
    def bad(n):
        return misuse(add(n, 1))

    with pytest.raises(ct.TracingError) as info:
        ct.dispatch(bad)(1)
    msg = str(info.value)
    assert words in msg
    assert "<output of add(" in msg  # names the node
    assert "inside an electron" in msg  # and says what to do instead
    assert isinstance(info.value, ct.ValentError)


def test_if_on_a_placeholder_raises_tracing_error():
    @ct.lattice
    def branchy(n):
        if add(n, 1):
            return 1
        return 0

    with pytest.raises(ct.TracingError, match="truth value"):
        ct.dispatch(branchy)(1)


def test_electron_outside_a_lattice_is_a_plain_call():
    assert add(2, 3) == 5
    assert make_point(1, 2) == Point(1, 2)
    assert task_1.__name__ == "task_1"


def test_lattice_called_directly_runs_plainly():
    out = structured(3)
    assert out == {
        "sum": 107,
        "parts": [3, 4],
        "info": {"keys": ["nested", "x"], "x": 107, "pair": (3, 7)},
        "const": "c",
    }


def _double(x):
    return 2 * x


def test_bare_and_parametrized_decorators():
    bare = ct.electron(_double)
    called = ct.electron()(_double)
    with_args = ct.electron(timeout=30, retries=1)(_double)
    assert with_args.timeout == 30 and with_args.retries == 1
    assert bare(2) == called(2) == with_args(2) == 4

    def flow(n):
        return [bare(n), called(n), with_args(n)]

    for lat in (ct.lattice(flow), ct.lattice()(flow), ct.lattice(executor="local")(flow)):
        assert isinstance(lat, Lattice)
        assert ct.dispatch_sync(lat)(5).result == [10, 10, 10]


def test_bad_decorator_arguments_are_refused():
    with pytest.raises(ct.ValentError, match="timeout"):
        ct.electron(timeout=-1)(_double)
    with pytest.raises(ct.ValentError, match="retries"):
        ct.electron(retries=-2)(_double)
    with pytest.raises(ct.ValentError, match="executor must be"):
        ct.electron(executor=42)(_double)


def test_a_placeholder_from_another_lattice_is_refused():
    stash = []

    @ct.lattice
    def first(n):
        stash.append(add(n, 1))

    @ct.lattice
    def second(n):
        return add(stash[0], n)

    first.build_graph(1)
    with pytest.raises(ct.TracingError, match="another lattice"):
        second.build_graph(1)


def test_parameter_nodes_have_short_names_but_full_values():
    long = "x" * 200

    @ct.lattice
    def echo(s):
        return add(s, "!")

    result = ct.dispatch_sync(echo)(long)
    assert result.result == long + "!"
    names = list(result.get_all_node_outputs())
    assert names[1].startswith(":parameter:xxx") and names[1].endswith("...(1)")
    assert len(names[1]) < 80
    assert result.get_node_result(1)["output"] == long
