"""Rsync over SSH against the real sshd on 127.0.0.1 (tests/ssh/rig.py): with the SSH
executor's connection settings and host-key checks, both directions, a wrong host key
refused with a clear error, and a cancel during a long transfer."""

from __future__ import annotations

import os
import pwd
import shutil
import time
import uuid
from pathlib import Path

import psutil
import pytest
import valent as ct
from ssh_support import wait_until
from valent.fs.strategies import Rsync
from valent.testing.procs import wait_gone

pytest_plugins = ["ssh_fixtures"]

pytestmark = pytest.mark.skipif(
    shutil.which("rsync") is None, reason="rsync is not installed (tests/run installs it)"
)


@pytest.fixture
def shared_dir():
    """A directory the rig's login user can read and write (it is another account)."""
    d = Path(f"/tmp/valent-rsync-{uuid.uuid4().hex[:10]}")
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def local():
    ex = ct.executors.LocalExecutor(workers=1, grace=0.5)
    yield ex
    ex.shutdown()


def _run(flow, timeout=120):
    return ct.get_result(ct.dispatch(flow)(), wait=True, timeout=timeout)


def test_rsync_both_ways_with_the_ssh_executors_settings(rig, ssh, shared_dir, tmp_path, local):
    remote_in = shared_dir / "input.txt"
    remote_in.write_text("from the host\n")
    os.chmod(remote_in, 0o644)
    strategy = Rsync(ssh_executor=ssh())  # host, user, key, port, known_hosts of the executor
    assert (strategy.host, strategy.port, strategy.user) == ("127.0.0.1", rig.port, rig.user)
    here = tmp_path / "input.txt"
    result = tmp_path / "result.txt"

    @ct.electron(
        executor=local,
        files=[
            ct.fs.TransferFromRemote(str(remote_in), str(here), strategy=strategy),
            ct.fs.TransferToRemote(str(shared_dir / "result.txt"), str(result), strategy=strategy),
        ],
    )
    def shout(files=None):
        (_remote, mine), (out, _r) = files
        Path(out).write_text(Path(mine).read_text().upper())
        return Path(mine).read_text()

    @ct.lattice
    def flow():
        return shout()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == "from the host\n"
    assert (shared_dir / "result.txt").read_text() == "FROM THE HOST\n"
    # written by the login user on the host's side: it went over SSH, not a local copy
    assert pwd.getpwuid((shared_dir / "result.txt").stat().st_uid).pw_name == rig.user


def test_a_host_key_not_in_known_hosts_is_refused(rig, shared_dir, tmp_path, local):
    """The host's key must be in known_hosts (StrictHostKeyChecking=yes), as the SSH
    executor requires; the error says what to do."""
    wrong = tmp_path / "known_hosts"
    other = Path(f"{rig.other_key}.pub").read_text().split()
    wrong.write_text(f"[127.0.0.1]:{rig.port} {other[0]} {other[1]}\n")
    (shared_dir / "f.txt").write_text("x")
    strategy = Rsync(rig.user, "127.0.0.1", str(rig.client_key), port=rig.port,
                     known_hosts=str(wrong))

    @ct.electron(
        executor=local,
        files=[ct.fs.TransferFromRemote(str(shared_dir / "f.txt"), str(tmp_path / "f.txt"),
                                        strategy=strategy)],
    )
    def never(files=None):
        return 1

    @ct.lattice
    def flow():
        return never()

    r = _run(flow)
    assert r.status == ct.Status.FAILED
    err = r.get_node_result(0)["error"]
    assert "FileTransferError" in err and "known_hosts" in err
    assert "accept_unknown_host_key=True" in err
    assert not (tmp_path / "f.txt").exists()


def test_cancel_during_a_long_ssh_transfer_kills_it(rig, ssh, shared_dir, tmp_path, local):
    """A slow upload (--bwlimit) is cancelled: the local rsync and ssh processes are gone,
    the node ends killed, and nothing is left running on the host (the fixture checks)."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 << 20))
    strategy = Rsync(ssh_executor=ssh(), args=["--bwlimit=1"])
    ran = tmp_path / "ran"

    @ct.electron(
        executor=local,
        files=[ct.fs.TransferToRemote(str(shared_dir / "big.bin"), str(big), strategy=strategy,
                                      order=ct.fs.Order.BEFORE)],
    )
    def body(files=None):
        Path(ran).write_text("yes")

    @ct.lattice
    def flow():
        return body()

    def transfer_pids():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(big) in cmd or (str(shared_dir) in cmd and "ssh" in cmd):
                out.append(p.pid)
        return out

    did = ct.dispatch(flow)()
    assert wait_until(lambda: transfer_pids(), 30), "the transfer never started"
    time.sleep(0.5)
    pids = transfer_pids()
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    node = r.get_node_result(0)
    assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
    assert wait_gone(pids + transfer_pids()) == [], "a transfer process outlived the cancel"
    assert not ran.exists()


def test_transfers_run_on_the_ssh_host_without_valent(rig, ssh, shared_dir):
    """A task on the SSH executor runs its transfers on the host, with the host's Python
    (no valent there: the task side is standard library and cloudpickle)."""
    src = shared_dir / "on-host.txt"
    src.write_text("host data")
    os.chmod(src, 0o644)
    dst = shared_dir / "copied" / "on-host.txt"

    @ct.electron(executor=ssh(), files=[ct.fs.FileTransfer(str(src), str(dst))])
    def read(files=None):
        import getpass

        return open(files[0][1]).read(), getpass.getuser()

    @ct.lattice
    def flow():
        return read()

    r = _run(flow)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == ("host data", rig.user)
    assert pwd.getpwuid(dst.stat().st_uid).pw_name == rig.user
