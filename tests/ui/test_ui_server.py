"""`valent ui` over plain HTTP (no browser): token, CSRF, read-only store, change cursor,
and the drawings behind ``lattice.draw()`` / ``result.draw()``."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest
import valent as ct
from ui_support import start_ui, stop_ui

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(90)


@ct.electron
def wait_file(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.02)
    return path


@ct.electron
def echo(x):
    return x


@ct.lattice
def gated(path: str):
    return echo(wait_file(path))


def _csrf(ui) -> str:
    code, page = ui.request("/")
    assert code == 200
    text = page.decode()
    return text.split("name='csrf' content='", 1)[1].split("'", 1)[0]


def test_every_request_needs_the_token(ui):
    for path in ("/", "/api/dispatches", "/static/app.js", "/d/abcd", "/drawings"):
        code, body = ui.request(path, token=None)
        assert code == 403, path
        assert b"token" in body
        assert ui.request(path, token="wrong" + ui.token)[0] == 403
    # the printed URL sets an HttpOnly, SameSite=Strict cookie and drops the token from the URL
    conn = http.client.HTTPConnection(ui.base.split("//")[1], timeout=10)
    conn.request("GET", f"/?token={ui.token}")
    r = conn.getresponse()
    r.read()
    assert r.status == 302 and r.getheader("Location") == "/"
    cookie = r.getheader("Set-Cookie")
    assert ui.token in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    name_value = cookie.split(";", 1)[0]
    conn.request("GET", "/api/dispatches", headers={"Cookie": name_value})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read()) == []
    for tricky in ("//evil.example/", "/\\evil.example"):
        conn.request("GET", f"{tricky}?token={ui.token}")
        r = conn.getresponse()
        r.read()
        loc = r.getheader("Location")
        assert r.status == 302 and loc.startswith("/") and loc[1:2] not in ("/", "\\"), loc
    # a loopback server refuses other Host names (DNS rebinding), even with the token
    assert ui.request("/api/dispatches", headers={"Host": "evil.example:80"})[0] == 403
    conn.close()


def test_cancel_needs_post_and_csrf_and_reaches_the_owner(ui, tmp_path):
    gate = str(tmp_path / "gate")
    did = ct.dispatch(gated)(gate)
    deadline = time.monotonic() + 30
    while ct.get_result(did).get_node_result(0)["status"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    url = f"/api/d/{did}/cancel"
    body = b"{}"
    assert ui.request(url, method="POST", data=body)[0] == 403  # no CSRF header
    assert ui.request(url, method="POST", data=body,
                      headers={"X-Valent-CSRF": "0" * 64})[0] == 403
    csrf = _csrf(ui)
    code, _ = ui.request(url, method="POST", data=body, headers={
        "X-Valent-CSRF": csrf, "Origin": "http://evil.example"})
    assert code == 403  # cross-origin
    assert ui.request(url, method="GET")[0] == 404  # GET never cancels
    code, msg = ui.request(url, method="POST", data=b'{"task_ids": [99]}',
                           headers={"X-Valent-CSRF": csrf})
    assert code == 400 and b"task_ids" in msg
    assert ct.get_result(did).status == "RUNNING"  # none of the above cancelled anything
    code, msg = ui.request(url, method="POST", data=body, headers={"X-Valent-CSRF": csrf})
    assert code == 200 and b"cancel requested" in msg
    result = ct.get_result(did, wait=True, timeout=30)
    assert result.status == "CANCELLED"
    assert result.get_node_result(0)["cancel_outcome"] == "killed"


@ct.electron
def boom(x):
    raise ValueError(f"bad value {x}")


@ct.lattice
def failing(x):
    return echo(boom(x))


def test_node_detail_has_inputs_error_traceback_and_hidden_secrets(ui, tmp_path, monkeypatch):
    did = ct.dispatch(failing)(7)
    assert ct.get_result(did, wait=True, timeout=30).status == "FAILED"
    code, body = ui.request(f"/api/d/{did}/node/0")
    assert code == 200
    node = json.loads(body)
    assert node["status"] == "FAILED" and "bad value 7" in node["error"]
    assert "in boom" in node["traceback"] and node["traceback"].startswith("Traceback")
    assert node["parents"] == [{"node_id": 1, "name": ":parameter:7", "kind": "parameter",
                                "status": node["parents"][0]["status"], "value": "7"}]
    code, body = ui.request(f"/api/d/{did}/node/2")
    assert json.loads(body)["status"] == "CANCELLED"  # upstream failed
    # executor settings come from this machine's config, secret-looking keys hidden
    cfg = tmp_path / "config.toml"
    cfg.write_text('[executors.ssh]\nhostname = "h1"\nssh_password = "hunter2"\n')
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))
    from valent.ui.data import Data

    assert Data._settings("ssh") == {"hostname": "h1", "ssh_password": "(hidden)"}


@ct.electron
def big_output(n: int) -> bytes:
    return b"x" * n


@ct.lattice
def big_flow(n: int) -> bytes:
    return big_output(n)


def test_a_large_output_is_named_not_loaded_for_its_preview(ui):
    result = ct.dispatch_sync(big_flow)(3 << 20)
    assert result.status == "COMPLETED"
    node = json.loads(ui.request(f"/api/d/{result.dispatch_id}/node/0")[1])
    assert node["output_file"] and node["output_truncated"]
    assert node["output"].startswith("<large output: ") and "bytes pickled" in node["output"]
    code, text = ui.request(f"/api/d/{result.dispatch_id}/node/0/output")
    assert code == 200 and text.startswith(b"b'xxxx") and len(text) > 3 << 20


def test_cancel_one_node_and_its_dependents(ui, tmp_path):
    gate = str(tmp_path / "gate")
    did = ct.dispatch(gated)(gate)
    deadline = time.monotonic() + 30
    while ct.get_result(did).get_node_result(0)["status"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, msg = ui.request(f"/api/d/{did}/cancel", method="POST", data=b'{"task_ids": [0]}',
                           headers={"X-Valent-CSRF": _csrf(ui)})
    assert code == 200, msg
    result = ct.get_result(did, wait=True, timeout=30)
    assert result.get_node_result(0)["cancel_outcome"] == "killed"
    assert result.get_node_result(2)["status"] == "CANCELLED"


def test_a_dead_owner_is_shown_dead_and_the_store_is_not_touched(ui, tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time, valent as ct
        @ct.electron
        def sleepy():
            time.sleep(60)
        @ct.lattice
        def orphan():
            return sleepy()
        print(ct.dispatch(orphan)(), flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        did = owner.stdout.readline().strip()
        assert did
    finally:
        owner.kill()
        owner.wait()
    rows = json.loads(ui.request("/api/dispatches")[1])
    assert [(r["id"], r["owner"]) for r in rows] == [(did, "dead")]
    import sqlite3

    with sqlite3.connect(tmp_path / "results" / "valent.db") as db:
        (status,) = db.execute("SELECT status FROM dispatches").fetchone()
    assert status != "FAILED"  # the UI only reads; `valent list` / get_result mark it
    assert ct.get_result(did).status == "FAILED"  # (and they do)


def test_changes_cursor_sends_only_what_changed(ui, tmp_path):
    gate = str(tmp_path / "gate")
    did = ct.dispatch(gated)(gate)
    deadline = time.monotonic() + 30
    while ct.get_result(did).get_node_result(0)["status"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def changes(since: int) -> dict:
        code, body = ui.request(f"/api/d/{did}/changes?since={since}")
        assert code == 200
        return json.loads(body)

    first = changes(0)
    assert first["full"] and len(first["nodes"]) == 3
    again = changes(first["version"])
    assert again["nodes"] == [] and not again["full"]  # nothing changed: nothing sent
    open(gate, "w").close()
    ct.get_result(did, wait=True, timeout=30)
    after = changes(again["version"])
    assert not after["full"]
    assert {n["id"] for n in after["nodes"]} == {0, 2}  # the parameter (1) did not change
    assert all(n["status"] == "COMPLETED" for n in after["nodes"])
    assert after["dispatch"]["status"] == "COMPLETED"


def test_the_server_reads_the_store_read_only(results_dir):
    from valent.errors import StoreError
    from valent.ui.data import Data

    ct.dispatch_sync(gated)(__file__)
    data = Data(results_dir)
    assert data.dispatches()[0]["status"] == "COMPLETED"
    with pytest.raises(StoreError, match="readonly"):
        data.store.request_cancel(data.dispatches()[0]["id"], None)


def test_non_loopback_host_warns_and_still_needs_the_token(results_dir):
    ui = start_ui("--host", "0.0.0.0", "--read-only")
    try:
        assert ui.base.startswith("http://127.0.0.1:")
        assert ui.request("/api/dispatches", token=None)[0] == 403
        assert ui.request("/api/dispatches")[0] == 200
    finally:
        _, err = stop_ui(ui)
    assert "WARNING" in err and "other machines" in err


def test_unknown_dispatch_is_a_404_naming_it(ui):
    code, body = ui.request("/api/d/zzzz9999/graph")
    assert code == 404 and b"zzzz9999" in body


# ---------------------------------------------------------------------- drawings

HOWTO = textwrap.dedent(
    """
    import valent as ct


    @ct.electron
    def identity(x):
        return x


    @ct.electron
    def square(x):
        return x * x


    @ct.lattice
    def workflow(a):
        val_1 = identity(x=a)
        return square(x=val_1)

    workflow.draw(3)
    """
)


def test_the_visualize_lattice_howto_runs_with_only_the_import_changed(results_dir, tmp_path):
    """Covalent's coding/visualize_lattice how-to: define a lattice, ``workflow.draw(3)``."""
    script = tmp_path / "howto.py"
    script.write_text(HOWTO)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip().rsplit(" to ", 1)[1]
    assert os.path.dirname(path) == str(results_dir / "drawings")
    html = open(path).read()
    for label in ("identity", "square", ":parameter:3"):
        assert f">{label}<" in html
    assert html.count('class="edge"') == 2  # 3 -> identity -> square
    assert not list(results_dir.glob("valent.db*"))  # drawing ran nothing, stored nothing


