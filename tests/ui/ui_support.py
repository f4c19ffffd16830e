"""Helpers of the web UI tests: start and stop a real `valent ui` process, talk to it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class UI:
    """A running `valent ui`: its base URL, token and process."""

    base: str
    token: str
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def request(self, path: str, token: str | None = "", method: str = "GET",
                data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of a request; ``token=""`` sends the real token, None none."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"token {token or self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def start_ui(*args: str) -> UI:
    proc = subprocess.Popen(
        [sys.executable, "-m", "valent.cli", "ui", "--no-browser", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "open http" in line:
            url = line.split("open ", 1)[1].strip()
            base, token = url.split("/?token=")
            return UI(base, token, proc)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"valent ui did not start: {out}\n{err}")


def stop_ui(ui: UI) -> tuple[str, str]:
    """Stop the server (SIGTERM, then SIGKILL); its remaining stdout and stderr."""
    ui.proc.terminate()
    try:
        return ui.proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        ui.proc.kill()
        return ui.proc.communicate()
