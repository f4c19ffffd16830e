"""One SSH connection to one host: connect, verify the host key, prepare the remote side.

A :class:`Connection` owns a paramiko client (TCP_NODELAY, host key checked against
known_hosts, never added silently), an SFTP session, and the remote agent
(``valent_ssh_agent.py agent``) whose JSON events the host thread reads. paramiko is
imported here, on first use, never when valent or the plugin is imported.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    RemotePythonError,
    SSHAuthenticationError,
    SSHError,
    SSHHostKeyError,
    SSHUnreachableError,
    where,
)

# The remote side: three files copied side by side into one directory on the host, named
# by a hash of their content (a new valent version gets a new directory).
REMOTE_FILES = {
    f"valent_ssh_{name}.py": (Path(__file__).with_name(f"{name}.py")).read_bytes()
    for name in ("agent", "runner", "procs")
}
RUNNER_DIR = (
    ".valent-runner-"
    + hashlib.sha256(
        b"".join(n.encode() + b"\0" + src for n, src in sorted(REMOTE_FILES.items()))
    ).hexdigest()[:12]
)
AGENT = f"{RUNNER_DIR}/valent_ssh_agent.py"
HELLO_TIMEOUT = 30.0


class ConnectionLost(Exception):
    """The connection (or the remote agent) went away; the host thread reconnects."""


@dataclass(frozen=True)
class Target:
    """Where and how to connect: the connection-relevant settings of an SSHExecutor."""

    hostname: str
    port: int
    username: str | None
    ssh_key_file: str | None
    known_hosts: str | None
    accept_unknown_host_key: bool
    python_path: str
    remote_workdir: str
    connect_timeout: float

    @property
    def user(self) -> str:
        return self.username or getpass.getuser()

    @property
    def where(self) -> str:
        return where(self.hostname, self.port)

    def secrets(self) -> list[str]:
        """Values of secret-bearing settings (the key file's path, as given and resolved):
        errors name the setting, never these, since errors end up in the results store."""
        if not self.ssh_key_file:
            return []
        given = self.ssh_key_file
        found = {given, os.path.expanduser(given)}
        for v in list(found):
            found.add(os.path.abspath(v))
            found.add(os.path.realpath(v))
        return sorted((v for v in found if len(v) > 1), key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret-bearing setting's value replaced by the setting's name."""
        for value in self.secrets():
            text = text.replace(value, "<ssh_key_file>")
        return text

    @property
    def host_key_name(self) -> str:
        """The name known_hosts files use: ``host``, or ``[host]:port`` off port 22."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def redact_error(exc: BaseException, target: Target) -> BaseException:
    """``exc``, or a copy of it whose message (and causes) hold no secret-bearing setting.

    The copy has no ``__cause__``: a chained library error (paramiko's, an ``OSError``) may
    quote the key file's path.
    """
    texts = []
    e: BaseException | None = exc
    while e is not None and len(texts) < 10:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    if not any(v in t for t in texts for v in target.secrets()):
        return exc
    message = target.redact(str(exc))
    if isinstance(exc, SSHError):
        clean: BaseException = type(exc)(message, exc.host, exc.port)
    else:
        clean = SSHError(f"{type(exc).__name__}: {message}", target.hostname, target.port)
    clean.__cause__ = None
    clean.__suppress_context__ = True
    return clean


def _about_key(exc: BaseException, key_file: str) -> bool:
    """Whether paramiko's error is about reading or parsing the private key file."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return os.path.realpath(str(exc.filename)) == os.path.realpath(key_file)
    tb = exc.__traceback__
    while tb is not None:  # raised while loading a key (paramiko/pkey.py and its kin)
        name = tb.tb_frame.f_code.co_filename
        if os.path.basename(name) in ("pkey.py", "rsakey.py", "ecdsakey.py", "ed25519key.py",
                                      "dsskey.py"):
            return True
        tb = tb.tb_next
    return "private key" in str(exc).lower()


def _key_problem(exc: BaseException) -> str:
    """What is wrong with the key file, without its path."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


def _fingerprint(key: Any) -> str:
    fp = getattr(key, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _shell_path(path: str) -> str:
    """Quote a remote path for the shell, keeping a leading ``~`` meaning the home dir."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class _HostKeyPolicy:
    """Unknown host key: an error, unless the user opted in to trusting it on first use."""

    def __init__(self, target: Target, pinned: dict[str, Any]):
        self.target = target
        self.pinned = pinned

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        t = self.target
        if not t.accept_unknown_host_key:
            kh = t.known_hosts or "(none: known_hosts=None)"
            target = t.known_hosts or "~/.ssh/known_hosts"
            raise SSHHostKeyError(
                f"the host key of {t.where} ({key.get_name()} {_fingerprint(key)}) is not in "
                f"known_hosts file {kh}. Check the fingerprint with the host's administrator, "
                f"then add it (`ssh-keyscan -p {t.port} {t.hostname} >> {target}`, or "
                f"log in once with `ssh -p {t.port} {t.user}@{t.hostname}`), point known_hosts "
                "at a file that has it, or set accept_unknown_host_key=True to trust it on "
                "first use.",
                t.hostname,
                t.port,
            )
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.pinned[key.get_name()] = key  # a reconnect must meet the same key
        if t.known_hosts:
            path = Path(t.known_hosts).expanduser()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError:
                pass  # still pinned in memory for this process


class Connection:
    """An open, verified connection with the remote agent running."""

    def __init__(self, target: Target, pinned: dict[str, Any]):
        self.target = target
        self.pinned = pinned
        self.client: Any = None
        self.transport: Any = None
        self.chan: Any = None
        self._sftp: Any = None
        self.workdir = ""
        self.hello: dict[str, Any] = {}
        self._buf = b""

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, authenticate, check the host key; start the agent. Raise ``SSHError``,
        whose message never holds the value of a secret-bearing setting (the key's path)."""
        try:
            self._connect()
            self._prepare()
        except BaseException as exc:
            self.close()
            clean = redact_error(exc, self.target)
            if clean is exc:
                raise
            raise clean from None

    def _connect(self) -> None:
        import paramiko

        t = self.target
        key_file = None
        if t.ssh_key_file:
            key_file = os.path.expanduser(t.ssh_key_file)
            if not os.path.isfile(key_file):
                raise SSHAuthenticationError(  # names the setting, never its value
                    f"the ssh_key_file set for {t.where} does not exist (or is not a file); "
                    "point ssh_key_file at your private key (e.g. ~/.ssh/id_ed25519)",
                    t.hostname,
                    t.port,
                )
        try:
            sock = socket.create_connection((t.hostname, t.port), timeout=t.connect_timeout)
        except OSError as exc:
            raise SSHUnreachableError(
                f"cannot reach {t.where}: {exc}. Check hostname and port, that sshd runs "
                "there, and that no firewall blocks it.",
                t.hostname,
                t.port,
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        self.client = client
        keys = client.get_host_keys()
        if t.known_hosts:
            path = os.path.expanduser(t.known_hosts)
            if os.path.isfile(path):
                try:
                    keys.load(path)
                except (OSError, paramiko.SSHException) as exc:
                    raise SSHHostKeyError(
                        f"known_hosts file {t.known_hosts} (for {t.where}) cannot be read: "
                        f"{exc}; fix or replace it",
                        t.hostname,
                        t.port,
                    ) from exc
        for name, key in self.pinned.items():
            keys.add(t.host_key_name, name, key)
        client.set_missing_host_key_policy(_HostKeyPolicy(t, self.pinned))
        try:
            client.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                key_filename=key_file,
                sock=sock,
                timeout=t.connect_timeout,
                banner_timeout=t.connect_timeout,
                auth_timeout=t.connect_timeout,
                allow_agent=key_file is None,
                look_for_keys=key_file is None,
            )
        except SSHError:
            raise
        except paramiko.BadHostKeyException as exc:
            raise SSHHostKeyError(
                f"the host key of {t.where} CHANGED: the server offers {exc.key.get_name()} "
                f"{_fingerprint(exc.key)}, known_hosts ({t.known_hosts}) has "
                f"{_fingerprint(exc.expected_key)}. Someone may be intercepting the "
                "connection; if the host was reinstalled, remove the old key with "
                f"`ssh-keygen -R '{t.host_key_name}'` and add the new one.",
                t.hostname,
                t.port,
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise SSHAuthenticationError(
                f"{t.where} refused the login as {t.user!r} "
                f"({'the ssh_key_file' if t.ssh_key_file else 'agent/default keys'}): "
                f"{str(exc).rstrip('.')}. Check username and ssh_key_file, and that the "
                "matching public key "
                f"is in ~{t.user}/.ssh/authorized_keys on the host.",
                t.hostname,
                t.port,
            ) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if key_file and _about_key(exc, key_file):
                raise SSHAuthenticationError(  # names the setting, never its value
                    f"the ssh_key_file set for {t.where} cannot be used as a private key: "
                    f"{t.redact(_key_problem(exc))}. Point ssh_key_file at a readable private "
                    "key file (e.g. ~/.ssh/id_ed25519)",
                    t.hostname,
                    t.port,
                ) from None
            raise SSHUnreachableError(
                f"SSH handshake with {t.where} failed: {exc!r}. Check that an SSH server "
                "listens there and is not overloaded.",
                t.hostname,
                t.port,
            ) from exc
        self.transport = client.get_transport()
        self.transport.set_keepalive(15)

    def _prepare(self) -> None:
        t = self.target
        wd = _shell_path(t.remote_workdir)
        rc, out, err = self.exec(
            f"mkdir -p {wd} && cd {wd} && pwd && if [ -f {AGENT} ]; then echo have; fi"
        )
        lines = out.split()
        if rc != 0 or not lines:
            raise SSHError(
                f"cannot create remote_workdir {t.remote_workdir!r} on {t.where} as "
                f"{t.user!r}: {err.strip() or 'exit ' + str(rc)}; choose a writable directory",
                t.hostname,
                t.port,
            )
        self.workdir = lines[0]
        if "have" not in lines[1:]:
            sftp = self.sftp()
            tmp = f"{self.workdir}/{RUNNER_DIR}.{os.getpid()}.{time.monotonic_ns()}"
            sftp.mkdir(tmp, 0o755)
            for name, source in REMOTE_FILES.items():
                sftp.putfo(io.BytesIO(source), f"{tmp}/{name}")
            try:
                sftp.posix_rename(tmp, f"{self.workdir}/{RUNNER_DIR}")
            except OSError:  # another client installed the same files meanwhile
                for name in REMOTE_FILES:
                    sftp.remove(f"{tmp}/{name}")
                sftp.rmdir(tmp)
        self._start_agent()

    def _start_agent(self) -> None:
        t = self.target
        chan = self.transport.open_session(timeout=t.connect_timeout)
        chan.exec_command(
            f"cd {shlex.quote(self.workdir)} && exec {_shell_path(t.python_path)} {AGENT} agent"
        )
        self.chan = chan
        hello = self._read_hello()
        self.hello = hello
        want = sys.version_info[:2]
        got = tuple(hello.get("python", ()))[:2]
        fix = (
            f"Set python_path to a Python {want[0]}.{want[1]} on the host that has cloudpickle "
            f"(`python{want[0]}.{want[1]} -m pip install cloudpickle`)."
        )
        if got != want:
            raise RemotePythonError(
                f"the remote Python {t.python_path!r} on {t.where} is "
                f"{'.'.join(map(str, hello.get('python', ())))}, but tasks are pickled by "
                f"Python {want[0]}.{want[1]} here; the minor versions must match. {fix}",
                t.hostname,
                t.port,
            )
        if not hello.get("cloudpickle"):
            raise RemotePythonError(
                f"the remote Python {t.python_path!r} ({hello.get('executable')}) on {t.where} "
                f"has no cloudpickle. Install it there (`{hello.get('executable')} -m pip "
                f"install cloudpickle`), or set python_path to a Python {want[0]}.{want[1]} "
                "that has it.",
                t.hostname,
                t.port,
            )

    def _read_hello(self) -> dict[str, Any]:
        t = self.target
        deadline = time.monotonic() + HELLO_TIMEOUT
        self.chan.settimeout(HELLO_TIMEOUT)
        while b"\n" not in self._buf:
            try:
                data = self.chan.recv(1 << 16)
            except TimeoutError:
                data = None
            if not data or time.monotonic() > deadline:
                err = b""
                while self.chan.recv_stderr_ready():
                    err += self.chan.recv_stderr(1 << 16)
                rc = self.chan.recv_exit_status() if data == b"" else None
                text = err.decode("utf-8", "replace").strip()[-600:]
                raise RemotePythonError(
                    f"the remote Python {t.python_path!r} on {t.where} could not start valent's "
                    f"runner (exit status {rc}): {text or 'no output'}. Set python_path to the "
                    f"path of a Python {sys.version_info[0]}.{sys.version_info[1]} with "
                    "cloudpickle installed on that host.",
                    t.hostname,
                    t.port,
                )
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        self.chan.settimeout(None)
        self.chan.setblocking(False)
        return json.loads(line)

    # -- using -----------------------------------------------------------------------------

    def exec(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a shell command remotely and wait for it: (exit status, stdout, stderr)."""
        chan = self.transport.open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            rc = chan.recv_exit_status()
        finally:
            chan.close()
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def sftp(self) -> Any:
        """The connection's SFTP session (opened once)."""
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def upload_task(self, taskdir: str, blob: bytes) -> None:
        """Create ``taskdir`` (0700) and put the pickled task in it."""
        sftp = self.sftp()
        sftp.mkdir(taskdir, 0o700)
        with sftp.open(f"{taskdir}/task.pkl", "wb") as f:
            f.set_pipelined(True)
            f.write(blob)

    def fetch(self, path: str) -> bytes:
        """Read a remote file whole."""
        buf = io.BytesIO()
        self.sftp().getfo(path, buf)
        return buf.getvalue()

    def send(self, **command: Any) -> None:
        """Send one command to the agent."""
        data = (json.dumps(command, separators=(",", ":")) + "\n").encode()
        try:
            self.chan.setblocking(True)
            self.chan.sendall(data)
            self.chan.setblocking(False)
        except (OSError, EOFError) as exc:
            raise ConnectionLost(repr(exc)) from exc
        except Exception as exc:  # paramiko.SSHException: the session is gone
            raise ConnectionLost(repr(exc)) from exc

    def events(self) -> list[dict[str, Any]]:
        """The agent's events that have arrived, without blocking; ``ConnectionLost`` at EOF."""
        while True:
            try:
                data = self.chan.recv(1 << 20)
            except TimeoutError:  # nothing ready (non-blocking channel)
                break
            except Exception as exc:
                raise ConnectionLost(repr(exc)) from exc
            if not data:
                raise ConnectionLost("the remote agent's channel closed")
            self._buf += data
            if not self.chan.recv_ready():
                break
        out = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out

    def alive(self) -> bool:
        return bool(self.transport is not None and self.transport.is_active())

    def fileno(self) -> int:
        return self.chan.fileno()

    def close(self) -> None:
        """Close everything; the agent sees end of input and exits, tasks live on."""
        for obj in (self._sftp, self.chan, self.client):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._sftp = self.chan = self.client = self.transport = None
