"""Workflows mixing local and SSH electrons, through the public API (dispatch, cancel)."""

from __future__ import annotations

import os
import time

import valent as ct
from ssh_support import wait_until
from valent.testing.procs import pgid as _pgid

pytest_plugins = ["ssh_fixtures"]


def _node(result, name):
    nodes = [n for n in result.get_all_node_results() if n["node_name"] == name]
    assert len(nodes) == 1, [n["node_name"] for n in result.get_all_node_results()]
    return nodes[0]


def test_workflow_mixing_local_and_ssh_electrons(ssh, rig):
    remote = ct.executors.SSHExecutor(**rig.settings())
    ssh()  # the fixture closes the connections and checks the host afterwards

    @ct.electron
    def double(x):
        return 2 * x

    @ct.electron(executor=remote)
    def add_remotely(a, b):
        import os

        print(f"adding on uid {os.getuid()}")
        return {"sum": a + b, "uid": os.getuid()}

    @ct.electron
    def pick(d):
        return d["sum"]

    @ct.lattice
    def flow(x):
        d = double(x)
        r = add_remotely(d, 1)
        return double(pick(r))

    dispatch_id = ct.dispatch(flow)(20)
    result = ct.get_result(dispatch_id, wait=True, timeout=120)
    assert result.status == ct.Status.COMPLETED, result
    assert result.result == 82
    node = _node(result, "add_remotely")
    assert node["status"] == ct.Status.COMPLETED
    assert node["output"]["sum"] == 41
    assert node["output"]["uid"] == rigmod_uid(rig)  # it really ran as the SSH user
    assert node["stdout"] == f"adding on uid {rigmod_uid(rig)}\n"
    assert node["executor"] == "ssh"
    assert _node(result, "pick")["executor"] == "local"


def test_ssh_electron_error_fails_the_workflow(ssh, rig):
    remote = ct.executors.SSHExecutor(**rig.settings())
    ssh()

    @ct.electron(executor=remote)
    def explode(x):
        raise KeyError(x)

    @ct.lattice
    def flow(x):
        return explode(x)

    result = ct.get_result(ct.dispatch(flow)("missing"), wait=True, timeout=120)
    assert result.status == ct.Status.FAILED
    node = _node(result, "explode")
    assert node["status"] == ct.Status.FAILED
    assert "KeyError" in node["error"] and "missing" in node["error"]


def test_cancel_dispatch_with_a_running_ssh_task(ssh, rig):
    remote = ct.executors.SSHExecutor(**rig.settings(grace=0.5))
    ssh()
    marker = f"/tmp/valent-ssh-started-{os.getpid()}-{time.monotonic_ns()}"

    @ct.electron(executor=remote)
    def long_remote(path):
        import subprocess

        with open(path, "w") as f:
            f.write(str(os.getpgid(0)))
        subprocess.run(["sleep", "300"])
        return "finished"

    @ct.electron
    def after(x):
        return x

    @ct.lattice
    def flow(path):
        return after(long_remote(path))

    dispatch_id = ct.dispatch(flow)(marker)
    try:
        assert wait_until(lambda: os.path.exists(marker) and open(marker).read(), 60)
        pgid = int(open(marker).read())
        t0 = time.monotonic()
        ct.cancel(dispatch_id)
        result = ct.get_result(dispatch_id, wait=True, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
    assert result.status == ct.Status.CANCELLED
    node = _node(result, "long_remote")
    assert node["status"] == ct.Status.CANCELLED
    assert node["cancel_outcome"] == "killed"
    assert _node(result, "after")["status"] == ct.Status.CANCELLED
    assert elapsed < 10.0
    # get_result(wait=True) returned only once the remote group was confirmed gone
    left = [p for p in rig.processes() if _pgid(p.pid) == pgid]
    assert left == []


def rigmod_uid(rig) -> int:
    import pwd

    return pwd.getpwnam(rig.user).pw_uid


def test_ssh_executor_by_name_from_the_config_file(ssh, rig, tmp_path, monkeypatch):
    ssh()
    s = rig.settings()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[executors.ssh]\n"
        + "".join(
            f"{k} = {v!r}\n".replace("'", '"')
            for k, v in s.items()
            if k in ("hostname", "port", "username", "ssh_key_file", "known_hosts", "python_path")
        )
    )
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))

    @ct.electron(executor="ssh")
    def where():
        import os

        return os.getuid()

    @ct.lattice
    def flow():
        return where()

    try:
        result = ct.get_result(ct.dispatch(flow)(), wait=True, timeout=120)
        assert result.status == ct.Status.COMPLETED, result
        assert result.result == rigmod_uid(rig)
    finally:
        from valent.api import get_dispatcher

        named = get_dispatcher().named_executor("ssh")
        if named is not None:
            named.shutdown()
