"""Every way an SSH host can refuse us ends the task with a specific, helpful ValentError."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import rig as rigmod
import ssh_tasks as T
import valent
from valent_ssh import (
    RemotePythonError,
    SSHAuthenticationError,
    SSHError,
    SSHHostKeyError,
    SSHUnreachableError,
)

pytest_plugins = ["ssh_fixtures"]


def fails_with(submit, ex, cls) -> SSHError:
    st = submit(ex, T.add, 1, 2).wait(60)
    assert isinstance(st, valent.Failed), st
    assert isinstance(st.error, cls), repr(st.error)
    assert isinstance(st.error, valent.ValentError)
    assert f"127.0.0.1:{ex.port}" in str(st.error)
    return st.error


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="valent-ssh-scratch-"))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def test_wrong_key(ssh, submit, rig):
    err = fails_with(submit, ssh(ssh_key_file=str(rig.other_key)), SSHAuthenticationError)
    assert "authorized_keys" in str(err) and rig.user in str(err)


def test_missing_key_file(ssh, submit):
    err = fails_with(submit, ssh(ssh_key_file="/nonexistent/id_ed25519"), SSHAuthenticationError)
    assert "ssh_key_file" in str(err) and "does not exist" in str(err)
    assert "nonexistent" not in str(err)  # errors are stored: the key's path never is


def test_unknown_host_key(ssh, submit, scratch):
    empty = scratch / "known_hosts"
    empty.write_text("")
    err = fails_with(submit, ssh(known_hosts=str(empty)), SSHHostKeyError)
    assert "not in known_hosts" in str(err) and "accept_unknown_host_key" in str(err)
    assert "SHA256:" in str(err)


def test_no_known_hosts_file_at_all(ssh, submit, scratch):
    fails_with(submit, ssh(known_hosts=str(scratch / "missing")), SSHHostKeyError)


def test_unknown_host_key_accepted_on_explicit_opt_in(ssh, submit, rig, scratch):
    kh = scratch / "known_hosts"
    kh.write_text("")
    ex = ssh(known_hosts=str(kh), accept_unknown_host_key=True)
    assert submit(ex, T.add, 1, 2).wait().get_value() == 3
    host_pub = Path(f"{rig.host_key}.pub").read_text().split()[1]
    assert f"[127.0.0.1]:{rig.port} ssh-ed25519 {host_pub}" in kh.read_text()
    # the key is now pinned: without the opt-in, the same file lets us in
    assert submit(ssh(known_hosts=str(kh)), T.add, 2, 2).wait().get_value() == 4


def test_changed_host_key(ssh, submit, rig, scratch):
    wrong = Path(f"{rig.other_key}.pub").read_text().split()
    kh = scratch / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{rig.port} {wrong[0]} {wrong[1]}\n")
    err = fails_with(submit, ssh(known_hosts=str(kh)), SSHHostKeyError)
    assert "CHANGED" in str(err) and "ssh-keygen -R" in str(err)
    # opting in to unknown keys does not accept a changed one
    fails_with(submit, ssh(known_hosts=str(kh), accept_unknown_host_key=True), SSHHostKeyError)


def test_sshd_down(ssh, submit):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    err = fails_with(submit, ssh(port=port), SSHUnreachableError)
    assert "Check hostname and port" in str(err)


def test_remote_python_missing(ssh, submit):
    err = fails_with(submit, ssh(python_path="/nonexistent/python3"), RemotePythonError)
    assert "/nonexistent/python3" in str(err) and "python_path" in str(err)


def test_remote_cloudpickle_missing(ssh, submit):
    py = rigmod.remote_python(with_cloudpickle=False)
    err = fails_with(submit, ssh(python_path=py), RemotePythonError)
    assert "cloudpickle" in str(err) and "pip install cloudpickle" in str(err)


def test_remote_python_of_another_minor_version(ssh, submit, rig):
    """A fake for a fault this machine cannot produce (it has one Python 3 minor version): a
    shell script as python_path that answers the runner's hello as Python 3.7 would."""
    d = Path(tempfile.mkdtemp(prefix="valent-ssh-fakepy-"))
    os.chmod(d, 0o755)
    fake = d / "python3.7"
    fake.write_text(
        "#!/bin/sh\n"
        'echo \'{"ev":"hello","python":[3,7,17],"executable":"/opt/py37","cloudpickle":"2.2.1"}\'\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | 0o444)
    try:
        err = fails_with(submit, ssh(python_path=str(fake)), RemotePythonError)
        assert "3.7.17" in str(err) and "minor versions must match" in str(err)
    finally:
        fake.unlink()
        d.rmdir()


def test_errors_reach_every_queued_task(ssh, submit):
    ex = ssh(python_path="/nonexistent/python3")
    jobs = [submit(ex, T.add, i, i) for i in range(3)]
    for j in jobs:
        assert isinstance(j.wait(60).error, RemotePythonError)
