"""`valent ui` in a real headless Chromium: list, live dispatch, logs, cancel on Local + Dask.

The dispatches are owned by this test process; the UI is another process (`valent ui`), so a
Cancel pressed in the page reaches the owner through the store, as `valent cancel` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import valent as ct
from core_support import wait_gone, wait_until
from ui_support import start_ui, stop_ui
from valent.testing.procs import write_atomic as _write

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def _js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def _box_status(driver, key: str) -> str | None:
    return _js(driver, "const g=document.getElementById('b-'+arguments[0]);"
                       "return g ? g.dataset.status : null;", key)


def _wait(driver, predicate, timeout: float = 30.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: predicate(d), message=what)


def _dispatch_status(driver) -> str | None:
    """The status the page shows (read in one step: polls redraw the summary)."""
    return _js(driver, "const e=document.getElementById('dstatus');"
                       "return e ? e.dataset.status : null;")


def _text(driver, css: str) -> str | None:
    """An element's text, read in one step (the panel is redrawn when its node changes)."""
    return _js(driver, "const e=document.querySelector(arguments[0]);"
                       "return e ? e.textContent : null;", css)


def _click_box(driver, key: str) -> None:
    _js(driver, "document.getElementById('b-'+arguments[0]).dispatchEvent("
                "new MouseEvent('click', {bubbles: true}))", key)


# ---------------------------------------------------------------------- tasks


@ct.electron
def ticker(release: str) -> int:
    n = 0
    while not os.path.exists(release):
        print(f"tick {n}", flush=True)
        n += 1
        time.sleep(0.05)
    return n


@ct.electron
def double(x: int) -> int:
    return 2 * x


@ct.lattice
def live_flow(release: str) -> int:
    return double(ticker(release))


