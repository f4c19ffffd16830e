"""One nested workflow whose sublattices run electrons on Local, Dask and SSH executors at
once: every inner electron on its own executor, and a cancel of the outer dispatch that
stops the running inner tasks on all three (processes checked gone), with truthful
outcomes at every level. Real sshd on 127.0.0.1 (rig.py), real Dask LocalCluster."""

from __future__ import annotations

import os
import time

import pytest
import valent as ct
from core_support import wait_gone
from ssh_support import wait_until

pytest_plugins = ["ssh_fixtures"]


@pytest.fixture
def dask_ex():
    """A kill-mode DaskExecutor on a LocalCluster it starts (and closes, checked gone)."""
    from valent.testing.procs import live_descendants

    before = {p.pid for p in live_descendants()}
    ex = ct.executors.DaskExecutor(n_workers=1, threads_per_worker=2, grace=0.5)
    yield ex
    ex.shutdown()

    def strays():
        out = []
        for p in live_descendants():
            try:
                cmd = " ".join(p.cmdline())
                # the cluster's processes (nanny, worker, spawned): not sshd or Local workers
                if p.pid not in before and "resource_tracker" not in cmd and any(
                    w in cmd for w in ("multiprocessing", "dask", "distributed")
                ):
                    out.append(p)
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
        return out

    assert wait_until(lambda: not strays(), 30), f"the Dask cluster left {strays()}"


def _node(result, name):
    nodes = [n for n in result.get_all_node_results() if n["node_name"] == name]
    assert len(nodes) == 1, [n["node_name"] for n in result.get_all_node_results()]
    return nodes[0]


def test_sublattices_run_inner_electrons_on_local_dask_and_ssh(ssh, rig, dask_ex):
    remote = ct.executors.SSHExecutor(**rig.settings())
    ssh()

    @ct.electron
    def on_local(x):
        return ("local", os.getpid(), x + 1)

    @ct.electron(executor=dask_ex)
    def on_dask(x):
        return ("dask", os.getpid(), x * 2)

    @ct.electron(executor=remote)
    def on_ssh(x):
        import os

        return ("ssh", os.getuid(), x - 3)

    @ct.electron
    def values(parts):
        return [p[2] for p in parts]

    @ct.electron
    @ct.lattice
    def deeper(x):
        return values([on_dask(x), on_ssh(x)])

    @ct.electron
    @ct.lattice
    def mixed(x):
        return [values([on_local(x), on_dask(x), on_ssh(x)]), deeper(x)]

    @ct.lattice
    def flow(x):
        return mixed(x)

    result = ct.dispatch_sync(flow)(10)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [[11, 20, 7], [20, 7]]
    inner = result.get_node_result(0)["sublattice_result"]
    assert _node(inner, "on_local")["executor"] == "local"
    assert _node(inner, "on_dask")["executor"] == "dask"
    assert _node(inner, "on_ssh")["executor"] == "ssh"
    assert _node(inner, "on_ssh")["output"][1] == _uid(rig)  # really ran over SSH
    assert _node(inner, "on_dask")["output"][1] != os.getpid()
    deep = _node(inner, ":sublattice:deeper")["sublattice_result"]
    assert {_node(deep, n)["executor"] for n in ("on_dask", "on_ssh")} == {"dask", "ssh"}
    assert deep.root_dispatch_id == result.dispatch_id


def test_cancel_of_the_outer_dispatch_stops_inner_tasks_on_every_executor(ssh, rig, dask_ex,
                                                                          tmp_path):
    remote = ct.executors.SSHExecutor(**rig.settings(grace=0.5))
    ssh()
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    ssh_marker = f"/tmp/valent-nest-ssh-{tag}"

    @ct.electron
    def hold_local(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

    @ct.electron(executor=dask_ex)
    def hold_dask(path):
        import os
        import time

        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

    @ct.electron(executor=remote)
    def hold_ssh(path):
        import os
        import subprocess

        with open(path, "w") as f:
            f.write(str(os.getpgid(0)))
        subprocess.run(["sleep", "300"])

    @ct.electron
    @ct.lattice
    def deeper(d, marker):
        return [hold_dask(f"{d}/dask.pid"), hold_ssh(marker)]

    @ct.electron
    @ct.lattice
    def mixed(d, marker):
        return [hold_local(f"{d}/local.pid"), deeper(d, marker)]

    @ct.electron
    def after(x):
        return x

    @ct.lattice
    def flow(d, marker):
        return after(mixed(d, marker))

    d = str(tmp_path)
    did = ct.dispatch(flow)(d, ssh_marker)
    try:
        def text(p):
            return os.path.exists(p) and open(p).read().strip()

        assert wait_until(
            lambda: text(f"{d}/local.pid") and text(f"{d}/dask.pid") and text(ssh_marker), 120
        ), "the inner tasks never all started"
        pids = [int(text(f"{d}/local.pid")), int(text(f"{d}/dask.pid"))]
        pgid = int(text(ssh_marker))
        time.sleep(0.5)  # their RUNNING state reaches the dispatcher
        ct.cancel(did)
        result = ct.get_result(did, wait=True, timeout=120)
    finally:
        if os.path.exists(ssh_marker):
            os.unlink(ssh_marker)
    assert wait_gone(pids, 15) == [], "an inner Local or Dask task is still alive"
    assert [p for p in rig.processes() if _pgid(p.pid) == pgid] == []
    assert result.status == ct.Status.CANCELLED
    outer = _node(result, ":sublattice:mixed")
    assert (outer["status"], outer["cancel_outcome"]) == (ct.Status.CANCELLED, "killed")
    assert _node(result, "after")["status"] == ct.Status.CANCELLED
    mid = outer["sublattice_result"]
    assert mid.status == ct.Status.CANCELLED
    assert _node(mid, "hold_local")["cancel_outcome"] == "killed"
    deep_node = _node(mid, ":sublattice:deeper")
    assert (deep_node["status"], deep_node["cancel_outcome"]) == (ct.Status.CANCELLED, "killed")
    deep = deep_node["sublattice_result"]
    assert deep.status == ct.Status.CANCELLED
    assert _node(deep, "hold_dask")["cancel_outcome"] == "killed"
    assert _node(deep, "hold_ssh")["cancel_outcome"] == "killed"
    for r, name in ((mid, "hold_local"), (deep, "hold_dask"), (deep, "hold_ssh")):
        assert _node(r, name)["start_time"] is not None  # killed => it had started


def _uid(rig) -> int:
    import pwd

    return pwd.getpwnam(rig.user).pw_uid


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
