"""The ``valent ui`` web server: the standard library's threading HTTP server, a token on
every request, CSRF-checked POSTs, JSON endpoints over :class:`~valent.ui.data.Data`.

Routes (every one needs the token: ``?token=`` once, then a cookie, or an
``Authorization: token T`` header)::

    GET  /                         dispatch list          GET /d/<id>        dispatch page
    GET  /drawings                 drawings list          GET /drawings/<f>  one drawing
    GET  /api/dispatches?q=&status=
    GET  /api/d/<id>/graph?params=0|1&group=0|1
    GET  /api/d/<id>/changes?since=V                      node states changed after V
    GET  /api/d/<id>/node/<n>      GET /api/d/<id>/node/<n>/output   GET .../logs?stdout=&stderr=
    GET  /api/d/<id>/timeline      GET /api/drawings
    POST /api/d/<id>/cancel        {"task_ids": null | [n, ...]}  (X-Valent-CSRF header)
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import ipaddress
import json
import secrets
import socket
import threading
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import UnknownDispatchError, ValentError
from .data import Data

STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-src 'self'; frame-ancestors 'self'; "
    "base-uri 'none'; form-action 'none'"
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UIServer(http.server.ThreadingHTTPServer):
    """Serves one results dir. ``token`` guards every request; ``read_only`` refuses cancel."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, results_dir: str, host: str = "127.0.0.1", port: int = 0,
                 read_only: bool = False, token: str | None = None):
        if ":" in host and not host.startswith("["):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), Handler)
        self.data = Data(results_dir)
        self.token = token or secrets.token_urlsafe(32)
        self.csrf = hmac.new(self.token.encode(), b"csrf", hashlib.sha256).hexdigest()
        self.read_only = read_only
        self.host = host
        self.port = self.server_address[1]
        self.cookie = f"valent_ui_{self.port}"
        self.loopback = is_loopback(host.strip("[]"))
        self._assets = {name: resources.files(__package__).joinpath("static", name).read_bytes()
                        for name in STATIC}

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}/?token={self.token}"

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="valent-ui", daemon=True)
        t.start()
        return t