def hold(i: int, piddir: str) -> int:
    """Start a subprocess, write both pids, then wait far longer than any test."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _write(os.path.join(piddir, f"{i}.pid"), f"{os.getpid()} {child.pid}")
    print(f"task {i} holding", flush=True)
    time.sleep(90)
    child.kill()
    return i


@ct.electron
def join(xs: list) -> list:
    return xs


# ---------------------------------------------------------------------- tests


def test_list_live_dispatch_and_logs(browser, ui, tmp_path):
    """Open the list, open a running dispatch, follow a printing task's logs, see nodes turn
    RUNNING then COMPLETED."""

    release = str(tmp_path / "release")
    did = ct.dispatch(live_flow)(release)
    browser.get(ui.url)
    # the list refreshes itself: wait for the row to say RUNNING (under load the first
    # refresh may still see the dispatch NEW_OBJECT)
    text = _wait(browser, lambda d: (t := _js(d, "const r=document.querySelector("
                                               "`tr.row[data-id='${arguments[0]}']`);"
                                               "return r && r.textContent", did))
                 and "RUNNING" in t and t, what="the dispatch is listed RUNNING")
    assert "live_flow" in text and "alive" in text
    # the list refreshes itself: find and click the row in one step
    _js(browser, "document.querySelector(`tr.row[data-id='${arguments[0]}']`).click()", did)
    _wait(browser, lambda d: d.current_url.endswith(f"/d/{did}"), what="dispatch page opens")
    assert "token=" not in browser.current_url  # the token moved to a cookie
    _wait(browser, lambda d: _box_status(d, "n0") == "RUNNING", what="ticker shows RUNNING")
    assert _box_status(browser, "n2") in ("NEW_OBJECT", "PENDING")
    _click_box(browser, "n0")
    _wait(browser, lambda d: "tick 5" in (_text(d, "#stdout") or ""),
          what="the running task's stdout streams into the node panel")
    assert ct.get_result(did).get_node_result(0)["status"] == "RUNNING"  # still printing
    _write(release, "go")
    _wait(browser, lambda d: _box_status(d, "n2") == "COMPLETED", what="double COMPLETED")
    assert _box_status(browser, "n0") == "COMPLETED"
    _wait(browser, lambda d: _dispatch_status(d) == "COMPLETED",
          what="the dispatch shows COMPLETED")
    result = ct.get_result(did, wait=True, timeout=30)
    assert result.status == "COMPLETED"
    # once ended, the panel holds the stored output: every tick the task printed
    ticks = result.get_node_result(0)["stdout"]
    _wait(browser, lambda d: (_text(d, "#stdout") or "").strip() == ticks.strip(),
          what="the panel shows the stored stdout once the task ended")


def test_cancel_on_local_and_dask_from_the_page(browser, dask_executor, results_dir, tmp_path,
                                                 shots):
    """Cancel pressed in the page: CANCELLED, killed/dequeued per node, processes gone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    piddir = tmp_path / "pids"
    piddir.mkdir()
    local2 = ct.executors.LocalExecutor(workers=2, grace=0.3)
    hold_local = ct.electron(hold, executor=local2)
    hold_dask = ct.electron(hold, executor=dask_executor)

    @ct.lattice
    def mixed(piddir: str) -> list:
        return join([hold_local(0, piddir), hold_local(1, piddir), hold_local(2, piddir),
                     hold_dask(3, piddir)])

    @ct.lattice
    def quick(n: int) -> list:
        return join([double(i) for i in range(n)])

    ct.dispatch_sync(quick)(3)
    ui = start_ui()
    try:
        did = ct.dispatch(mixed)(str(piddir))
        ids = {}
        for n in ct.get_result(did).get_all_node_results():
            if n["node_name"] == "hold":
                ids[len(ids)] = n["node_id"]  # hold(i) nodes in i order
        pids = {}
        for i in (0, 1, 3):
            text = wait_until(lambda i=i: (piddir / f"{i}.pid").exists()
                            and (piddir / f"{i}.pid").read_text(), 60)
            assert text, f"task {i} never started"
            pids[i] = [int(x) for x in text.split()]
        browser.get(ui.url)
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.row")) == 2)
        _wait(browser, lambda d: "alive" in (_text(d, "tr.row") or ""))
        browser.save_screenshot(str(shots / "ui-list.png"))
        browser.get(f"{ui.base}/d/{did}")
        for i in (0, 1, 3):
            _wait(browser, lambda d, i=i: _box_status(d, f"n{ids[i]}") == "RUNNING",
                  what=f"hold({i}) RUNNING")
        assert _box_status(browser, f"n{ids[2]}") in ("NEW_OBJECT", "PENDING")  # no worker
        browser.find_element(By.ID, "cancel-dispatch").click()
        _wait(browser, ec.alert_is_present(), 5, "a confirmation is asked")
        browser.switch_to.alert.accept()
        _wait(browser, lambda d: _dispatch_status(d) == "CANCELLED",
              what="the page shows the dispatch CANCELLED")

        def badge(i: int) -> str:
            return _js(browser, "return document.querySelector('#b-n'+arguments[0]+"
                                "' text.badge').textContent", ids[i])

        _wait(browser, lambda d: [badge(i) for i in range(4)]
              == ["killed", "killed", "dequeued", "killed"],
              what="killed on the running Local and Dask tasks, dequeued on the queued one")
        for i in range(4):
            assert _box_status(browser, f"n{ids[i]}") == "CANCELLED"
        # the page tells the truth: the store says the same, and the processes are gone
        result = ct.get_result(did, wait=True, timeout=30)
        assert [result.get_node_result(ids[i])["cancel_outcome"] for i in range(4)] == [
            "killed", "killed", "dequeued", "killed"]
        assert wait_gone([p for i in pids for p in pids[i]], 15) == []
        assert not (piddir / "2.pid").exists()
        _click_box(browser, f"n{ids[3]}")
        _wait(browser, lambda d: _text(d, "#outcome") == "killed",
              what="the node panel shows the Dask task's outcome")
        assert "dask" in browser.find_element(By.ID, "panel").text
        assert "cancel confirmed" in browser.find_element(By.ID, "panel").text
        browser.find_element(By.ID, "params").click()  # hide the parameters (long paths)
        _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "g.k-parameter")
              and d.find_elements(By.CSS_SELECTOR, "g.box.sel"), what="parameters hidden")
        assert [badge(i) for i in range(4)] == ["killed", "killed", "dequeued", "killed"]
        browser.find_element(By.ID, "zfit").click()  # the panel took part of the width
        browser.save_screenshot(str(shots / "ui-dispatch.png"))
        browser.find_element(By.CSS_SELECTOR, ".tabs button[data-tab='timeline']").click()
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline g.bar")) == 3,
              what="three bars (the tasks that started) on the timeline")
        rows = _text(browser, "#timeline")
        assert "dask slot 0" in rows and "local slot 1" in rows
        browser.save_screenshot(str(shots / "ui-timeline.png"))
        for name in ("ui-list.png", "ui-dispatch.png", "ui-timeline.png"):
            assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_ui(ui)
        local2.shutdown()


