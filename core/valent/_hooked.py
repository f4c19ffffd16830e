"""The task side of :mod:`valent.deps`: one callable that runs an electron with its steps.

This module imports only the standard library (and cloudpickle, to load the parts), and
:mod:`valent.deps` registers it with cloudpickle to travel *by value*: a task that has steps
runs on a host where valent is not installed (the SSH executor's remote Python needs only
cloudpickle), exactly as on the Local pool or a Dask worker.

A :class:`HookedCall` holds its parts as plain data: ``("bash", [commands])``,
``("pip", spec)``, ``("call", func, args, kwargs, retval_keyword)``, ``("body", fn)``, and for
file transfers (:mod:`valent.fs`) ``("files", [(from, to, from_temp, to_temp), ...])`` (the
task's ``files`` argument) and ``("xfer", spec)`` (one transfer, see :func:`run_transfer`).
When pickled, each callable part becomes its own cloudpickle blob, loaded only right before it
runs, so a pip set is on ``sys.path`` before the body's imports happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

CACHE_ENV = "VALENT_DEPS_CACHE"
DONE_FILE = "valent-deps.json"
_HARMLESS_OPTIONS = {
    "--find-links", "-f", "--no-index", "--index-url", "-i", "--extra-index-url",
    "--trusted-host", "--pre", "--only-binary", "--prefer-binary", "--no-binary",
}


class DependencyError(RuntimeError):
    """A task's dependency could not be set up: a ``deps_bash`` command or a pip install
    failed. The task's node FAILS with this error."""


class FileTransferError(RuntimeError):
    """A file transfer of a task failed (a missing file, rsync or ssh refused, an HTTP
    error). The task's node FAILS with this error, which says what to fix."""