def test_lattice_draw_returns_an_inline_svg_and_result_draw_colours(results_dir, capsys):
    @ct.lattice
    def fan(n):
        return echo([echo(i) for i in range(n)])

    drawing = fan.draw(200)
    svg = drawing._repr_svg_()
    assert svg.startswith("<svg") and "echo ×200" in svg and "parameters ×200" in svg
    assert drawing.path is not None and drawing.path.exists()
    assert str(drawing.path) in capsys.readouterr().out
    assert "<svg" in drawing._repr_html_()
    result = ct.dispatch_sync(fan)(3)
    colored = result.draw()
    # 3 echo, their 3 parameters, the list, the final echo: all green
    assert colored.svg.count('class="box s-COMPLETED') == 8
    assert f"fan {result.dispatch_id[:8]} COMPLETED</text>" in colored.svg


def test_draw_without_the_ui_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "grandalf", None)
    monkeypatch.setitem(sys.modules, "grandalf.graphs", None)
    with pytest.raises(ct.ValentError, match=r"pip install 'valent\[ui\]'"):
        gated.draw("x")


def test_a_10000_node_fan_out_lays_out_as_a_few_boxes():
    from valent.ui.layout import layout

    n = 10_000
    nodes = [{"node_id": 0, "name": "src", "kind": "electron", "parents": [], "executor": "local"}]
    for i in range(1, n + 1):
        nodes.append({"node_id": i, "name": "work", "kind": "electron", "parents": [0],
                      "executor": "local"})
    nodes.append({"node_id": n + 1, "name": "reduce", "kind": "electron",
                  "parents": list(range(1, n + 1)), "executor": "dask"})
    t0 = time.perf_counter()
    lay = layout(nodes)
    took = time.perf_counter() - t0
    assert [b.label for b in lay.boxes] == ["src", f"work ×{n}", "reduce"]
    assert {(s, d) for s, d, _ in lay.edges} == {("n0", "g1"), ("g1", f"n{n + 1}")}
    assert lay.boxes[0].y < lay.boxes[1].y < lay.boxes[2].y  # top-down
    assert took < 10  # ~0.1 s expected
    # not grouped: the level layout (no Sugiyama) keeps even this openable
    flat = layout(nodes, group=False)
    assert len(flat.boxes) == n + 2 and flat.height > 0