class _HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Handler(http.server.BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"
    server_version = "valent-ui"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, code: int = 200) -> None:
        self._send(code, json.dumps(data, default=str).encode(), "application/json")

    def _authorized(self, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """(token ok, came in the query string)."""
        tok = self.server.token
        given = query.get("token", [""])[0]
        if given and hmac.compare_digest(given, tok):
            return True, True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("token ") and hmac.compare_digest(auth[6:].strip(), tok):
            return True, False
        cookies = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except Exception:
            return False, False
        c = cookies.get(self.server.cookie)
        return bool(c and hmac.compare_digest(c.value, tok)), False

    def _host_ok(self) -> bool:
        """Refuse other Host names on a loopback server (DNS rebinding)."""
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in ("127.0.0.1", "localhost", "[::1]", self.server.host.lower())

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._host_ok():
            raise _HTTPError(403, "valent ui: unexpected Host header")
        ok, in_query = self._authorized(query)
        if not ok:
            raise _HTTPError(
                403, "valent ui: this needs the token: open the URL (with ?token=...) that "
                     "`valent ui` printed")
        if in_query and self.command == "GET" and not parts.path.startswith("/api/"):
            # set the cookie and drop the token from the address bar
            self._send(302, b"", "text/plain", {
                # never "//host" or "/\\host" (browsers read both as another site)
                "Location": "/" + parts.path.lstrip("/\\"),
                "Set-Cookie": f"{self.server.cookie}={self.server.token}; HttpOnly; "
                              "SameSite=Strict; Path=/",
            })
            return
        if self.command == "POST":
            self._post(parts.path)
        else:
            self._get(parts.path, query)

    def _run(self) -> None:
        try:
            self._handle()
        except _HTTPError as exc:
            self._send(exc.code, str(exc).encode(), "text/plain; charset=utf-8")
        except UnknownDispatchError as exc:
            self._send(404, str(exc).encode(), "text/plain; charset=utf-8")
        except (KeyError, ValueError) as exc:
            self._send(404, f"not found: {exc}".encode(), "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug or an unreadable store: say so, keep serving
            import traceback

            traceback.print_exc()
            self._send(500, f"valent ui: {type(exc).__name__}: {exc}".encode(),
                       "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        self._run()

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._run()

    # ------------------------------------------------------------------ GET

    def _page(self, page: str, did: str = "") -> None:
        ro = "1" if self.server.read_only else "0"
        html = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<meta name='csrf' content='{self.server.csrf}'>"
            f"<title>valent ui</title><link rel='stylesheet' href='/static/app.css'></head>"
            f"<body data-page='{page}' data-id='{did}' data-readonly='{ro}'>"
            "<header><a href='/' class='brand'>valent</a><nav><a href='/'>dispatches</a>"
            "<a href='/drawings'>drawings</a></nav><span id='ro'></span></header>"
            "<main id='main'></main><script src='/static/app.js'></script></body></html>"
        )
        self._send(200, html.encode(), "text/html; charset=utf-8")

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        data = self.server.data
        q = {k: v[0] for k, v in query.items()}
        seg = [s for s in path.split("/") if s]
        if not seg:
            return self._page("list")
        if seg[0] == "static" and len(seg) == 2 and seg[1] in STATIC:
            return self._send(200, self.server._assets[seg[1]], STATIC[seg[1]])
        if seg[0] == "d" and len(seg) == 2:
            return self._page("dispatch", data.resolve(seg[1]))
        if seg == ["drawings"]:
            return self._page("drawings")
        if seg[0] == "drawings" and len(seg) == 2:
            return self._send(200, data.drawing(seg[1]), "text/html; charset=utf-8")
        if seg[0] != "api":
            raise _HTTPError(404, "not found")
        if seg[1:] == ["dispatches"]:
            return self._json(data.dispatches(q.get("q", ""), q.get("status", "").upper(),
                                               int(q.get("limit", 200))))
        if seg[1:] == ["drawings"]:
            return self._json(data.drawings())
        if seg[1] == "d" and len(seg) >= 4:
            did = data.resolve(seg[2])
            what = seg[3]
            if what == "graph":
                return self._json(data.graph(did, q.get("params", "1") == "1",
                                             q.get("group", "1") == "1"))
            if what == "changes":
                return self._json(data.changes(did, int(q.get("since", 0))))
            if what == "timeline":
                return self._json(data.timeline(did))
            if what == "node" and len(seg) >= 5:
                nid = int(seg[4])
                if len(seg) == 5:
                    return self._json(data.node(did, nid))
                if seg[5] == "output":
                    return self._send(200, data.output_text(did, nid).encode(),
                                      "text/plain; charset=utf-8")
                if seg[5] == "logs":
                    offs = {s: int(q.get(s, 0)) for s in ("stdout", "stderr")}
                    return self._json(data.logs(did, nid, offs))
        raise _HTTPError(404, "not found")

    # ------------------------------------------------------------------ POST

    def _post(self, path: str) -> None:
        seg = [s for s in path.split("/") if s]
        given = self.headers.get("X-Valent-CSRF", "")
        if not hmac.compare_digest(given, self.server.csrf):
            raise _HTTPError(403, "valent ui: missing or wrong CSRF token")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc.lower() != (self.headers.get("Host") or "").lower():
            raise _HTTPError(403, "valent ui: cross-origin request refused")
        if not (len(seg) == 4 and seg[:2] == ["api", "d"] and seg[3] == "cancel"):
            raise _HTTPError(404, "not found")
        if self.server.read_only:
            raise _HTTPError(403, "valent ui: started with --read-only; cancel is disabled")
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise _HTTPError(413, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise _HTTPError(400, f"bad JSON: {exc}") from exc
        task_ids = body.get("task_ids")
        did = self.server.data.resolve(seg[2])
        if task_ids is not None:
            total = len(self.server.data.store.node_rows(did, with_outputs=False))
            if not (isinstance(task_ids, list) and task_ids
                    and all(isinstance(t, int) and 0 <= t < total for t in task_ids)):
                raise _HTTPError(400, f"task_ids must be node ids 0..{total - 1}")
        from .. import api

        try:
            message = api.cancel(did, task_ids)  # the same cross-process path as `valent cancel`
        except ValentError as exc:
            raise _HTTPError(409, str(exc)) from exc
        self._json({"message": message})
