"""`valent ui`: time to first render of a 10,000-node dispatch page in headless Chromium, the
cost of one live-update poll on it, and the server's memory with 50 dispatches listed.

An owner process dispatches 49 small workflows and one of 10,000 nodes (5,000 electrons, each
with a parameter) that is still running while the page opens; `valent ui`
runs as its own process; Debian's chromium is driven by Selenium (as in tests/ui).

    python benchmarks/bench_ui.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ui"))
from common import report, row  # noqa: E402

OWNER = textwrap.dedent(
    """
    import sys, time
    import valent as ct

    def nap(i):
        time.sleep(0.004)
        return i

    e = ct.electron(nap, executor=ct.executors.LocalExecutor(workers=2))

    @ct.lattice
    def small(n):
        return [e(i) for i in range(n)]

    @ct.lattice
    def big(n):
        return [e(i) for i in range(n)]

    for k in range(49):
        ct.dispatch_sync(small)(3)
    did = ct.dispatch(big)(5000)
    print(did, flush=True)
    sys.stdin.readline()          # the benchmark says when to stop
    ct.cancel(did)
    ct.get_result(did, wait=True, timeout=120)
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--screenshot", help="save the grouped 10,000-node page as this PNG")
    args = ap.parse_args()
    import psutil
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
    from ui_support import start_ui, stop_ui

    tmp = tempfile.mkdtemp(prefix="valent-bench-ui-")
    os.environ["VALENT_RESULTS_DIR"] = os.path.join(tmp, "results")
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    did = owner.stdout.readline().strip()
    ui = start_ui()
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    rows = []
    try:
        driver.get(ui.url)  # the list page: 50 dispatches
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements("css selector", "tr.row")) == 50)
        for _ in range(10):
            ui.request("/api/dispatches")
        rss_list = psutil.Process(ui.proc.pid).memory_info().rss / 2**20
        for group in (1, 0):
            times = []
            for _ in range(args.repeats):
                driver.get(f"{ui.base}/d/{did}?group={group}&params={group}")
                WebDriverWait(driver, 300, 0.05).until(
                    lambda d: d.execute_script("return document.body.dataset.live") == "ready")
                times.append(driver.execute_script("return window.__firstRender") / 1000)
            if group and args.screenshot:
                driver.save_screenshot(args.screenshot)
            import json

            state = json.loads(ui.request(f"/api/d/{did}/changes?since=0")[1])["dispatch"]
            what = ("grouped: 'nap ×5000' and 'parameters ×5000' boxes" if group else
                    "every node its own box (level layout), parameters hidden")
            label = "grouped" if group else "ungrouped"
            rows.append(row(f"ui first render, 10,000-node dispatch ({label})",
                            statistics.median(times), "s",
                            note=f"{what}; median of {args.repeats}; then "
                                 f"{state['done']}/{state['total']} done"))
        polls = []
        since = json.loads(ui.request(f"/api/d/{did}/changes?since=0")[1])["version"]
        for _ in range(20):
            t = time.perf_counter()
            code, body = ui.request(f"/api/d/{did}/changes?since={since}")
            polls.append(time.perf_counter() - t)
            since = json.loads(body)["version"]
            time.sleep(0.05)
        rows.append(row("ui live poll (changes since cursor), 10,000 nodes",
                        statistics.median(polls) * 1000, "ms",
                        note=f"median of 20; dispatch {state['status']}"))
        rss_after = psutil.Process(ui.proc.pid).memory_info().rss / 2**20
        rows.append(row("ui server RSS, 50 dispatches listed", rss_list, "MiB"))
        rows.append(row("ui server RSS, after the 10,000-node page", rss_after, "MiB"))
    finally:
        driver.quit()
        stop_ui(ui)
        owner.stdin.write("\n")
        owner.stdin.flush()
        owner.wait(180)
    report(rows, args.json)


if __name__ == "__main__":
    main()