@ct.lattice
def inner_sum(x):
    return echo(x)


@ct.lattice
def outer_with_sublattice(x):
    return echo(ct.electron(inner_sum)(x))


def test_the_list_shows_sublattice_dispatches_under_their_parent(ui):
    """A sublattice's dispatch is not a row of its own: the parent says how many it has, the
    sublattice node links to it, the child links back; a search by id still finds it."""
    result = ct.dispatch_sync(outer_with_sublattice)(5)
    assert result.status == "COMPLETED" and result.result == 5
    did = result.dispatch_id
    code, body = ui.request("/api/dispatches")
    rows = json.loads(body)
    assert [r["id"] for r in rows] == [did]
    assert rows[0]["subs"] == 1 and rows[0]["parent"] is None
    sub = next(n for n in result.get_all_node_results() if n["sub_dispatch_id"])
    code, body = ui.request(f"/api/d/{did}/node/{sub['node_id']}")
    assert code == 200
    children = json.loads(body)["children"]
    assert len(children) == 1 and children[0]["status"] == "COMPLETED"
    child = children[0]["id"]
    assert child == sub["sub_dispatch_id"] != did and children[0]["lattice"] == "inner_sum"
    code, body = ui.request(f"/api/d/{child}/changes?since=0")
    summary = json.loads(body)["dispatch"]
    assert (summary["parent"], summary["parent_node"]) == (did, sub["node_id"])
    rows = json.loads(ui.request(f"/api/dispatches?q={child[:8]}")[1])
    assert [(r["id"], r["parent"]) for r in rows] == [(child, did)]