def test_read_only_hides_and_refuses_cancel(browser, results_dir):
    from selenium.webdriver.common.by import By

    did = ct.dispatch(live_flow)(str(results_dir / "never"))
    ui = start_ui("--read-only")
    try:
        browser.get(f"{ui.base}/d/{did}")  # a new server: no cookie for it yet, no token
        assert "needs the token" in browser.find_element(By.TAG_NAME, "body").text
        assert not browser.find_elements(By.ID, "main")
        browser.get(f"{ui.url}")
        browser.get(f"{ui.base}/d/{did}")
        _wait(browser, _dispatch_status, what="page loads")
        _wait(browser, lambda d: _box_status(d, "n0") == "RUNNING")
        assert not browser.find_elements(By.ID, "cancel-dispatch")
        assert browser.find_element(By.ID, "ro").text == "read-only"
        # the refusal is the server's, not just a hidden button
        _js(browser, "fetch('/api/d/' + arguments[0] + '/cancel', {method: 'POST', headers: "
                     "{'X-Valent-CSRF': document.querySelector('meta[name=csrf]').content, "
                     "'Content-Type': 'application/json'}, body: '{}'})"
                     ".then(r => { window.__s = r.status; })", did)
        assert _wait(browser, lambda d: _js(d, "return window.__s"), 10) == 403
        assert ct.get_result(did).status == "RUNNING"
    finally:
        stop_ui(ui)
        ct.cancel(did)
        ct.get_result(did, wait=True, timeout=30)


def test_group_box_lists_its_members_and_drawings_page_shows_draw_output(browser, ui):
    from selenium.webdriver.common.by import By

    @ct.lattice
    def wide(n: int) -> list:
        return join([double(i) for i in range(n)])

    result = ct.dispatch_sync(wide)(30)
    assert result.status == "COMPLETED"
    browser.get(ui.url)
    browser.get(f"{ui.base}/d/{result.dispatch_id}")
    key = _wait(browser, lambda d: _js(
        d, "const g=[...document.querySelectorAll('g.box')].find(g => "
           "g.querySelector('text.label').textContent === 'double ×30');"
           "return g && g.dataset.status ? g.dataset.key : null"),
        what="the 30 doubles drawn as one group box, painted")
    assert key.startswith("g") and _box_status(browser, key) == "COMPLETED"
    assert len(_js(browser, "return document.querySelectorAll('g.box')")) == 4  # + params, join
    _click_box(browser, key)
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#panel tr[data-node]"))
    assert len(rows) == 30
    rows[3].click()
    _wait(browser, lambda d: _text(d, "#output"), what="a member's node panel")
    assert _text(browser, "#panel h2").startswith("double(")
    # lattice.draw() in a script writes into the results dir; an open drawings page shows it
    browser.get(f"{ui.base}/drawings")
    _wait(browser, lambda d: d.find_elements(By.ID, "none"))
    drawing = live_flow.draw("x")
    _wait(browser, lambda d: drawing.path.name in (_text(d, "#which") or ""),
          what="the new drawing is listed")
    frame = browser.find_element(By.ID, "frame")
    browser.switch_to.frame(frame)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg g.box"), what="the drawing")
    assert "ticker" in browser.find_element(By.TAG_NAME, "svg").text
    browser.switch_to.default_content()


@ct.lattice
def inner_doubles(n: int) -> list:
    return join([double(i) for i in range(n)])


def test_a_sublattice_node_opens_its_inner_dispatch_and_back(browser, ui):
    """The list shows the outer dispatch only; its sublattice node's panel links to the inner
    dispatch, whose page links back to the outer one."""
    from selenium.webdriver.common.by import By

    @ct.lattice
    def outer(n: int) -> list:
        return join(ct.electron(inner_doubles)(n))

    result = ct.dispatch_sync(outer)(3)
    assert result.status == "COMPLETED" and result.result == [0, 2, 4]
    did = result.dispatch_id
    sub = next(n for n in result.get_all_node_results() if n["sub_dispatch_id"])
    browser.get(ui.url)
    text = _wait(browser, lambda d: _js(d, "const r=document.querySelector("
                                           "`tr.row[data-id='${arguments[0]}']`);"
                                           "return r && r.textContent", did),
                 what="the outer dispatch is listed")
    assert "+1 sublattice dispatch" in text
    assert not _js(browser, "return document.querySelector(`tr.row[data-id='${arguments[0]}']`)",
                   sub["sub_dispatch_id"])  # the inner one is not a row of its own
    browser.get(f"{ui.base}/d/{did}")
    _wait(browser, lambda d: _box_status(d, f"n{sub['node_id']}") == "COMPLETED",
          what="the sublattice node painted")
    _click_box(browser, f"n{sub['node_id']}")
    link = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#panel a.child"),
                 what="the inner dispatch link in the node panel")
    link[0].click()
    _wait(browser, lambda d: d.current_url.endswith(f"/d/{sub['sub_dispatch_id']}"),
          what="the inner dispatch's page opens")
    back = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#parent a"),
                 what="the link back to the outer dispatch")
    assert "sublattice of" in _text(browser, "#parent")
    back[0].click()
    _wait(browser, lambda d: d.current_url.endswith(f"/d/{did}"), what="back on the outer page")
