"""Fixtures of the web UI tests: a real `valent ui` process, a real headless Chromium.

The browser is Debian's ``chromium`` driven by Selenium through Debian's ``chromedriver``
(``tests/run`` installs both). Screenshots go to the test's tmp dir, or to
``$VALENT_UI_SCREENSHOTS`` (e.g. ``docs/images``) when set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ui_support import start_ui, stop_ui

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def ui(results_dir):
    """`valent ui --no-browser` on the test's results dir (a separate process)."""
    server = start_ui()
    yield server
    stop_ui(server)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Selenium + Debian's chromedriver)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(tests/run installs them: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,760", "--disable-extensions", "--no-first-run",
                "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go."""
    target = os.environ.get("VALENT_UI_SCREENSHOTS")
    folder = Path(target) if target else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def dask_executor():
    """A kill-mode DaskExecutor on a cluster valent starts (its own scheduler and worker
    programs), shut down at the end of the module."""
    import valent as ct

    ex = ct.executors.DaskExecutor(n_workers=1, threads_per_worker=2, cancel_mode="kill",
                                   grace=0.5)
    yield ex
    ex.shutdown()