class HookedCall:
    """An electron's function with its steps around it, run as one task function."""

    def __init__(self, name: str, parts: list[tuple]):
        self.name = name
        self.parts = parts
        self.__name__ = self.__qualname__ = name
        # the body's module: an executor that ships the user's own modules by value (SSH)
        # finds it here, and the parts pickled inside this object follow
        body = next(p[1] for p in parts if p[0] == "body")
        self.__module__ = getattr(body, "__module__", None) or __name__

    def __getstate__(self) -> dict[str, Any]:
        import cloudpickle

        parts = []
        for part in self.parts:
            if part[0] in ("call", "body") and not isinstance(part[1], bytes):
                part = (part[0], cloudpickle.dumps(part[1:]))
            parts.append(part)
        return {"name": self.name, "parts": parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self.parts = state["parts"]
        self.__name__ = self.__qualname__ = self.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scope = _PathScope()
        try:
            seen_body = False
            result = None
            for part in self.parts:
                kind = part[0]
                if kind == "bash":
                    run_bash(part[1], self.name)
                elif kind == "pip":
                    path = prepare_pip(part[1], self.name)
                    if path is not None:
                        scope.activate(path)
                elif kind == "files":
                    kwargs["files"] = prepare_files(part[1])
                elif kind == "xfer":
                    run_transfer(part[1], self.name)
                elif kind == "call":
                    func, cargs, ckwargs, retval_keyword = _load(part)
                    when = "call_after" if seen_body else "call_before"
                    try:
                        value = func(*cargs, **ckwargs)
                    except Exception as exc:
                        fname = getattr(func, "__name__", repr(func))
                        exc.add_note(f"(raised by {when} {fname} of electron {self.name})")
                        raise
                    if retval_keyword and not seen_body:
                        kwargs[retval_keyword] = value
                else:
                    (fn,) = _load(part)
                    result = fn(*args, **kwargs)
                    seen_body = True
            return result
        finally:
            scope.undo()

    def __repr__(self) -> str:
        return f"<{self.name} with its deps and calls>"


def _load(part: tuple) -> tuple:
    # loaded afresh at each call (a warm worker keeps this object between tasks): imports then
    # resolve against this call's path, not against a set of an earlier call
    if isinstance(part[1], bytes):
        import cloudpickle

        return cloudpickle.loads(part[1])
    return part[1:]


# ---------------------------------------------------------------------- bash


def run_bash(commands: list[str], where: str) -> None:
    """Each command with ``bash -c`` (``sh`` without bash), in this process's group."""
    shell = shutil.which("bash") or "/bin/sh"
    for cmd in commands:
        proc = subprocess.run(
            [shell, "-c", cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        _echo(proc.stdout, proc.stderr)
        if proc.returncode != 0:
            raise DependencyError(
                f"deps_bash of {where}: the command {cmd!r} exited with status "
                f"{proc.returncode}{_tail(proc.stderr or proc.stdout)}"
            )


# ---------------------------------------------------------------------- file transfers


def prepare_files(entries: list) -> list[tuple[str, str]]:
    """Create the temporary files among ``entries``; the task's ``files`` list."""
    out = []
    for src, dst, src_temp, dst_temp in entries:
        for path, temp in ((src, src_temp), (dst, dst_temp)):
            if temp:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                open(path, "a").close()
        out.append((src, dst))
    return out


def run_transfer(spec: dict[str, Any], where: str = "") -> None:
    """Perform one transfer described by ``spec`` (made by :mod:`valent.fs.strategies`),
    here, with the standard library: ``copy``, ``rsync`` (a subprocess in this process's
    group, so a cancel of the task kills it), ``http_get`` or ``http_put``."""
    op = spec["op"]
    what = spec.get("what", op) + (f" (files of {where})" if where else "")
    try:
        if op == "copy":
            _copy(spec["src"], spec["dst"])
        elif op == "rsync":
            _rsync(spec, what)
        elif op == "http_get":
            _http_get(spec["url"], spec["dst"], spec.get("timeout", 60.0))
        elif op == "http_put":
            _http_put(spec["src"], spec["url"], spec.get("timeout", 60.0))
        else:
            raise FileTransferError(f"{what}: unknown transfer kind {op!r}")
    except FileTransferError:
        raise
    except OSError as exc:
        raise FileTransferError(f"{what} failed: {exc}") from exc


def _copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        if not src.endswith("/"):  # the folder itself, into dst
            dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    if dst.endswith("/") or os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    shutil.copyfile(src, dst)


def _rsync(spec: dict[str, Any], what: str) -> None:
    argv = spec["argv"]
    dst = argv[-1]
    if ":" not in dst.split("/")[0]:  # a local destination: make its folder, as cp does
        os.makedirs(os.path.dirname(dst.rstrip("/")) or ".", exist_ok=True)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise FileTransferError(
            f"{what}: rsync is not installed where the task runs; install it there "
            "(Debian: apt-get install rsync) or use another strategy"
        ) from None
    if proc.returncode == 0:
        return
    err = proc.stderr or proc.stdout or ""
    hint = ""
    if "Host key verification failed" in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
        hint = (
            f" The host key of {spec.get('host')}:{spec.get('port')} is not in the known_hosts "
            f"file {spec.get('known_hosts')} (or does not match it): add the host's key there "
            "(check it with the host's administrator), or accept_unknown_host_key=True to "
            "trust a new host on first use."
        )
    elif "Permission denied" in err and spec.get("host"):
        hint = " The login was refused: check user and private_key_path."
    elif "command not found" in err or "rsync: not found" in err:
        hint = " Is rsync installed on the remote host?"
    raise FileTransferError(f"{what}: rsync exited with status {proc.returncode}.{hint}"
                            f"{_tail(err)}")


def _http_get(url: str, dst: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    if dst.endswith("/"):
        dst = os.path.join(dst, os.path.basename(url.split("?")[0].rstrip("/")) or "download")
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.part-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 16)
        os.replace(tmp, dst)
    except urllib.error.HTTPError as exc:
        raise FileTransferError(
            f"download {url}: the server answered {exc.code} {exc.reason}"
        ) from None
    except urllib.error.URLError as exc:
        raise FileTransferError(f"download {url}: cannot reach it: {exc.reason}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _http_put(src: str, url: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    size = os.path.getsize(src)
    with open(src, "rb") as f:
        req = urllib.request.Request(
            url, data=f, method="PUT", headers={"Content-Length": str(size)}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout):
                pass
        except urllib.error.HTTPError as exc:
            raise FileTransferError(
                f"upload {src} -> {url}: the server answered {exc.code} {exc.reason}"
            ) from None
        except urllib.error.URLError as exc:
            raise FileTransferError(f"upload to {url}: cannot reach it: {exc.reason}") from None


# ---------------------------------------------------------------------- pip


def pip_digest(spec: dict[str, Any]) -> str:
    """Names an installed set: its requirement lines, pip's arguments, Python and platform."""
    key = {
        "v": 1,
        "python": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "lines": spec["lines"],
        "pip_args": spec["pip_args"],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def pip_satisfied(lines: list[str]) -> bool:
    """True when this environment already has every requirement (``importlib.metadata``
    and the requirement's specifier); False when it cannot tell (URLs, -r, -e, extras)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # pip vendors it
        try:
            from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
        except ImportError:
            return False
    from importlib import metadata

    for line in lines:
        if line.startswith("-"):
            if line.split()[0].split("=")[0] in _HARMLESS_OPTIONS:
                continue
            return False
        try:
            req = Requirement(line)
        except InvalidRequirement:
            return False
        if req.marker is not None and not req.marker.evaluate():
            continue
        if req.url or req.extras:
            return False
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return False
        if not req.specifier.contains(version, prereleases=True):
            return False
    return True


def prepare_pip(spec: dict[str, Any], where: str) -> str | None:
    """Install the set once (under a lock) and return its directory; None when this
    environment satisfies it already."""
    if pip_satisfied(spec["lines"]):
        return None
    cache = Path(spec["cache_dir"] or os.environ.get(CACHE_ENV) or _default_cache())
    cache = cache.expanduser()
    key = pip_digest(spec)
    target = cache / f"pip-{key}"
    if (target / DONE_FILE).exists():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"pip-{key}.lock"):
        if (target / DONE_FILE).exists():  # another task built it while this one waited
            return str(target)
        for stale in cache.glob(f"pip-{key}.tmp-*"):  # left by a build that was killed
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        tmp = cache / f"pip-{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-input",
            "--disable-pip-version-check", "--target", str(tmp), *spec["pip_args"],
        ]
        reqs = None
        if spec["requirements_content"]:
            reqs = cache / f"pip-{key}.tmp-{os.getpid()}.txt"
            reqs.write_text(spec["requirements_content"])
            cmd += ["-r", str(reqs)]
        else:
            cmd += spec["packages"]
        started = time.time()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if reqs is not None:
            reqs.unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DependencyError(_pip_failure(where, spec["lines"], proc))
        info = {"lines": spec["lines"], "python": sys.version, "built_at": started}
        (tmp / DONE_FILE).write_text(json.dumps(info))
        os.replace(tmp, target)
    print(f"valent: installed {' '.join(spec['lines'])} into {target}", file=sys.stderr)
    return str(target)


def _pip_failure(where: str, lines: list[str], proc: subprocess.CompletedProcess) -> str:
    text = proc.stderr or proc.stdout or ""
    if "No module named pip" in text:
        return (
            f"deps_pip of {where}: the Python that runs the task ({sys.executable}) has no "
            "pip; install pip there, or install the packages on that host"
        )
    names = re.findall(
        r"(?:No matching distribution found for|satisfies the requirement) ([^\s(]+)", text
    )
    culprit = names[0] if names else None
    if culprit is None:
        m = re.search(r"(?:Failed to build|Failed building wheel for) ([^\s,]+)", text)
        culprit = m.group(1) if m else None
    what = f"the package {culprit!r}" if culprit else f"the set {' '.join(lines)!r}"
    return (
        f"deps_pip of {where}: pip could not install {what} (exit status {proc.returncode}). "
        f"Check the name and version, and that an index or --find-links can reach it"
        f"{_tail(text)}"
    )


class _PathScope:
    """Directories put first on ``sys.path`` for one task, and how to undo that."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.shadowed: dict[str, Any] = {}
        self.pythonpath = os.environ.get("PYTHONPATH")

    def activate(self, path: str) -> None:
        provided = _top_level_names(path)
        for name, mod in list(sys.modules.items()):
            if name.partition(".")[0] in provided and not _loaded_from(mod, path):
                self.shadowed[name] = mod  # the set's version is imported instead
                sys.modules.pop(name, None)
        sys.path.insert(0, path)
        self.paths.append(path)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = path + (os.pathsep + old if old else "")
        importlib.invalidate_caches()

    def undo(self) -> None:
        if not self.paths:
            return
        for path in self.paths:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)
            for name, mod in list(sys.modules.items()):
                if _loaded_from(mod, path):
                    sys.modules.pop(name, None)
        sys.modules.update(self.shadowed)
        if self.pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self.pythonpath
        importlib.invalidate_caches()


def _top_level_names(path: str) -> set[str]:
    names = set()
    for entry in os.listdir(path):
        if entry.endswith((".dist-info", ".egg-info", ".data")) or entry in ("bin", "__pycache__"):
            continue
        names.add(entry.split(".")[0])
    return names


def _loaded_from(mod: Any, path: str) -> bool:
    where = getattr(mod, "__file__", None)
    if where is None:
        paths = getattr(mod, "__path__", None)
        where = next(iter(paths), None) if paths is not None else None
    return isinstance(where, str) and where.startswith(path + os.sep)


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "valent", "deps")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` across processes (released if the holder dies)."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, builds may repeat
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _echo(out: str, err: str) -> None:
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
    if err:
        sys.stderr.write(err)
        sys.stderr.flush()


def _tail(text: str, lines: int = 15) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return ":\n" + "\n".join(text.splitlines()[-lines:])
