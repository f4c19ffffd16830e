"""A real OpenSSH server on 127.0.0.1 for the SSH executor's tests and benchmark.

``SSHRig`` generates ed25519 host and client keys, writes its own ``sshd_config``, picks a
free port, runs ``/usr/sbin/sshd -D -e -f CONFIG`` and stops it by PID. The login user is
an ordinary account, ``valentssh`` (created when missing, run as root), with its own Python:
a venv of Debian's ``/usr/bin/python3`` in a world-readable directory under /tmp (kept
across sessions while it is valid), with cloudpickle copied in from this interpreter so the
versions match. Not run as root, the rig logs in as the current user with this Python.

Importable by path (the benchmark does ``sys.path.insert(0, "tests/ssh")``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
USER = "valentssh"
CACHE = Path("/tmp/valent-ssh-rig")  # venvs reused across sessions (world-readable)


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_user() -> str:
    """The login user: ``valentssh`` (created, unlocked for key login) as root; else us."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(USER)
    except KeyError:
        _run("useradd", "-m", "-s", "/bin/bash", USER)
    _run("usermod", "-p", "*", USER)  # with UsePAM no, a locked account cannot log in at all
    return USER


def _system_python() -> str | None:
    """A Python of our minor version that another user can run (not /root/.pyenv's)."""
    want = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in (f"/usr/bin/{want}", f"/usr/local/bin/{want}", "/usr/bin/python3"):
        if os.path.exists(cand):
            out = _run(cand, "-c", "import sys; print(sys.version_info[:2])").stdout.strip()
            if out == str(sys.version_info[:2]):
                return cand
    return None


def _venv(name: str, with_cloudpickle: bool) -> str:
    """A venv under CACHE for the login user; returns its python. Reused while valid."""
    import cloudpickle

    base = _system_python()
    if base is None:
        raise RuntimeError(
            f"no system Python {sys.version_info[0]}.{sys.version_info[1]} for the SSH test "
            "user (install Debian's python3 of that version)"
        )
    CACHE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(CACHE, 0o755)
    tag = f"{name}-{sys.version_info[0]}{sys.version_info[1]}-cp{cloudpickle.__version__}"
    venv = CACHE / tag
    py = venv / "bin" / "python"
    ok = venv / ".ok"
    if ok.exists() and py.exists():
        return str(py)
    shutil.rmtree(venv, ignore_errors=True)
    _run(base, "-m", "venv", "--without-pip", str(venv))
    if with_cloudpickle:
        site = _run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        src = Path(cloudpickle.__file__).parent
        shutil.copytree(src, Path(site.stdout.strip()) / "cloudpickle")
    for root, dirs, files in os.walk(venv):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    ok.write_text("ok\n")
    return str(py)


def remote_python(with_cloudpickle: bool = True) -> str:
    """The Python path the SSH executor should use on the rig's host."""
    if os.geteuid() != 0:
        if with_cloudpickle:
            return sys.executable
        # As an ordinary user the venv would still work: fall through.
    return _venv("py" if with_cloudpickle else "nocp", with_cloudpickle)


class SSHRig:
    """One sshd on 127.0.0.1 with generated keys; ``start`` / ``kill`` / ``stop``."""

    def __init__(self) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} is missing: apt-get install openssh-server")
        self.user = ensure_user()
        self.home = pwd.getpwnam(self.user).pw_dir
        self.python = remote_python(True)
        # Every process of this rig's sessions carries VALENT_RIG=<id> (sshd's SetEnv), so
        # two test sessions on one machine (same login user) never touch each other's.
        self.id = uuid.uuid4().hex[:10]
        self.dir = Path(tempfile.mkdtemp(prefix="valent-sshd-"))
        os.chmod(self.dir, 0o755)
        self.port = _free_port()
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.other_key = self.dir / "other_ed25519"  # a key the server does not accept
        for k in (self.host_key, self.client_key, self.other_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "valent-test", "-f", str(k))
        self.authorized_keys = self.dir / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        os.chmod(self.authorized_keys, 0o644)
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 100
LoginGraceTime 20
SetEnv VALENT_RIG={self.id}
"""
        )
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)
        _run(SSHD, "-t", "-f", str(self.config))

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start sshd on the rig's port and wait for its banner."""
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start; log:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.01)

    def sshd_pids(self) -> list[int]:
        """The listener and its per-connection sshd processes (not the user's commands)."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in kids:
            try:
                if p.exe() == SSHD or p.name() == "sshd":
                    out.append(p.pid)
            except psutil.Error:
                continue
        return out

    def kill(self) -> None:
        """Kill sshd by PID, listener and connections: every client connection drops."""
        pids = self.sshd_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None
        _wait_dead(pids)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop sshd (connections too) and every process its sessions left; remove files."""
        self.kill()
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.workdir(), ignore_errors=True)
        if os.geteuid() == 0:
            shutil.rmtree(Path("/root/.valent") / f"work-{self.id}", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """Live processes started through this rig's sshd (they carry its VALENT_RIG)."""
        needle = f"VALENT_RIG={self.id}".encode()
        out = []
        for p in user_processes(self.user):
            try:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(p)
            except OSError:
                continue
        return out

    def session_processes(self) -> list[psutil.Process]:
        """This sshd's per-connection processes for the login user (one per connection)."""
        if self.proc is None:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for p in kids:
            try:
                if p.name() == "sshd" and f"{self.user}@notty" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    # -- for tests -------------------------------------------------------------------------

    def settings(self, **overrides) -> dict:
        """SSHExecutor keyword arguments for this rig."""
        kw = dict(
            hostname="127.0.0.1",
            port=self.port,
            username=self.user,
            ssh_key_file=str(self.client_key),
            known_hosts=str(self.known_hosts),
            python_path=self.python,
            remote_workdir=f"~/.valent/work-{self.id}",
            grace=0.5,
            reconnect_timeout=30.0,
        )
        kw.update(overrides)
        return kw

    def root_settings(self, **overrides) -> dict:
        """Log in as root with this very interpreter (it has valent installed): for suites
        whose tasks must write under pytest's tmp_path and import ``valent.testing``."""
        kw = self.settings(username="root", python_path=sys.executable)
        kw.update(overrides)
        return kw

    def workdir(self) -> Path:
        return Path(self.home) / ".valent" / f"work-{self.id}"


def _wait_dead(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.01)


def user_processes(user: str) -> list[psutil.Process]:
    """Live (non-zombie) processes of ``user`` (sshd's own privileged helpers excluded)."""
    out = []
    for p in psutil.process_iter(["username", "status", "name"]):
        info = p.info
        if info["username"] != user or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if info["name"] == "sshd":
            continue
        out.append(p)
    return out


def token_processes(token: str) -> list[int]:
    """PIDs of live processes whose environment carries the SSH executor's task token."""
    found = []
    needle = f"VALENT_SSH_TOKEN={token}".encode()
    for p in psutil.process_iter(["status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(p.pid)
        except OSError:
            continue
    return found
